"""Torch-side pieces shared by the judge and the runner: launch counting, the torch-op recorder,
Triton-interpreter fixes, candidate loading, exception classification and CUDA-event timing.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import statistics
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MAX_ERROR_CHARS = 2000
SPEEDUP_FLAG = 10.0
BASE_SEED = 1234

# aten ops a forward may run outside its Triton launches: allocation, views and reshapes, copies and
# dtype/device moves, fills. Anything else computes, and computing is the kernel's job.
ALLOWED_ATEN_OPS = frozenset(
    {
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
        "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "arange", "scalar_tensor",
        "lift_fresh", "lift_fresh_copy", "_to_copy", "to", "copy_", "clone", "contiguous", "fill_", "zero_",
        "detach", "detach_", "alias", "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided",
        "expand", "permute", "transpose", "t", "squeeze", "unsqueeze", "flatten", "unflatten", "slice",
        "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "view_as", "resize_",
        "is_same_size", "size", "stride", "dim", "numel", "is_contiguous", "sym_size", "sym_stride",
        "sym_numel", "sym_storage_offset", "record_stream", "_has_compatible_shallow_copy_type",
    }
)  # fmt: skip


# what Triton's CPU interpreter itself does to tensor arguments during a launch (moves their storage to
# host copies and back); allowed only inside a launch
INTERPRETER_ATEN_OPS = frozenset({"set_"})


class LaunchCounter:
    """Counts Triton kernel launches by wrapping the launch entry points once per process.

    ``inside`` is non-zero while a launch runs, so the torch-op recorder can tell Triton's own tensor
    traffic (the interpreter copies arguments through torch) from the candidate's.
    """

    def __init__(self) -> None:
        self.count = 0
        self.inside = 0

    def install(self) -> None:
        from triton.runtime import jit

        classes: list[type] = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            original = cls.run

            def run(fn_self: Any, *args: Any, __original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                if not kwargs.get("warmup", False):
                    self.count += 1
                self.inside += 1
                try:
                    return __original(fn_self, *args, **kwargs)
                finally:
                    self.inside -= 1

            cls.run = run  # type: ignore[method-assign]


class TorchOpRecorder(TorchDispatchMode):
    """Records the aten ops that compute while it is active, except those run inside a Triton launch."""

    def __init__(self, launches: LaunchCounter) -> None:
        super().__init__()
        self.launches = launches
        self.ops: set[str] = set()
        self.allowed = ALLOWED_ATEN_OPS  # bound now: rebinding the module's name later changes nothing here

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in self.allowed and not (self.launches.inside and name in INTERPRETER_ATEN_OPS):
            self.ops.add(f"aten.{name}" + (" (inside launch)" if self.launches.inside else ""))
        return func(*args, **(kwargs or {}))


def patch_triton_interpreter() -> None:
    """Work around Triton-interpreter gaps so a correct kernel is not judged wrong on CPU.

    - a multi-config ``@triton.autotune`` benchmarks with a GPU timer: run each config once instead;
    - ``tl.dot`` on bf16 multiplies the raw uint16 bit patterns (triton issue 11584): upcast to fp32 first.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import autotuner
    from triton.runtime import interpreter as ti

    def run_once(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
        kernel_call()
        return [1.0] * len(quantiles)

    autotuner.Autotuner.do_bench = property(lambda self: run_once)  # type: ignore[method-assign,assignment]

    original_dot = ti.InterpreterBuilder.create_dot

    def as_fp32(h: Any) -> Any:
        if h.dtype.scalar == tl.bfloat16:
            return ti.TensorHandle(ti._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        return h

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        return original_dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    ti.InterpreterBuilder.create_dot = create_dot  # type: ignore[method-assign]


class CheckFailure(Exception):
    """A verdict other than correct, with the message the policy will read."""

    def __init__(self, error_kind: str, message: str) -> None:
        super().__init__(message)
        self.error_kind = error_kind
        self.message = message


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """The useful tail of a long message (the end of a traceback is where the error is)."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def describe_exception(exc: BaseException, candidate_path: Path) -> str:
    """The traceback frames inside the candidate's file, then the error itself: what the model can act on."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(candidate_path)]
    lines = [f'  File "candidate.py", line {f.lineno}, in {f.name}\n    {f.line}' for f in frames[-4:]]
    lines.append("".join(traceback.format_exception_only(exc)).strip())
    return bounded("\n".join(lines))


_COMPILE_TIME_ERRORS = (
    "TypeError", "ValueError", "AttributeError", "NameError", "AssertionError", "IncompatibleType",
    "CompilationError", "UnsupportedLanguageConstruct", "CompileTimeAssertion",
)  # fmt: skip


def classify_exception(exc: BaseException) -> str:
    name = type(exc).__name__
    text = f"{name}: {exc}"
    if isinstance(exc, PermissionError) and "sandbox" in str(exc):
        return "forbidden"
    if isinstance(exc, OSError) and exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EMFILE):
        return "resource"  # past the worker's file-size or open-files limit
    if "CompilationError" in name or "CompileTimeAssertion" in name:
        return "compile"
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out_of_memory"
    if "CUDA error" in text or "illegal memory access" in text or "device-side assert" in text:
        return "cuda_fault"
    if name == "InterpreterError" and str(exc).startswith(_COMPILE_TIME_ERRORS):
        return "compile"  # what the GPU compiler would have rejected, raised by the interpreter on the first call
    return "runtime"


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def poison(out: Any) -> None:
    """Fill an output's floating tensors with NaN, so a candidate that hands it back later fails."""
    for o in flatten_outputs(out):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            o.detach().fill_(float("nan"))


def clone_value(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def flatten_outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


def time_cuda(
    fn: Callable[..., Any],
    input_sets: list[list[Any]],
    n_runs: int,
    n_warmup: int = 10,
    checked_runs: frozenset[int] = frozenset(),
    checking: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    poison_outputs: bool = False,
    order: list[int] | None = None,
    after_run: Callable[[int, Any], None] | None = None,
) -> tuple[list[float], list[Any]]:
    """CUDA-event times in ms of ``n_runs`` calls, and the outputs of the ``checked_runs``.

    Run ``i`` takes fresh clones of ``input_sets[order[i]]`` (default ``i % len``). Warm-up first; before every
    timed call an L2 flush and a device-wide sync. The end event is recorded after a device-wide
    synchronisation, so work a call leaves on side streams is inside its interval. The checked runs run
    inside ``checking()`` (the runner's op recorder). After each run, outside its interval, ``after_run(i,
    out)`` sees the output (the runner fingerprints it), then with ``poison_outputs`` it is filled with NaN,
    so handing back an earlier output does not pass.
    """
    order = order if order is not None else [i % len(input_sets) for i in range(n_runs)]
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for i in range(n_warmup):
        with checking():
            fn(*[clone_value(x) for x in input_sets[i % len(input_sets)]])
    torch.cuda.synchronize()
    times: list[float] = []
    checked: list[Any] = []
    for i in range(n_runs):
        args = [clone_value(x) for x in input_sets[order[i]]]
        flush.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with checking() if i in checked_runs else contextlib.nullcontext():
            start.record()
            out = fn(*args)
            torch.cuda.synchronize()
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if after_run is not None:
            after_run(i, out)
        if i in checked_runs:
            checked.append([clone_value(o) for o in out] if isinstance(out, tuple | list) else clone_value(out))
        if poison_outputs:
            poison(out)
    return times, checked


FINGERPRINTS_PER_OUTPUT = 3  # independent weight vectors: a wrong output slips past all three ~never


def fingerprint_weights(seed: int, index: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The random weights both judge and runner use to fingerprint output ``index`` of a timed run (CPU, float32)."""
    generator = torch.Generator().manual_seed(seed * 1009 + index)
    return [torch.rand(shape, generator=generator) - 0.5 for _ in range(FINGERPRINTS_PER_OUTPUT)]


def timing_stats(times: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "std": statistics.pstdev(times),
        "min": min(times),
        "max": max(times),
        "runs": float(len(times)),
    }
