"""The trusted side of an evaluation: the judge process, where the verdict is decided.

``python -m kernelrl.actors.eval_judge`` is started by ``EvalWorker``. It holds the problem code, the
reference outputs, the comparison, the baseline timing and the verdict. Candidate code never runs here:
for each job the judge has its zygote (``eval_runner``) fork a fresh runner, talks to it over a socket
made for that job, and treats everything the runner says as a claim to check. A frame for another job,
garbage, a second answer or a runner that dies all end the job with a verdict that is not correct.

Trials and tolerances are in ``eval_checks``. A transformed trial whose reference output is not finite
where the base trial's was is skipped and reported. Odd trials send the inputs to the runner before the
reference runs. On a GPU the runner's timings must fit inside the wall time the judge observed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from kernelrl.actors import eval_protocol as p
from kernelrl.actors.eval_checks import (
    DEFAULT_TOLERANCE,
    TRIAL_INPUTS,
    all_finite,
    compare,
    fingerprint_bounds,
    output_scales,
    tolerance_for,
    trial_inputs,
)
from kernelrl.actors.eval_sandbox import apply_limits, die_with_parent, isolate_network
from kernelrl.actors.eval_zygote import SIGNAL_KINDS, RunnerGone, RunnerSession, Zygote, candidate_frames
from kernelrl.core import messages as m
from kernelrl.core.config import WorkerLimits

RUNNER_FAILURE_KINDS = frozenset(
    {"syntax", "import", "compile", "runtime", "forbidden", "resource", "out_of_memory", "cuda_fault", "shape", "timeout"}
)
N_CHECKED_TIMED_RUNS = 5
TIMING_SLACK = 1.05  # the runner's kernel times may not add up to more than the wall time the judge saw


# ---------------------------------------------------------------- one job


class JudgeContext:
    def __init__(self, device: str, zygote: Zygote, limits: WorkerLimits, max_output_mb: int,
                 report_phase: Callable[[str], None], report_running: Callable[[str], None]) -> None:  # fmt: skip
        self.device = device
        self.zygote = zygote
        self.limits = limits
        self.max_frame_bytes = max_output_mb << 20
        self.report_phase = report_phase
        self.report_running = report_running
        self.session: RunnerSession | None = None
        self.current_phase = "load"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@contextlib.contextmanager
def blame_reference(ctx: JudgeContext) -> Iterator[None]:
    """Failures in here are the problem's, not the candidate's: ``bad_problem``.

    The judge tells its parent it is running the reference, so that if the reference kills the process
    (an op this CPU cannot run) the verdict is ``cannot_verify``, never a wrong answer.
    """
    from kernelrl.actors.eval_pipeline import CheckFailure

    ctx.report_running("reference")
    try:
        yield
    except CheckFailure:
        raise
    except Exception as exc:
        raise CheckFailure("bad_problem", f"the reference program failed: {type(exc).__name__}: {exc}") from exc
    finally:
        ctx.report_running("candidate")


class Verdict:
    """The job's running state: what the result will say."""

    def __init__(self) -> None:
        self.compiled = False
        self.max_abs: float | None = None
        self.rel: float | None = None
        self.skipped: list[str] = []
        self.timings: dict[str, float] = {}
        self.cand_times: list[float] = []
        self.ref_times: list[float] = []
        self.tolerances: set[tuple[float, float]] = set()

    def errors(self, trial_abs: float, trial_rel: float) -> None:
        self.max_abs = trial_abs if self.max_abs is None else max(self.max_abs, trial_abs)
        self.rel = trial_rel if self.rel is None else max(self.rel, trial_rel)

    def failed(self, kind: str, message: str) -> m.EvalResult:
        from kernelrl.actors.eval_pipeline import bounded

        return m.EvalResult(
            compiled=self.compiled,
            correctness=False,
            error_kind=kind,
            error_message=bounded(message),
            max_abs_error=self.max_abs if self.max_abs is not None and math.isfinite(self.max_abs) else None,
            rel_error=self.rel if self.rel is not None and math.isfinite(self.rel) else None,
            timings=self.timings,
            skipped_trials=self.skipped,
        )


def judge_job(job: p.WorkerJob, ctx: JudgeContext, job_dir: Path) -> m.EvalResult:
    """Load, check and (on a GPU) time one candidate in a fresh runner; every failure becomes an EvalResult."""
    from kernelrl.actors.eval_pipeline import CheckFailure

    verdict = Verdict()
    ctx.session, ctx.current_phase = None, "load"
    try:
        result = _judge(job, ctx, job_dir, verdict)
        if ctx.session is not None:
            ctx.session.assert_quiet()
        return result
    except CheckFailure as failure:
        return verdict.failed(failure.error_kind, failure.message)
    except p.ProtocolViolation as exc:
        return verdict.failed("forbidden", f"the candidate tampered with the evaluation channel: {exc}")
    except TimeoutError:
        limit = ctx.limits.phase_limit(ctx.current_phase)
        return verdict.failed("timeout", f"the {ctx.current_phase} phase exceeded its {limit:.0f}s limit")
    except RunnerGone:
        return _runner_died(ctx, ctx.session, verdict, ctx.current_phase)
    except Exception as exc:  # the judge's own failure is never the candidate's
        return verdict.failed("cannot_verify", f"the evaluator could not judge this candidate: {type(exc).__name__}: {exc}")
    finally:
        if ctx.session is not None:
            ctx.session.close()  # a runner serves one job: whatever it left behind dies with it
        ctx.session = None


def _runner_died(ctx: JudgeContext, session: RunnerSession | None, verdict: Verdict, phase: str) -> m.EvalResult:
    code = session.close(grace_s=5.0) if session is not None else -int(signal.SIGKILL)
    if not ctx.zygote.alive:
        return verdict.failed("cannot_verify", f"the evaluator's zygote process died during the {phase} phase, and the "
                              "candidate's runner with it; it could not be judged")  # fmt: skip
    kind, what = "crash", f"exited with status {code}"
    if code < 0:
        kind, what = SIGNAL_KINDS.get(-code, ("crash", f"died of signal {-code}"))
    if kind == "crash" and ctx.on_gpu:
        kind = "cuda_fault"
    message = f"the candidate's process {what} during the {phase} phase"
    frames = candidate_frames(session.log_tail()) if session is not None else ""
    if frames:
        message += "\n" + frames
    return verdict.failed(kind, message[-2000:])


def _judge(job: p.WorkerJob, ctx: JudgeContext, job_dir: Path, verdict: Verdict) -> m.EvalResult:
    import torch

    from kernelrl.actors import eval_pipeline as pipeline
    from kernelrl.actors.eval_tensors import pack_values, unpack_values, value_digests

    settings = job.settings
    ctx.current_phase = "load"
    ctx.report_phase("load")
    t0 = time.perf_counter()
    reference_path = job_dir / "reference.py"
    reference_path.write_text(job.problem_source)
    tag = job_dir.name.replace("-", "_")
    with blame_reference(ctx):
        problem = pipeline.load_module(reference_path, f"krl_reference_{tag}")
        init_inputs = list(problem.get_init_inputs())
        torch.manual_seed(pipeline.BASE_SEED)
        reference = problem.Model(*init_inputs).to(ctx.device).eval()
        packed_init = pack_values(init_inputs)

    def tol(dtype_name: str) -> tuple[float, float]:
        pair = tolerance_for(dtype_name, problem, settings)
        verdict.tolerances.add(pair)
        return pair

    runner_dir = job_dir / "runner"
    runner_dir.mkdir()
    session = RunnerSession(ctx.zygote, runner_dir, job.job_id, ctx.max_frame_bytes)
    ctx.session = session
    deadline = time.monotonic() + ctx.limits.load_time_s
    run_job = p.RunJob(job_id=job.job_id, nonce=session.nonce, candidate_source=job.candidate_source,
                       init_values=packed_init, device=ctx.device, cpu_seconds=ctx.limits.cpu_seconds_per_job)  # fmt: skip
    session.send(run_job, deadline)
    reply = session.receive(deadline)
    _raise_if_failed(reply)
    if not isinstance(reply, p.RunnerLoaded):
        raise p.ProtocolViolation(f"expected the load report, got {type(reply).__name__}")
    verdict.timings["load_s"] = time.perf_counter() - t0

    ctx.current_phase = "correctness"
    ctx.report_phase("correctness")
    t0 = time.perf_counter()
    deadline = time.monotonic() + ctx.limits.correctness_time_s
    base_finite = True
    base_scales: list[float] = []
    checked = 0
    for trial in range(settings.n_trials):
        description = TRIAL_INPUTS.get(trial % len(TRIAL_INPUTS), "")
        with torch.no_grad(), blame_reference(ctx):
            inputs = trial_inputs(problem, trial % len(TRIAL_INPUTS), ctx.device)
            sent_digests = value_digests(inputs)
            packed = pack_values(inputs)
        candidate_first = trial % 2 == 1
        if not candidate_first:
            expected = _run_reference(ctx, reference, inputs, verdict)
        session.send(p.RunTrial(trial, packed), deadline)
        if candidate_first:
            expected = _run_reference(ctx, reference, inputs, verdict)
        reply = session.receive(deadline)
        _raise_if_failed(reply, trial, description)
        if not isinstance(reply, p.TrialOutput) or reply.trial != trial:
            raise p.ProtocolViolation(f"expected trial {trial}'s output, got {type(reply).__name__}")
        verdict.compiled = True
        finite = all_finite(expected)
        if trial == 0:
            base_finite, base_scales = finite, output_scales(expected)
        elif base_finite and not finite:
            verdict.skipped.append(f"trial {trial + 1} (inputs {description}): the reference output is not finite")
            continue
        where = f"trial {trial + 1}/{settings.n_trials} (inputs {description})"
        _check_trial_claims(reply, sent_digests, where)
        out = unpack_values(reply.outputs, ctx.device)
        kind, message, trial_abs, trial_rel = compare(expected, out, tol, base_scales if trial else None)
        verdict.errors(trial_abs, trial_rel)
        if kind:
            raise pipeline.CheckFailure(kind, f"{where}: {message}")
        verdict.cand_times.append(reply.elapsed_s)
        checked += 1
    if checked == 0:
        raise pipeline.CheckFailure("bad_problem", "no trial had a finite reference output to compare with")
    verdict.timings["correctness_s"] = time.perf_counter() - t0
    atol, rtol = max(verdict.tolerances) if verdict.tolerances else (DEFAULT_TOLERANCE, DEFAULT_TOLERANCE)
    common = dict(compiled=True, correctness=True, max_abs_error=verdict.max_abs, rel_error=verdict.rel,
                  skipped_trials=verdict.skipped, atol=atol, rtol=rtol)  # fmt: skip

    if not ctx.on_gpu:
        result = m.EvalResult(
            runtime=1000 * statistics.median(verdict.cand_times),
            baseline_runtime=1000 * statistics.median(verdict.ref_times) if verdict.ref_times else -1.0,
            speedup=0.0,
            interpreter=True,
            timings=verdict.timings,
            **common,  # type: ignore[arg-type]
        )
        return result
    if not settings.benchmark:
        return m.EvalResult(timings=verdict.timings, **common)  # type: ignore[arg-type]
    return _benchmark(job, ctx, problem, reference, session, verdict, tol, common)


def _run_reference(ctx: JudgeContext, reference: Any, inputs: list[Any], verdict: Verdict) -> Any:
    import torch

    from kernelrl.actors.eval_pipeline import clone_value, sync

    with torch.no_grad(), blame_reference(ctx):
        sync(ctx.device)
        t = time.perf_counter()
        expected = reference(*[clone_value(x) for x in inputs])
        sync(ctx.device)
        verdict.ref_times.append(time.perf_counter() - t)
    return expected


def _raise_if_failed(reply: Any, trial: int | None = None, description: str = "") -> None:
    from kernelrl.actors.eval_pipeline import CheckFailure

    if isinstance(reply, p.RunnerFailed):
        kind = reply.error_kind if reply.error_kind in RUNNER_FAILURE_KINDS else "runtime"
        where = f"trial {trial + 1} (inputs {description}): " if trial is not None and kind == "shape" else ""
        raise CheckFailure(kind, where + reply.message)


def _check_trial_claims(reply: p.TrialOutput, sent_digests: list[str], where: str) -> None:
    """What the runner recorded around the call: launches, torch compute, inputs changed or aliased."""
    from kernelrl.actors.eval_pipeline import CheckFailure

    if reply.launches <= 0:
        raise CheckFailure("kernel_not_run", "ModelNew.forward returned without launching a Triton kernel")
    if reply.torch_ops:
        ops = ", ".join(reply.torch_ops[:8])
        raise CheckFailure("forbidden", f"{where}: ModelNew.forward computed with PyTorch outside its Triton kernels ({ops}); "
                           "only allocation, views, copies and fills may run outside a kernel")  # fmt: skip
    if reply.aliased_inputs:
        raise CheckFailure("mutates_input", f"{where}: an output shares storage with input {reply.aliased_inputs[0]}; "
                           "write results into a new tensor")  # fmt: skip
    if len(reply.input_digests) != len(sent_digests):
        count = len(reply.input_digests)
        raise CheckFailure("forbidden", f"{where}: the runner reported {count} inputs, not {len(sent_digests)}")
    for i, (sent, after) in enumerate(zip(sent_digests, reply.input_digests, strict=True)):
        if sent != after:
            raise CheckFailure("mutates_input", f"{where}: ModelNew.forward modified input {i}")


def _benchmark(job: p.WorkerJob, ctx: JudgeContext, problem: ModuleType, reference: Any, session: RunnerSession,
               verdict: Verdict, tol: Callable[[str], tuple[float, float]], common: dict[str, Any]) -> m.EvalResult:  # fmt: skip
    import torch

    from kernelrl.actors import eval_pipeline as pipeline
    from kernelrl.actors.eval_tensors import pack_values, unpack_values

    settings = job.settings
    ctx.current_phase = "benchmark"
    ctx.report_phase("benchmark")
    t0 = time.perf_counter()
    chance = random.SystemRandom()
    with torch.no_grad(), blame_reference(ctx):
        # two fresh input sets the candidate has never seen, in an order it cannot predict: an output
        # remembered from the trials or from an earlier call is the wrong answer
        seed = chance.randrange(1 << 30)
        input_sets = [trial_inputs(problem, trial, ctx.device, seed=seed) for trial in (0, 1)]
        expected = [reference(*[pipeline.clone_value(x) for x in inputs]) for inputs in input_sets]
    n_runs = settings.n_timed_runs
    order = [chance.randrange(len(input_sets)) for _ in range(n_runs)]
    fingerprint_seed = chance.randrange(1 << 30)
    bounds = [fingerprint_bounds(e, fingerprint_seed, tol) for e in expected]
    checked_runs = sorted(chance.sample(range(n_runs), min(N_CHECKED_TIMED_RUNS - 1, n_runs)))
    if n_runs - 1 not in checked_runs:
        checked_runs.append(n_runs - 1)
    packed_sets = [pack_values(inputs) for inputs in input_sets]
    sent_at = time.monotonic()
    deadline = sent_at + ctx.limits.benchmark_time_s
    session.send(p.RunBenchmark(input_sets=packed_sets, order=order, n_warmup=10, n_runs=n_runs, checked_runs=checked_runs,
                                fingerprint_seed=fingerprint_seed), deadline)  # fmt: skip
    reply = session.receive(deadline)
    wall_s = time.monotonic() - sent_at
    _raise_if_failed(reply)
    if not isinstance(reply, p.BenchmarkOutput):
        raise p.ProtocolViolation(f"expected the benchmark timings, got {type(reply).__name__}")
    times = reply.times_ms
    if len(times) != n_runs or len(reply.checked_outputs) != len(checked_runs) or len(reply.fingerprints) != n_runs:
        raise pipeline.CheckFailure("forbidden", f"the benchmark reported {len(times)} timings for {n_runs} runs")
    if not all(math.isfinite(t) and t > 0 for t in times) or sum(times) / 1000 > wall_s * TIMING_SLACK:
        raise pipeline.CheckFailure("forbidden", f"implausible timings: {sum(times) / 1000:.3f}s of kernel time reported "
                                    f"in {wall_s:.3f}s of wall time")  # fmt: skip
    if reply.min_launches <= 0:
        raise pipeline.CheckFailure("kernel_not_run", "a timed call of ModelNew.forward launched no Triton kernel")
    if reply.torch_ops:
        raise pipeline.CheckFailure("forbidden", "timed run: ModelNew.forward computed with PyTorch outside its Triton "
                                    f"kernels ({', '.join(reply.torch_ops[:8])})")  # fmt: skip
    for run, row in enumerate(reply.fingerprints):  # every timed call's outputs, not only the checked ones
        expected_row = bounds[order[run]]
        if len(row) != len(expected_row) or not all(
            math.isfinite(got) and abs(got - value) <= room for got, (value, room) in zip(row, expected_row, strict=True)
        ):
            raise pipeline.CheckFailure("mismatch", f"timed run {run + 1}: the output differs from the reference "
                                        "(its fingerprint is off)")  # fmt: skip
    for run, packed in zip(checked_runs, reply.checked_outputs, strict=True):
        kind, message, _, _ = compare(expected[order[run]], unpack_values(packed, ctx.device), tol)
        if kind:
            raise pipeline.CheckFailure(kind, f"timed run {run + 1}: {message}")
    stats = pipeline.timing_stats(times)
    baseline_ms = job.baseline_ms
    if baseline_ms is None:
        with torch.no_grad(), blame_reference(ctx):
            baseline_times, _ = pipeline.time_cuda(reference, input_sets, n_runs, order=order)
        baseline_ms = statistics.median(baseline_times)
    verdict.timings["benchmark_s"] = time.perf_counter() - t0
    speedup = baseline_ms / stats["median"] if stats["median"] > 0 else 0.0
    return m.EvalResult(
        runtime=stats["median"],
        baseline_runtime=baseline_ms,
        speedup=speedup,
        runtime_stats=stats,
        speedup_flagged=speedup > pipeline.SPEEDUP_FLAG,
        timings=verdict.timings,
        **common,
    )


# ---------------------------------------------------------------- the judge process


def judge_main(device: str, limits: WorkerLimits, root: Path) -> int:
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # reference prints go to the worker log, never into the protocol
    import faulthandler

    faulthandler.enable()
    die_with_parent()
    on_gpu = device.startswith("cuda")
    apply_limits(limits, on_gpu)
    zygote = Zygote(device, limits, root)
    zygote.start()  # before this process touches CUDA; the zygote confines itself
    isolate_network()

    import torch
    import triton

    device_name = torch.cuda.get_device_name(0) if on_gpu else "cpu (Triton interpreter)"
    p.WORKER_FRAMES.write(
        proto_out,
        p.WorkerReady(device_name=device_name, torch_version=str(torch.__version__),
                      triton_version=str(triton.__version__), network=zygote.network,
                      confinement=zygote.confinement),
    )  # fmt: skip
    torch_device = "cuda:0" if on_gpu else "cpu"
    jobs_root = root / "jobs"
    jobs_root.mkdir(exist_ok=True)
    while True:
        frame = p.WORKER_FRAMES.read(proto_in)
        if frame is None:
            zygote.stop()
            return 0
        if not isinstance(frame, p.WorkerJob):
            return 2
        job_id = frame.job_id
        ctx = JudgeContext(
            device=torch_device,
            zygote=zygote,
            limits=limits,
            max_output_mb=limits.max_output_mb,
            report_phase=lambda name, j=job_id: p.WORKER_FRAMES.write(proto_out, p.WorkerPhase(j, name)),
            report_running=lambda who, j=job_id: p.WORKER_FRAMES.write(proto_out, p.WorkerRunning(j, who)),
        )
        job_dir = Path(tempfile.mkdtemp(prefix=f"job-{job_id[:12]}-", dir=jobs_root))
        os.chdir(job_dir)
        result = judge_job(frame, ctx, job_dir)
        p.WORKER_FRAMES.write(proto_out, p.WorkerDone(job_id, result))
        os.chdir(root)
        shutil.rmtree(job_dir, ignore_errors=True)
        for name in [n for n in sys.modules if n.startswith("krl_reference_")]:
            del sys.modules[name]


def main() -> int:
    parser = argparse.ArgumentParser(description="kernelrl evaluation judge (started by EvalWorker)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--limits", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    return judge_main(args.device, msgspec.json.decode(args.limits, type=WorkerLimits), Path(args.root))


if __name__ == "__main__":
    sys.exit(main())
