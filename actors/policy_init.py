"""The base model a run's policy starts from (``policy.base``), as a local transformers directory.

- ``auto``: ``smollm2-135m`` when the device is a GPU, else ``smollm2-mini``;
- ``smollm2-135m``: the bundled SmolLM2-135M-Instruct, converted once (``gen_models.resolve_model_dir``);
- ``smollm2-mini``: a small Llama (``policy.mini_layers`` / ``mini_hidden`` / ``mini_heads``) with SmolLM2's
  tokenizer and chat template, tied embeddings, float32, randomly initialised from ``policy.seed``: it knows nothing
  until the warm start teaches it, and it trains and samples in seconds on a CPU;
- anything else: a local model directory (it must hold ``config.json``).

Invariant: a mini model directory in the cache is complete (written into a temporary sibling and renamed into
place; of two racing builders one rename wins) and is a function of its name (shape and seed) alone.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from kernelrl.actors.gen_models import demo_tokenizer, resolve_model_dir
from kernelrl.core.config import GeneratorSettings, PolicySettings

BASES = ("auto", "smollm2-135m", "smollm2-mini")
MINI_MAX_POSITIONS = 4096  # a third turn's prompt (two earlier attempts) plus 512 new tokens fits with room to spare


class PolicyInitError(ValueError):
    """``policy.base`` names nothing usable."""


def base_name(settings: PolicySettings, device_type: str) -> str:
    """``policy.base`` with "auto" resolved for ``device_type`` ("cuda" or "cpu")."""
    if settings.base == "auto":
        return "smollm2-135m" if device_type == "cuda" else "smollm2-mini"
    return settings.base


def resolve_base(settings: PolicySettings, cache_dir: Path, device_type: str) -> Path:
    """The base model's directory (built or converted into ``cache_dir`` once)."""
    name = base_name(settings, device_type)
    if name == "smollm2-135m":
        return resolve_model_dir(GeneratorSettings(model_cache_dir=str(cache_dir)))
    if name == "smollm2-mini":
        target = Path(cache_dir).expanduser() / mini_dir_name(settings)
        if not (target / "config.json").is_file():
            build_mini_model(settings, target)
        return target
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise PolicyInitError(
            f"policy.base {name!r}: neither one of {', '.join(BASES)} nor a model directory (no {path / 'config.json'})"
        )
    return path


def mini_dir_name(settings: PolicySettings) -> str:
    return f"smollm2-mini-l{settings.mini_layers}-h{settings.mini_hidden}-a{settings.mini_heads}-s{settings.seed}"


def mini_intermediate(hidden: int) -> int:
    """SmolLM2's MLP ratio (8/3, as LLaMA's SwiGLU), rounded up to a multiple of 32."""
    return -(-hidden * 8 // (3 * 32)) * 32


def build_mini_model(settings: PolicySettings, target: Path) -> Path:
    """Write the mini model into ``target`` atomically; a ``target`` another process completed first is kept."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hidden, heads = settings.mini_hidden, settings.mini_heads
    if settings.mini_layers < 1 or heads < 1 or hidden % heads or (hidden // heads) % 2:
        raise PolicyInitError(
            f"policy.mini_hidden {hidden} must split into mini_heads {heads} heads of an even size, with mini_layers >= 1"
        )
    tokenizer = demo_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mini_intermediate(hidden),
        num_hidden_layers=settings.mini_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MINI_MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 would hide the cache from other users
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # not a lost race: something else is in the way
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
