"""The warm start: pairs, SFT samples as the generator would produce them, training into a policy the generator
loads, the content cache, and the mini base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest

from kernelrl.actors import policy_init, warm_start
from kernelrl.actors.gen_backend import GenerateRequest
from kernelrl.actors.gen_hf import HFBackend
from kernelrl.actors.gen_models import weights_sha256
from kernelrl.actors.policy_init import base_name, resolve_base
from kernelrl.actors.warm_start import PairsError, answer_text, load_pairs, sft_sample
from kernelrl.core.config import BufferSettings, Config, GeneratorSettings, PolicySettings, SamplingSettings
from kernelrl.core.problems import builtin_problems
from kernelrl.core.prompts import turn_messages

from tiny_model import tiny_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TWO = ("level1/1_ReLU", "level1/2_LeakyReLU")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def sft_config(base: Path, cache: Path, **policy: object) -> Config:
    settings = {"base": str(base), "epochs": 12, "target_loss": 0.0, "learning_rate": 3e-2, "batch_tokens": 1024, **policy}
    return Config(
        policy=msgspec.convert(settings, PolicySettings),
        buffer=BufferSettings(problems=TWO),
        generator=GeneratorSettings(model_cache_dir=str(cache)),
    )


def test_builtin_pairs_are_the_reference_solutions() -> None:
    problems = builtin_problems()
    pairs = load_pairs("", problems, TWO)
    assert [(p.problem, p.solution) for p in pairs] == [(problems.get(i).source, problems.get(i).solution) for i in TWO]


def test_jsonl_pairs_by_source_and_by_id(tmp_path: Path) -> None:
    problems = builtin_problems()
    file = tmp_path / "pairs.jsonl"
    lines = [{"problem": "class Model: ...", "solution": "class ModelNew: ..."}, {"problem_id": TWO[1], "solution": "x = 1"}]
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    pairs = load_pairs(str(file), problems, TWO)
    assert [(p.problem, p.solution) for p in pairs] == [
        ("class Model: ...", "class ModelNew: ..."),
        (problems.get(TWO[1]).source, "x = 1"),
    ]


@pytest.mark.parametrize(
    "bad",
    ['{"problem": "a"}', '{"problem_id": "level9/nothing", "solution": "s"}', "not json", '{"solution": "s"}'],
)
def test_a_malformed_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    file = tmp_path / "pairs.jsonl"
    file.write_text('{"problem": "p", "solution": "s"}\n\n' + bad + "\n")
    with pytest.raises(PairsError, match=rf"{file}:3: "):
        load_pairs(str(file), builtin_problems(), TWO)


async def test_sample_prompt_is_the_generators_and_the_mask_covers_the_answer(tiny_model: Path) -> None:
    backend = HFBackend(GeneratorSettings(model=str(tiny_model)))
    await backend.start()
    try:
        problem = builtin_problems().get(TWO[0])
        pair = load_pairs("", builtin_problems(), TWO[:1])[0]
        sample = sft_sample(backend._tokenizer, pair)
        prompt = backend.prompt_ids(GenerateRequest(messages=turn_messages(problem.source, [])))
    finally:
        await backend.close()
    tokenizer = backend_tokenizer(tiny_model)
    n = len(prompt)
    assert sample.input_ids[:n] == prompt
    assert sample.loss_mask == [0] * n + [1] * (len(sample.input_ids) - n)
    response = sample.input_ids[n:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == answer_text(pair.solution)
    assert sample.behaviour_logprobs == [0.0] * len(sample.input_ids) and sample.advantage == 0.0


def backend_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


async def test_sft_lowers_the_loss_and_the_generator_then_writes_the_answer(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = sft_config(tiny_model, tmp_path / "cache")
    losses: list[float] = []
    policy = warm_start.warm_start(config, progress=lambda epoch, loss, elapsed: losses.append(loss))
    assert len(losses) == config.policy.epochs and losses[-1] < losses[0] / 2

    backend = HFBackend(GeneratorSettings(model=str(policy)))
    await backend.start()
    try:
        problem = builtin_problems().get(TWO[0])
        request = GenerateRequest(messages=turn_messages(problem.source, []),
                                  sampling=SamplingSettings(temperature=0.0, max_new_tokens=8))  # fmt: skip
        generation = await backend.generate(request)
    finally:
        await backend.close()
    answer = sft_sample(backend_tokenizer(policy), load_pairs("", builtin_problems(), TWO[:1])[0])
    first = answer.input_ids[len(generation.prompt_token_ids) :][:8]
    assert generation.completions[0].token_ids == first

    # the same inputs again: the cached directory, untouched, and no training
    mtime = (policy / "model.safetensors").stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> str:
        raise AssertionError("trained again")

    monkeypatch.setattr(warm_start, "train", no_training)
    assert warm_start.warm_start(config) == policy
    assert (policy / "model.safetensors").stat().st_mtime_ns == mtime
    # another SFT setting is another policy
    with pytest.raises(AssertionError, match="trained again"):
        warm_start.warm_start(sft_config(tiny_model, tmp_path / "cache", epochs=13))


def test_resolve_policy_without_warm_start_is_the_base(tiny_model: Path, tmp_path: Path) -> None:
    config = sft_config(tiny_model, tmp_path, warm_start=False)
    assert warm_start.resolve_policy(config) == tiny_model
    assert warm_start.resolve_policy(config, tmp_path / "out") == tmp_path / "out"
    assert weights_sha256(tmp_path / "out") == weights_sha256(tiny_model)


def test_the_mini_base_is_built_once_and_by_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PolicySettings(base="smollm2-mini", mini_layers=1, mini_hidden=32, mini_heads=2, seed=3)
    first = resolve_base(settings, tmp_path / "a", "cpu")
    again = resolve_base(settings, tmp_path / "b", "cpu")
    other_seed = resolve_base(msgspec.structs.replace(settings, seed=4), tmp_path / "a", "cpu")
    assert weights_sha256(first) == weights_sha256(again) != weights_sha256(other_seed)
    config = json.loads((first / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (1, 32, True)

    def no_build(*args: object) -> Path:
        raise AssertionError("built again")

    monkeypatch.setattr(policy_init, "build_mini_model", no_build)
    assert resolve_base(settings, tmp_path / "a", "cpu") == first


def test_auto_base_by_device_and_a_missing_directory(tmp_path: Path) -> None:
    assert base_name(PolicySettings(), "cpu") == "smollm2-mini"
    assert base_name(PolicySettings(), "cuda") == "smollm2-135m"
    with pytest.raises(policy_init.PolicyInitError, match=r"config\.json"):
        resolve_base(PolicySettings(base=str(tmp_path)), tmp_path, "cpu")


def test_sft_command_prints_the_policy_directory_last(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernelrl.bin import sft

    out = tmp_path / "policy"
    argv = ["--base", str(tiny_model), "--epochs", "1", "--out", str(out), "--set", f"generator.model_cache_dir={tmp_path}",
            "--set", 'buffer.problems=["level1/1_ReLU"]']  # fmt: skip
    assert sft.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert sft.main(["--pairs", str(tmp_path / "missing.jsonl"), *argv]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_training_stops_at_the_target_loss(tiny_model: Path, tmp_path: Path) -> None:
    epochs: list[int] = []
    config = sft_config(tiny_model, tmp_path, target_loss=100.0)  # above the first epoch's loss
    warm_start.warm_start(config, progress=lambda epoch, loss, elapsed: epochs.append(epoch))
    assert epochs == [1]
