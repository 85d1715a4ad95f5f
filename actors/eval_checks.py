"""The judge's checks, as pure functions of tensors: trial inputs, tolerance, comparison. Imports torch lazily.

Trials: five seeded draws of the problem's ``get_inputs``: as drawn; standard normal in the same shape and
dtype (both signs, whatever ``get_inputs`` draws); scaled and shifted (x*10+3); heavy-tailed (x**3); the
base draw centred and scaled to unit spread (both signs). Tolerance follows each output's dtype like
KernelBench (fp32 1e-4, fp16/bf16 1e-2) unless the request or the problem says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

from kernelrl.core import messages as m

TRIAL_INPUTS = {
    0: "as get_inputs() draws them",
    1: "standard normal (both signs)",
    2: "scaled and shifted (x*10+3)",
    3: "heavy-tailed (x**3)",
    4: "centred and scaled (both signs)",
}
DTYPE_TOLERANCE = {"float16": 1e-2, "bfloat16": 1e-2}  # everything else: 1e-4 (KernelBench)
DEFAULT_TOLERANCE = 1e-4
STRICT_TOLERANCE = 1e-4
TOLERANCE_PRESETS = {"kernelbench": None, "legacy": 1e-2}  # None: by output dtype


def tolerance_for(dtype_name: str, problem: ModuleType, settings: m.CheckSettings) -> tuple[float, float]:
    """(atol, rtol) for one output: strict, then the request's, then the problem's, then by dtype."""
    if settings.strict:
        return STRICT_TOLERANCE, STRICT_TOLERANCE
    if settings.atol is not None or settings.rtol is not None:
        value = settings.atol if settings.atol is not None else settings.rtol
        assert value is not None
        return settings.atol if settings.atol is not None else value, settings.rtol if settings.rtol is not None else value
    override = getattr(problem, "TOLERANCE", None)
    if isinstance(override, dict):
        by_dtype = DTYPE_TOLERANCE.get(dtype_name, DEFAULT_TOLERANCE)
        return float(override.get("atol", by_dtype)), float(override.get("rtol", by_dtype))
    value = DTYPE_TOLERANCE.get(dtype_name, DEFAULT_TOLERANCE)
    return value, value


def output_scales(value: Any) -> list[float]:
    """The RMS of each floating output: transformed trials scale ``atol`` by how much larger theirs are."""
    import torch

    from kernelrl.actors.eval_pipeline import flatten_outputs

    scales = []
    for v in flatten_outputs(value):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            finite = v.detach().double()[torch.isfinite(v.detach().double())]
            scales.append(float(finite.square().mean().sqrt()) if finite.numel() else 0.0)
        else:
            scales.append(0.0)
    return scales


def compare(ref: Any, out: Any, tol: Callable[[str], tuple[float, float]],
            base_scales: list[float] | None = None) -> tuple[str, str, float, float]:  # fmt: skip
    """(error_kind or "", message, max_abs_error, norm-relative error) of ``out`` against ``ref``.

    Element-wise ``|out - ref| <= atol * s + rtol * |ref|`` and norm-relative error ``<= rtol``, where ``s`` is
    1 on the base draw and, on a transformed draw, how many times larger the reference output's RMS is than
    on the base draw (x*10+3 inputs give ~10x larger outputs and ~10x larger rounding errors).
    """
    import torch

    from kernelrl.actors.eval_pipeline import flatten_outputs

    refs, outs = flatten_outputs(ref), flatten_outputs(out)
    scales = output_scales(ref) if base_scales else []
    if len(refs) != len(outs):
        return "shape", f"returned {len(outs)} outputs, expected {len(refs)}", math.inf, math.inf
    worst_abs, worst_rel = 0.0, 0.0
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        if not isinstance(r, torch.Tensor):
            if isinstance(o, torch.Tensor) or type(o) is not type(r) or r != o:
                return "mismatch", f"output {i}: {o!r} != expected {r!r}", math.inf, math.inf
            continue
        if not isinstance(o, torch.Tensor):
            return "shape", f"output {i} is {type(o).__name__}, expected a tensor", math.inf, math.inf
        if o.shape != r.shape:
            return "shape", f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}", math.inf, math.inf
        if o.dtype != r.dtype:
            return "shape", f"output {i} has dtype {o.dtype}, expected {r.dtype}", math.inf, math.inf
        if o.device.type != r.device.type:
            return "shape", f"output {i} is on {o.device.type}, expected {r.device.type}", math.inf, math.inf
        atol, rtol = tol(str(r.dtype).removeprefix("torch."))
        if base_scales and i < len(base_scales) and base_scales[i] > 0:
            atol *= max(1.0, scales[i] / base_scales[i])
        o64, r64 = o.detach().to(r.device).double(), r.detach().double()
        if (torch.isnan(o64) & ~torch.isnan(r64)).any() or (~torch.isfinite(o64) & torch.isfinite(r64)).any():
            return "mismatch", f"output {i} contains NaN or inf", math.inf, math.inf
        both_finite = torch.isfinite(o64) & torch.isfinite(r64)
        if not torch.equal(o64[~both_finite].nan_to_num(), r64[~both_finite].nan_to_num()):
            return "mismatch", f"output {i} has inf or NaN where the reference has other values", math.inf, math.inf
        o64, r64 = o64[both_finite], r64[both_finite]
        diff = (o64 - r64).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        ref_norm = float(r64.norm())
        rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, rel)
        elementwise = bool((diff <= atol + rtol * r64.abs()).all())
        if not elementwise or rel > rtol:
            return (
                "mismatch",
                f"output {i} differs: max_abs_error={max_abs:.3g}, rel_error={rel:.3g} (atol={atol:g}, rtol={rtol:g})",
                max_abs,
                rel,
            )
    return "", "", worst_abs, worst_rel


def fingerprint_bounds(expected: Any, seed: int, tol: Callable[[str], tuple[float, float]]) -> list[tuple[float, float]]:
    """Per output tensor: the reference's fingerprint ``sum(ref * w)`` and the largest deviation an output that
    passes the element-wise check could have, ``sum(|w| * (atol + rtol * |ref|))`` (plus rounding room)."""
    import torch

    from kernelrl.actors.eval_pipeline import fingerprint_weights, flatten_outputs

    bounds = []
    for k, r in enumerate(flatten_outputs(expected)):
        if isinstance(r, torch.Tensor):
            atol, rtol = tol(str(r.dtype).removeprefix("torch."))
            r64 = r.detach().double()
            for w in fingerprint_weights(seed, k, tuple(r.shape)):
                w64 = w.to(r.device).double()
                value = float((r64 * w64).sum())
                room = float((w64.abs() * (atol + rtol * r64.abs())).sum()) + 1e-9 * float((w64 * r64).abs().sum())
                bounds.append((value, room))
    return bounds


def all_finite(value: Any) -> bool:
    import torch

    from kernelrl.actors.eval_pipeline import flatten_outputs

    tensors = [v for v in flatten_outputs(value) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(v).all()) for v in tensors)


def trial_inputs(problem: ModuleType, trial: int, device: str, seed: int | None = None) -> list[Any]:
    """Trial ``trial``'s inputs (its transform, see ``TRIAL_INPUTS``), drawn from the fixed seed of that trial
    or from ``seed`` (the benchmark draws fresh ones the candidate has never seen)."""
    import torch

    from kernelrl.actors.eval_pipeline import BASE_SEED

    base = BASE_SEED if seed is None else seed
    torch.manual_seed(base + 1 + trial)
    inputs = list(problem.get_inputs())
    generator = torch.Generator().manual_seed(base + 101 + trial)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # transformed in float32: bf16 arithmetic is not safe on every CPU
            f = x.float()
            if trial == 1:
                f = torch.randn(f.shape, generator=generator)
            elif trial == 2:
                f = f * 10.0 + 3.0
            elif trial == 3:
                f = f**3
            elif trial == 4 and f.numel() > 1:
                f = (f - f.mean()) / f.std().clamp_min(1e-6)
            x = f.to(x.dtype)
        out.append(x.to(device) if isinstance(x, torch.Tensor) else x)
    return out
