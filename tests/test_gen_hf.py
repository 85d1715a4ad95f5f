"""The hf backend on the tiny model: prompts, sampling and its recorded log-probs, policy updates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kernelrl.actors.gen_backend import BackendError, GenerateRequest, Generation
from kernelrl.actors.gen_hf import HFBackend
from kernelrl.actors.gen_models import weights_sha256
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings

from tiny_model import build_tiny_model, tiny_model_dir

MESSAGES = [m.ChatMessage("system", "You write Triton kernels."), m.ChatMessage("user", "Write a fast ReLU.")]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@contextlib.asynccontextmanager
async def started(model_dir: Path) -> AsyncIterator[HFBackend]:
    backend = HFBackend(GeneratorSettings(model=str(model_dir)))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def backend(tiny_model: Path) -> AsyncIterator[HFBackend]:
    async with started(tiny_model) as b:
        yield b


async def greedy(backend: HFBackend) -> list[int]:
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    return generation.completions[0].token_ids


def recompute_logprobs(model_dir: Path, generation: Generation, processors: LogitsProcessorList) -> list[list[float]]:
    """Each sample's token log-probs from one forward pass over prompt + response, through ``processors``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    prompt = generation.prompt_token_ids
    result = []
    for completion in generation.completions:
        seq = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1]
        lps = []
        for i, token in enumerate(completion.token_ids):
            scores = processors(seq[:, : len(prompt) + i], logits[i : i + 1])
            lps.append(scores.log_softmax(-1)[0, token].item())
        result.append(lps)
    return result


async def test_prompt_is_the_chat_template(backend: HFBackend, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    expected = tokenizer.apply_chat_template(
        [{"role": x.role, "content": x.content} for x in MESSAGES], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    assert generation.prompt_token_ids == list(expected)
    assert tokenizer.decode(generation.prompt_token_ids).endswith("<|im_start|>assistant\n")
    # given ids are the prompt as they are: a continuation of the first answer
    continuation = generation.prompt_token_ids + generation.completions[0].token_ids[:3]
    again = await backend.generate(GenerateRequest(messages=[], prompt_token_ids=continuation, sampling=GREEDY))
    assert again.prompt_token_ids == continuation
    assert again.completions[0].token_ids[:5] == generation.completions[0].token_ids[3:8]


async def test_greedy_is_deterministic_with_plain_logprobs(backend: HFBackend, tiny_model: Path) -> None:
    first = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=GREEDY))
    second = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    a, b, c = first.completions + second.completions
    assert a.token_ids == b.token_ids == c.token_ids and a.text == b.text == c.text
    assert a.logprobs == pytest.approx(c.logprobs, abs=1e-5)  # a batch of 2 and of 1: the same up to rounding
    assert len(a.token_ids) == len(a.logprobs) == GREEDY.max_new_tokens
    assert a.finish_reason == "length" and first.policy_version == 0
    assert a.text == AutoTokenizer.from_pretrained(tiny_model).decode(a.token_ids, skip_special_tokens=True)
    (expected,) = recompute_logprobs(tiny_model, second, LogitsProcessorList())
    assert c.logprobs == pytest.approx(expected, abs=1e-4)


async def test_sampled_logprobs_are_those_of_the_processed_distribution(backend: HFBackend, tiny_model: Path) -> None:
    sampling = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=16, seed=7)
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=3, sampling=sampling))
    assert len(generation.completions) == 3
    assert len({tuple(c.token_ids) for c in generation.completions}) == 3
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    expected = recompute_logprobs(tiny_model, generation, processors)
    for completion, lps in zip(generation.completions, expected, strict=True):
        assert len(completion.token_ids) == len(completion.logprobs) == 16
        assert completion.logprobs == pytest.approx(lps, abs=1e-4)
    # the same seed samples the same again
    assert await backend.generate(GenerateRequest(messages=MESSAGES, n=3, sampling=sampling)) == generation


async def test_top_k_zero_means_no_top_k(backend: HFBackend, tiny_model: Path) -> None:
    """``generate`` would filter to its default top_k=50 (log-probs renormalised over 50 tokens): it must not."""
    sampling = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, seed=3)
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=sampling))
    (expected,) = recompute_logprobs(tiny_model, generation, LogitsProcessorList())
    assert generation.completions[0].logprobs == pytest.approx(expected, abs=1e-4)


async def test_eos_ends_the_sample_and_is_kept(tiny_model: Path, tmp_path: Path) -> None:
    """A model whose end-of-sequence tokens include the third greedy token stops there, that token included."""
    async with started(tiny_model) as plain:
        tokens = await greedy(plain)
    model_dir = shutil.copytree(tiny_model, tmp_path / "eos")
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [generation_config["eos_token_id"], tokens[2]]
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    async with started(model_dir) as backend:
        generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=GREEDY))
    for completion in generation.completions:
        assert completion.token_ids == tokens[:3]
        assert len(completion.logprobs) == 3
        assert completion.finish_reason == "stop"


async def test_full_weights_update(backend: HFBackend, tiny_model: Path, tmp_path: Path) -> None:
    before = await greedy(backend)
    other = build_tiny_model(tmp_path / "v1", tokenizer_source=tiny_model, seed=1)
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(other), sha256=weights_sha256(other)))
    assert backend.policy_version == 1
    after = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    assert after.policy_version == 1 and after.completions[0].token_ids != before
    await backend.apply_update(m.PolicyUpdate(version=2, path=str(tiny_model), sha256=weights_sha256(tiny_model)))
    assert await greedy(backend) == before


def save_lora(base_dir: Path, out_dir: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts lora_B at zero: an adapter that changes nothing
            param.data = torch.randn(param.shape, generator=generator)
    peft_model.save_pretrained(out_dir)
    return out_dir


async def test_lora_update(backend: HFBackend, tiny_model: Path, tmp_path: Path) -> None:
    before = await greedy(backend)
    first, second = save_lora(tiny_model, tmp_path / "a1", seed=1), save_lora(tiny_model, tmp_path / "a2", seed=2)
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(first), sha256=weights_sha256(first), is_lora=True))
    assert backend.policy_version == 1
    with_first = await greedy(backend)
    assert with_first != before
    # a second adapter replaces the first (on the base weights), it does not stack on it
    await backend.apply_update(m.PolicyUpdate(version=2, path=str(second), sha256=weights_sha256(second), is_lora=True))
    async with started(tiny_model) as fresh:
        await fresh.apply_update(m.PolicyUpdate(version=2, path=str(second), sha256="", is_lora=True))
        with_second = await greedy(backend)
        assert with_second == await greedy(fresh) != with_first
    # an adapter that does not load leaves the one in use
    (tmp_path / "broken").mkdir()
    with pytest.raises(BackendError, match="cannot load the LoRA adapter"):
        await backend.apply_update(m.PolicyUpdate(version=3, path=str(tmp_path / "broken"), sha256="", is_lora=True))
    assert backend.policy_version == 2 and await greedy(backend) == with_second
    # full weights drop the adapter
    await backend.apply_update(m.PolicyUpdate(version=3, path=str(tiny_model), sha256=weights_sha256(tiny_model)))
    assert await greedy(backend) == before and backend.policy_version == 3


async def test_sha256_mismatch_is_refused(backend: HFBackend, tiny_model: Path, tmp_path: Path) -> None:
    before = await greedy(backend)
    other = build_tiny_model(tmp_path / "v1", tokenizer_source=tiny_model, seed=1)
    with pytest.raises(BackendError, match=r"sha256 mismatch .*the update says 0+, the files hash to [0-9a-f]{64}"):
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(other), sha256="0" * 64))
    assert backend.policy_version == 0 and await greedy(backend) == before
    with pytest.raises(BackendError, match="not a directory"):
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(tmp_path / "missing"), sha256=""))


async def test_update_waits_for_the_generation_under_way(backend: HFBackend, tiny_model: Path, tmp_path: Path) -> None:
    before = await greedy(backend)
    other = build_tiny_model(tmp_path / "v1", tokenizer_source=tiny_model, seed=1)
    generation, _ = await asyncio.gather(
        backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY)),
        backend.apply_update(m.PolicyUpdate(version=1, path=str(other), sha256="")),
    )
    assert generation.policy_version == 0 and generation.completions[0].token_ids == before
    assert backend.policy_version == 1
