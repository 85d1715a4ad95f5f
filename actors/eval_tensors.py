"""Values across the judge ↔ runner channel: tensors as safetensors (never pickle), digests of contents.

The runner is untrusted, so unpacking checks everything: the layout's shape, that every tensor it names
is in the blob, and the blob itself is parsed by safetensors, which rejects malformed headers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import safetensors.torch
import torch

from kernelrl.actors.eval_protocol import PackedValues, ProtocolViolation

MAX_DEPTH = 8
SCALARS = (int, float, bool, str, type(None))


def pack_values(value: Any) -> PackedValues:
    """A value (tensor, scalar, or nested list/tuple of them) as a safetensors blob plus a layout."""
    tensors: dict[str, torch.Tensor] = {}

    def layout(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"values nested deeper than {MAX_DEPTH}")
        if isinstance(v, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = v.detach().to("cpu").contiguous().clone()
            return {"t": key, "d": v.device.type}
        if isinstance(v, list | tuple):
            return {"l" if isinstance(v, list) else "u": [layout(x, depth + 1) for x in v]}
        if isinstance(v, SCALARS):
            return {"s": v}
        raise TypeError(f"cannot pass a {type(v).__name__} between evaluator processes")

    spec = layout(value, 0)
    blob = safetensors.torch.save(tensors) if tensors else b""
    return PackedValues(blob=blob, layout=spec)


def unpack_values(packed: PackedValues, device: str) -> Any:
    """The value back; tensors that were on a GPU go to ``device``, CPU tensors stay on the CPU."""
    try:
        tensors = safetensors.torch.load(packed.blob) if packed.blob else {}
    except Exception as exc:  # safetensors raises its own error types for malformed blobs
        raise ProtocolViolation(f"a tensor blob that does not parse ({type(exc).__name__}: {exc})") from exc
    used: set[str] = set()

    def build(spec: Any, depth: int) -> Any:
        if depth > MAX_DEPTH or not isinstance(spec, dict) or len(spec) not in (1, 2):
            raise ProtocolViolation("a malformed value layout")
        if "t" in spec:
            key, where = spec.get("t"), spec.get("d")
            if not isinstance(key, str) or key not in tensors or key in used or not isinstance(where, str):
                raise ProtocolViolation("a value layout naming a tensor that is not in the blob")
            used.add(key)
            return tensors[key].to(device) if where != "cpu" else tensors[key]
        if "s" in spec and isinstance(spec["s"], SCALARS):
            return spec["s"]
        for kind, ctor in (("l", list), ("u", tuple)):
            if kind in spec and isinstance(spec[kind], list):
                return ctor(build(x, depth + 1) for x in spec[kind])
        raise ProtocolViolation("a malformed value layout")

    value = build(packed.layout, 0)
    if used != set(tensors):
        raise ProtocolViolation("a tensor blob with tensors the layout does not name")
    return value


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and exact bytes (NaN payloads and -0.0 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}|".encode(), digest_size=16)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def value_digests(values: list[Any]) -> list[str]:
    return [tensor_digest(v) if isinstance(v, torch.Tensor) else "" for v in values]
