"""The checks, as they run inside the worker process: load, correctness, benchmark. Imports torch.

Invariant: the candidate only ever sees clones; its outputs are compared with the reference's on five
seeded trials (two with non-normal inputs) element-wise and by norm-relative error, NaN never passes,
inputs must come back unchanged, outputs are poisoned after each check so stale results cannot pass,
and at least one Triton launch must happen per call. Timings are only real on a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kernelrl.core import messages as m

MAX_ERROR_CHARS = 2000
NON_NORMAL_TRIALS = {2: "scaled and shifted (x*10+3)", 3: "heavy-tailed (x**3)"}
SPEEDUP_FLAG = 10.0
BASE_SEED = 1234


class LaunchCounter:
    """Counts Triton kernel launches by wrapping the launch entry points once per process."""

    def __init__(self) -> None:
        self.count = 0

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
                return __original(fn_self, *args, **kwargs)

            cls.run = run  # type: ignore[method-assign]


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


class CheckContext:
    """What the pipeline needs from the worker around it."""

    def __init__(
        self,
        device: str,
        job_dir: Path,
        report_phase: Callable[[str], None],
        report_running: Callable[[str], None],
        launches: LaunchCounter,
        enforcing: Callable[[], Any],
    ) -> None:
        self.device = device
        self.job_dir = job_dir
        self.report_phase = report_phase
        self.report_running = report_running
        self.launches = launches
        self.enforcing = enforcing
        self.timings: dict[str, float] = {}

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


class CheckFailure(Exception):
    def __init__(self, error_kind: str, message: str) -> None:
        super().__init__(message)
        self.error_kind = error_kind
        self.message = message


@contextlib.contextmanager
def blame_reference(ctx: CheckContext) -> Iterator[None]:
    """Failures in here are the problem's, not the candidate's: ``bad_problem``.

    The worker tells its parent it is running the reference, so that if the reference kills the process
    (an op this CPU cannot run) the verdict is ``cannot_verify``, never a wrong answer.
    """
    ctx.report_running("reference")
    try:
        yield
    except CheckFailure:
        raise
    except Exception as exc:
        raise CheckFailure("bad_problem", f"the reference program failed: {type(exc).__name__}: {exc}") from exc
    finally:
        ctx.report_running("candidate")


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


def _to_device(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def trial_inputs(problem: ModuleType, trial: int, device: str) -> list[Any]:
    torch.manual_seed(BASE_SEED + 1 + trial)
    inputs = list(problem.get_inputs())
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # transformed in float32: bf16 arithmetic is not safe on every CPU
            if trial == 2:
                x = (x.float() * 10.0 + 3.0).to(x.dtype)
            elif trial == 3:
                x = (x.float() ** 3).to(x.dtype)
        out.append(_to_device(x, device))
    return out


def _flatten(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


def compare(ref: Any, out: Any, atol: float, rtol: float) -> tuple[str, str, float, float]:
    """(error_kind or "", message, max_abs_error, norm-relative error) of ``out`` against ``ref``."""
    refs, outs = _flatten(ref), _flatten(out)
    if len(refs) != len(outs):
        return "shape", f"returned {len(outs)} outputs, expected {len(refs)}", math.inf, math.inf
    worst_abs, worst_rel = 0.0, 0.0
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        if not isinstance(r, torch.Tensor):
            if r != o:
                return "mismatch", f"output {i}: {o!r} != expected {r!r}", math.inf, math.inf
            continue
        if not isinstance(o, torch.Tensor):
            return "shape", f"output {i} is {type(o).__name__}, expected a tensor", math.inf, math.inf
        if o.shape != r.shape:
            return "shape", f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}", math.inf, math.inf
        if o.dtype != r.dtype:
            return "shape", f"output {i} has dtype {o.dtype}, expected {r.dtype}", math.inf, math.inf
        if o.device.type != r.device.type:
            return "shape", f"output {i} is on {o.device}, expected {r.device}", math.inf, math.inf
        o64, r64 = o.detach().double(), r.detach().double()
        bad = ~torch.isfinite(o64) & torch.isfinite(r64)
        if torch.isnan(o64).any() or bad.any():
            return "mismatch", f"output {i} contains NaN or inf", math.inf, math.inf
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


def _poison(outputs: Any) -> None:
    for o in _flatten(outputs):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            o.detach().fill_(math.nan)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tolerance(problem: ModuleType, settings: m.CheckSettings) -> tuple[float, float]:
    if settings.strict:
        return 1e-4, 1e-4
    override = getattr(problem, "TOLERANCE", None)
    if isinstance(override, dict):
        return float(override.get("atol", settings.atol)), float(override.get("rtol", settings.rtol))
    return settings.atol, settings.rtol


def run_checks(job_problem_source: str, candidate_source: str, settings: m.CheckSettings, baseline_ms: float | None,
               ctx: CheckContext) -> m.EvalResult:  # fmt: skip
    """Load, check and (on a GPU) time one candidate; every failure becomes an EvalResult."""
    reference_path = ctx.job_dir / "reference.py"
    candidate_path = ctx.job_dir / "candidate.py"
    reference_path.write_text(job_problem_source)
    candidate_path.write_text(candidate_source)
    tag = ctx.job_dir.name.replace("-", "_")
    compiled = False
    max_abs: float | None = None
    rel: float | None = None
    try:
        ctx.report_phase("load")
        t0 = time.perf_counter()
        with blame_reference(ctx):
            problem = load_module(reference_path, f"krl_reference_{tag}")
            atol, rtol = tolerance(problem, settings)
            init_inputs = list(problem.get_init_inputs())
            torch.manual_seed(BASE_SEED)
            reference = problem.Model(*init_inputs).to(ctx.device).eval()
        with ctx.enforcing():
            try:
                candidate_module = load_module(candidate_path, f"krl_candidate_{tag}")
            except SyntaxError as exc:
                raise CheckFailure("syntax", describe_exception(exc, candidate_path)) from exc
            except Exception as exc:
                raise CheckFailure("import", describe_exception(exc, candidate_path)) from exc
            try:
                torch.manual_seed(BASE_SEED)
                candidate = candidate_module.ModelNew(*init_inputs).to(ctx.device).eval()
            except Exception as exc:
                raise CheckFailure(classify_exception(exc), describe_exception(exc, candidate_path)) from exc
        ctx.timings["load_s"] = time.perf_counter() - t0

        ctx.report_phase("correctness")
        t0 = time.perf_counter()
        cand_times, ref_times = [], []
        for trial in range(settings.n_trials):
            with torch.no_grad(), blame_reference(ctx):
                inputs = trial_inputs(problem, trial, ctx.device)
                _sync(ctx.device)
                t = time.perf_counter()
                expected = reference(*[_clone(x) for x in inputs])
                _sync(ctx.device)
                ref_times.append(time.perf_counter() - t)
            with torch.no_grad():
                given = [_clone(x) for x in inputs]
                ctx.launches.count = 0
                with ctx.enforcing():
                    try:
                        t = time.perf_counter()
                        out = candidate(*given)
                        _sync(ctx.device)
                        cand_times.append(time.perf_counter() - t)
                    except Exception as exc:
                        kind = classify_exception(exc)
                        compiled = compiled or kind not in ("compile",)
                        raise CheckFailure(kind, describe_exception(exc, candidate_path)) from exc
            compiled = True
            if ctx.launches.count == 0:
                raise CheckFailure("kernel_not_run", "ModelNew.forward returned without launching a Triton kernel")
            distribution = NON_NORMAL_TRIALS.get(trial, "as get_inputs() draws them")
            for i, (before, after) in enumerate(zip(inputs, given, strict=True)):
                if isinstance(before, torch.Tensor) and not torch.equal(before, after):
                    raise CheckFailure("mutates_input", f"trial {trial + 1}: ModelNew.forward modified input {i}")
            kind, message, trial_abs, trial_rel = compare(expected, out, atol, rtol)
            max_abs = trial_abs if max_abs is None else max(max_abs, trial_abs)
            rel = trial_rel if rel is None else max(rel, trial_rel)
            if kind:
                raise CheckFailure(kind, f"trial {trial + 1}/{settings.n_trials} (inputs {distribution}): {message}")
            _poison(out)
        ctx.timings["correctness_s"] = time.perf_counter() - t0

        if not ctx.on_gpu:
            return m.EvalResult(
                compiled=True,
                correctness=True,
                runtime=1000 * statistics.median(cand_times),
                baseline_runtime=1000 * statistics.median(ref_times),
                speedup=0.0,
                max_abs_error=max_abs,
                rel_error=rel,
                interpreter=True,
                timings=ctx.timings,
            )
        if not settings.benchmark:
            return m.EvalResult(compiled=True, correctness=True, max_abs_error=max_abs, rel_error=rel, timings=ctx.timings)

        ctx.report_phase("benchmark")
        t0 = time.perf_counter()
        with torch.no_grad(), blame_reference(ctx):
            inputs = trial_inputs(problem, 0, ctx.device)
            expected = reference(*[_clone(x) for x in inputs])
        with torch.no_grad():
            with ctx.enforcing():
                stats, last_out = time_cuda(candidate, inputs, settings.n_timed_runs)
            kind, message, _, _ = compare(expected, last_out, atol, rtol)
            if kind:
                raise CheckFailure(kind, f"timed run: {message}")
            if baseline_ms is None:
                with blame_reference(ctx):
                    baseline_stats, _ = time_cuda(reference, inputs, settings.n_timed_runs)
                baseline_ms = baseline_stats["median"]
        ctx.timings["benchmark_s"] = time.perf_counter() - t0
        speedup = baseline_ms / stats["median"] if stats["median"] > 0 else 0.0
        return m.EvalResult(
            compiled=True,
            correctness=True,
            runtime=stats["median"],
            baseline_runtime=baseline_ms,
            speedup=speedup,
            max_abs_error=max_abs,
            rel_error=rel,
            runtime_stats=stats,
            speedup_flagged=speedup > SPEEDUP_FLAG,
            timings=ctx.timings,
        )
    except CheckFailure as failure:
        return m.EvalResult(
            compiled=compiled,
            correctness=False,
            error_kind=failure.error_kind,
            error_message=bounded(failure.message),
            max_abs_error=max_abs if max_abs is not None and math.isfinite(max_abs) else None,
            rel_error=rel if rel is not None and math.isfinite(rel) else None,
            timings=ctx.timings,
        )


def time_cuda(fn: Callable[..., Any], inputs: list[Any], n_runs: int, n_warmup: int = 10) -> tuple[dict[str, float], Any]:
    """CUDA-event timings in ms: warm-up, L2 flush and a fresh input clone before every timed run."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(n_warmup):
        fn(*[_clone(x) for x in inputs])
    torch.cuda.synchronize()
    times = []
    out = None
    for _ in range(n_runs):
        args = [_clone(x) for x in inputs]
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    stats = {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "std": statistics.pstdev(times),
        "min": min(times),
        "max": max(times),
        "runs": float(n_runs),
    }
    return stats, out
