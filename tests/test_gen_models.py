"""The generator's model directory: the bundled SmolLM2 converted once from its GGUF, device and dtype, update digests."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kernelrl.actors.gen_backend import BackendError, GenerateRequest
from kernelrl.actors.gen_hf import HFBackend
from kernelrl.actors.gen_models import DEMO_DIR_NAME, pick_device, pick_dtype, resolve_model_dir, weights_sha256
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the demo model, converted here (not in ~/.cache) so the conversion itself is tested."""
    cache = tmp_path_factory.mktemp("model-cache")
    assert resolve_model_dir(GeneratorSettings(model_cache_dir=str(cache))) == cache / DEMO_DIR_NAME
    return cache


def test_demo_model_is_converted_once(demo_cache: Path) -> None:
    model_dir = demo_cache / DEMO_DIR_NAME
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert resolve_model_dir(GeneratorSettings(model_cache_dir=str(demo_cache))) == model_dir
    assert time.monotonic() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in demo_cache.iterdir()] == [DEMO_DIR_NAME]  # no temporary directory left behind
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
    # tied: the output head is the input embedding, stored once (transformers and vLLM tie it again on load)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "generation_config.json").is_file()


async def test_demo_model_replies(demo_cache: Path) -> None:
    backend = HFBackend(GeneratorSettings(model_cache_dir=str(demo_cache), device="cpu"))
    await backend.start()
    try:
        request = GenerateRequest(
            messages=[m.ChatMessage("user", "What is the capital of France?")],
            sampling=SamplingSettings(temperature=0.0, max_new_tokens=8),
        )
        (completion,) = (await backend.generate(request)).completions
    finally:
        await backend.close()
    assert "Paris" in completion.text
    assert len(completion.token_ids) == len(completion.logprobs) <= 8
    assert all(lp <= 0.0 for lp in completion.logprobs)


def test_model_setting_is_a_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(GeneratorSettings(model=str(tmp_path))) == tmp_path
    with pytest.raises(BackendError, match="not a model directory"):
        resolve_model_dir(GeneratorSettings(model=str(tmp_path / "missing")))


def test_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert pick_device(GeneratorSettings(device="cpu")) == cpu
    assert pick_device(GeneratorSettings()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype(GeneratorSettings(), cpu) == torch.float32
    assert pick_dtype(GeneratorSettings(), torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(GeneratorSettings(dtype="float16"), cpu) == torch.float16
    with pytest.raises(BackendError, match=r"generator\.dtype"):
        pick_dtype(GeneratorSettings(dtype="fp8"), cpu)


def test_weights_sha256(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"weights").hexdigest()  # one file: what sha256sum prints
    (tmp_path / "model-00002.safetensors").write_bytes(b"more")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"moreweights").hexdigest()  # several: in name order
    with pytest.raises(BackendError, match=r"no \*\.safetensors"):
        weights_sha256(tmp_path / "missing")
