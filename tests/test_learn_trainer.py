"""The learner's optimiser step on the tiny model: the PPO-clip direction, on-policy ratios, micro-batching, KL,
the warm start's cross-entropy, LoRA and full-model weights the generator loads, and checkpoint round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from kernelrl.actors.gen_backend import BackendError, GenerateRequest
from kernelrl.actors.gen_hf import HFBackend
from kernelrl.actors.gen_models import weights_sha256
from kernelrl.actors.learn_objective import TurnSample, token_logprobs, turn_sample
from kernelrl.actors.learn_trainer import PolicyTrainer, pack
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, LearnerSettings, SamplingSettings

from tiny_model import tiny_model_dir

MESSAGES = [m.ChatMessage("system", "You write Triton kernels."), m.ChatMessage("user", "Write a fast ReLU.")]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8)
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def settings(**overrides: object) -> LearnerSettings:
    base: dict[str, object] = {"learning_rate": 1e-3, "gradient_checkpointing": False}
    return LearnerSettings(**{**base, **overrides})  # type: ignore[arg-type]


def response_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    with torch.no_grad():
        ids = torch.tensor([[*prompt, *response]])
        logits = model(input_ids=ids, use_cache=False).logits
        return token_logprobs(logits, ids)[0, len(prompt) :].tolist()


def on_policy(model: torch.nn.Module, prompt: list[int], response: list[int], advantage: float) -> TurnSample:
    return turn_sample(prompt, response, response_logprobs(model, prompt, response), advantage)


def random_turns(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, response) pairs of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    turns = []
    for i in range(n):
        prompt = torch.randint(0, 49152, (5 + 3 * i,), generator=g).tolist()
        response = torch.randint(0, 49152, (4 + 2 * (i % 3),), generator=g).tolist()
        turns.append((prompt, response))
    return turns


def batch(model: torch.nn.Module, n: int = 4, seed: int = 0) -> list[TurnSample]:
    advantages = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25]
    return [on_policy(model, p, r, advantages[i % 6]) for i, (p, r) in enumerate(random_turns(n, seed))]


def weights(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max(float((before[k] - after[k]).abs().max()) for k in before)


async def greedy_ids(backend: HFBackend) -> tuple[list[int], list[int]]:
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    return generation.prompt_token_ids, generation.completions[0].token_ids


def test_a_step_raises_positive_advantage_responses_and_lowers_negative_ones(tiny_model: Path) -> None:
    trainer = PolicyTrainer(settings(), tiny_model)
    samples = batch(trainer.model, n=4)
    before = [sum(response_logprobs(trainer.model, *turn)) for turn in random_turns(4)]
    stats = trainer.train_step(samples)
    after = [sum(response_logprobs(trainer.model, *turn)) for turn in random_turns(4)]
    for sample, b, a in zip(samples, before, after, strict=True):
        assert (a > b) if sample.advantage > 0 else (a < b), (sample.advantage, b, a)
    assert trainer.step == 1 and stats.sequences == 4
    assert stats.tokens == sum(sum(s.loss_mask) for s in samples)
    assert stats.grad_norm > 0 and stats.learning_rate == pytest.approx(1e-3)


def test_importance_ratios_are_one_on_on_policy_data(tiny_model: Path) -> None:
    trainer = PolicyTrainer(settings(), tiny_model)
    stats = trainer.train_step(batch(trainer.model, n=3))
    assert stats.clip_fraction == 0.0 and stats.masked_by_band == 0
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-5) and stats.ratio_max == pytest.approx(1.0, abs=1e-5)
    # the loss of on-policy data is minus the token-mean advantage
    samples = batch(trainer.model, n=3)
    mean_adv = sum(s.advantage * sum(s.loss_mask) for s in samples) / sum(sum(s.loss_mask) for s in samples)
    assert trainer.train_step(samples).loss == pytest.approx(-mean_adv, abs=1e-5)
    stale = [TurnSample(input_ids=s.input_ids, loss_mask=s.loss_mask, advantage=s.advantage,
                        behaviour_logprobs=[lp - 1.0 * k for lp, k in zip(s.behaviour_logprobs, s.loss_mask, strict=True)])
             for s in batch(trainer.model, n=3)]  # fmt: skip
    off = trainer.train_step(stale)  # the behaviour policy gave these tokens e^-1 the probability: ratio ~ e
    assert off.clip_fraction == 1.0 and off.ratio_mean == pytest.approx(2.718, abs=1e-3)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_step_of_the_whole_batch(tiny_model: Path, aggregation: str) -> None:
    # adam_eps well above float noise: AdamW's first step is ~lr·sign(g), which noise would flip where g ~ 0
    common = {"loss_aggregation": aggregation, "adam_eps": 1e-4}
    whole = PolicyTrainer(settings(**common, max_tokens_per_gpu=100_000), tiny_model)
    cut = PolicyTrainer(settings(**common, max_tokens_per_gpu=40), tiny_model)
    samples = batch(whole.model, n=5)
    assert len(pack(samples, 100_000)) == 1 and len(pack(samples, 40)) == 3  # two of them padded
    initial = weights(whole)
    a, b = whole.train_step(samples), cut.train_step(samples)
    assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    assert max_change(initial, weights(whole)) > 1e-4  # the step moved the weights
    assert_same_weights(weights(whole), weights(cut), atol=2e-6)


def test_the_kl_to_the_initial_policy_is_zero_at_first_and_grows(tiny_model: Path) -> None:
    for lora_rank in (0, 4):
        trainer = PolicyTrainer(settings(kl_coef=0.1, lora_rank=lora_rank, learning_rate=1e-2), tiny_model)
        samples = batch(trainer.model, n=3)
        assert trainer.train_step(samples).kl == pytest.approx(0.0, abs=1e-6)
        assert trainer.train_step(samples).kl > 1e-6


def test_sft_step_lowers_the_cross_entropy_on_the_masked_tokens(tiny_model: Path) -> None:
    trainer = PolicyTrainer(settings(), tiny_model)
    turns = random_turns(3)
    samples = [turn_sample(p, r, [0.0] * len(r), 0.0) for p, r in turns]

    def cross_entropy() -> float:
        logps = [lp for p, r in turns for lp in response_logprobs(trainer.model, p, r)]
        return -sum(logps) / len(logps)

    before = cross_entropy()
    stats = trainer.sft_step(samples)
    assert stats.loss == pytest.approx(before, rel=1e-5)  # the reported loss is the token-mean cross-entropy
    assert cross_entropy() < before - 0.01


async def test_lora_trains_the_adapter_alone_and_the_generator_applies_it(tiny_model: Path, tmp_path: Path) -> None:
    trainer = PolicyTrainer(settings(lora_rank=4, learning_rate=5e-2), tiny_model)
    assert 0 < trainer.trainable_params < trainer.total_params / 20
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    backend = HFBackend(GeneratorSettings(model=str(tiny_model)))
    await backend.start()
    try:
        prompt, before = await greedy_ids(backend)
        for _ in range(3):  # push the greedy answer down
            trainer.train_step([on_policy(trainer.model, prompt, before, -1.0)])
        assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
        out = tmp_path / "v000001"
        digest = trainer.save_policy(out)
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert digest == weights_sha256(out)
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(out), sha256=digest, is_lora=True))
        _, after = await greedy_ids(backend)
        assert after != before
    finally:
        await backend.close()


async def test_full_model_weights_load_in_the_generator_and_change_its_greedy_output(tiny_model: Path, tmp_path: Path) -> None:
    trainer = PolicyTrainer(settings(learning_rate=2e-2), tiny_model)
    backend = HFBackend(GeneratorSettings(model=str(tiny_model)))
    await backend.start()
    try:
        prompt, before = await greedy_ids(backend)
        for _ in range(3):
            trainer.train_step([on_policy(trainer.model, prompt, before, -1.0)])
        out = tmp_path / "v000001"
        (out / "stale").mkdir(parents=True)  # a directory already there is replaced
        digest = trainer.save_policy(out)
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
        assert not (out / "stale").exists() and [p.name for p in tmp_path.iterdir()] == ["v000001"]
        with safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()  # tied to the embeddings, stored once
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
        reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        ids = torch.tensor([[*prompt, *before]])
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
        with pytest.raises(BackendError, match="sha256 mismatch"):
            await backend.apply_update(m.PolicyUpdate(version=1, path=str(out), sha256="0" * 64))
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(out), sha256=digest))
        _, after = await greedy_ids(backend)
        assert after != before and backend.policy_version == 1
    finally:
        await backend.close()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_checkpoint_resumes_the_exact_next_step(tiny_model: Path, tmp_path: Path, lora_rank: int) -> None:
    config = settings(lora_rank=lora_rank, lora_dropout=0.1 if lora_rank else 0.0)  # dropout: the RNG is restored too
    trainer = PolicyTrainer(config, tiny_model)
    samples = batch(trainer.model, n=3)
    assert PolicyTrainer(config, tiny_model).load_checkpoint(tmp_path / "ckpt") is None
    trainer.train_step(samples)
    trainer.save_checkpoint(tmp_path / "ckpt", {"consumed": [1], "stream_seq": 7})
    trainer.train_step(samples)
    resumed = PolicyTrainer(config, tiny_model)
    assert resumed.load_checkpoint(tmp_path / "ckpt") == {"consumed": [1], "stream_seq": 7}
    assert resumed.step == 1
    resumed.train_step(samples)
    assert resumed.step == 2
    assert_same_weights(weights(resumed), weights(trainer), atol=0.0)
