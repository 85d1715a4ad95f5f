"""The evaluator's handle on its evaluation processes: ``EvalWorker``.

``EvalWorker`` (in the evaluator's process) runs the static gate, then spawns the judge (``python -m
kernelrl.actors.eval_judge``) with a stripped environment, sends it one job at a time over a pipe and
enforces each phase's time limit as a backstop. The judge forks a fresh runner per job from its zygote
(``eval_runner``) and decides the verdict. Every frame from the judge names its job; a frame for
another job, or one that does not decode, replaces the judge and never reaches the caller as a verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from kernelrl.actors import eval_protocol as p
from kernelrl.actors.eval_gate import static_gate
from kernelrl.actors.eval_sandbox import worker_environment
from kernelrl.actors.eval_zygote import SIGNAL_KINDS, candidate_frames
from kernelrl.core import messages as m
from kernelrl.core.config import WorkerLimits

MAX_SOURCE_BYTES = 256 * 1024
JUDGE_GRACE_S = 30.0  # the judge enforces each phase's limit on the runner; this backstop is for the judge itself


class EvalWorker:
    """Owns one worker process; ``evaluate`` is blocking (run it in a thread from asyncio)."""

    def __init__(self, device: str = "cpu", limits: WorkerLimits | None = None, *, static_gate_enabled: bool = True) -> None:
        """``device``: ``cpu`` (Triton interpreter), ``cuda`` (the GPUs this process sees) or ``cuda:N``.

        ``static_gate_enabled=False`` is for tests of the layers beneath the gate (a candidate that got past it).
        """
        self.device = device
        self.limits = limits or WorkerLimits()
        self.on_gpu = device.startswith("cuda")
        self.visible_gpu = device.split(":", 1)[1] if device.startswith("cuda:") else None
        self.static_gate_enabled = static_gate_enabled
        self.ready: p.WorkerReady | None = None
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._root: Path | None = None
        self._baselines: dict[tuple[str, ...], float] = {}
        self._jobs_on_this_worker = 0

    @property
    def pid(self) -> int | None:
        """The judge process's pid while it runs."""
        return self._proc.pid if self.alive and self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 300.0) -> p.WorkerReady:
        if self.alive and self.ready is not None:
            return self.ready
        self._root = Path(tempfile.mkdtemp(prefix="krl-worker-"))
        env = worker_environment(self._root, interpret=not self.on_gpu, visible_gpu=self.visible_gpu)
        limits_json = msgspec.json.encode(self.limits).decode()
        log = open(self._root / "worker.log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "kernelrl.actors.eval_judge", "--device", "cuda" if self.on_gpu else "cpu",
             "--limits", limits_json, "--root", str(self._root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=self._root,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            frame = self._read(time.monotonic() + timeout_s)
        except (TimeoutError, p.ProtocolViolation):
            frame = None
        if not isinstance(frame, p.WorkerReady):
            tail = self._log_tail()
            self.stop()
            raise RuntimeError(f"evaluation worker failed to start on {self.device}:\n{tail}")
        self.ready = frame
        return frame

    def _read(self, deadline: float | None) -> p.WorkerFrame | None:
        assert self._proc is not None and self._proc.stdout is not None
        return p.WORKER_FRAMES.read(self._proc.stdout.fileno(), deadline)

    def evaluate(self, request: m.EvalRequest) -> m.EvalResult:
        """The verdict on one candidate. Never raises for anything the candidate does."""
        t0 = time.perf_counter()
        if (problem := _request_problem(request)) is not None:
            result = problem
        elif not request.problem_source.strip():
            result = m.EvalResult(
                error_kind="bad_problem",
                error_message=f"no reference program for {request.problem_id!r}: the request carries no problem_source "
                "and the evaluator's problem set has no such problem",
            )
        elif self.static_gate_enabled and (rejection := static_gate(request.candidate_source)) is not None:
            result = m.EvalResult(error_kind=rejection.error_kind, error_message=rejection.message)
        else:
            result = self._run_in_worker(request)
        timings = {**result.timings, "total_s": time.perf_counter() - t0}
        return msgspec.structs.replace(
            result,
            eval_id=request.eval_id,
            problem_id=request.problem_id,
            device=self.ready.device_name if self.ready else self.device,
            timings=timings,
        )

    def _run_in_worker(self, request: m.EvalRequest) -> m.EvalResult:
        if self._jobs_on_this_worker >= self.limits.jobs_per_worker:
            self.stop()  # a fresh judge sheds the reference modules and baselines it has loaded
        ready = self.start()
        self._jobs_on_this_worker += 1
        # the reference's own source (requests may carry it) and its size scale decide what the baseline timed
        source_hash = hashlib.sha256(request.problem_source.encode("utf-8", "surrogatepass")).hexdigest()
        scale = os.environ.get("KRL_PROBLEM_SCALE", "1")
        baseline_key = (request.problem_id, source_hash, scale, ready.device_name, ready.torch_version)
        job = p.WorkerJob(
            job_id=request.eval_id,
            problem_source=request.problem_source,
            candidate_source=request.candidate_source,
            settings=request.settings,
            baseline_ms=self._baselines.get(baseline_key),
        )
        assert self._proc is not None and self._proc.stdin is not None
        try:
            p.WORKER_FRAMES.write(self._proc.stdin.fileno(), job)
        except BrokenPipeError:
            return self._worker_died("load", "candidate")
        phase, running = "load", "candidate"
        deadline = time.monotonic() + self.limits.phase_limit(phase) + JUDGE_GRACE_S
        while True:
            try:
                frame = self._read(deadline)
            except TimeoutError:
                self._replace()
                if running == "reference":
                    limit = self.limits.phase_limit(phase)
                    return m.EvalResult(error_kind="cannot_verify", error_message=f"the reference program did not "
                                        f"finish its {phase} phase within {limit:.0f}s on {self.device}")  # fmt: skip
                return m.EvalResult(
                    compiled=phase != "load",
                    error_kind="timeout",
                    error_message=f"the {phase} phase exceeded its {self.limits.phase_limit(phase):.0f}s limit",
                )
            except p.ProtocolViolation as exc:
                self._replace()
                return m.EvalResult(error_kind="cannot_verify", error_message=f"the evaluation judge sent {exc}")
            if frame is None:
                return self._worker_died(phase, running)
            if getattr(frame, "job_id", None) != request.eval_id:
                self._replace()
                return m.EvalResult(error_kind="cannot_verify", error_message="the evaluation judge answered "
                                    f"for another job ({type(frame).__name__}); it was replaced")  # fmt: skip
            if isinstance(frame, p.WorkerRunning):
                running = frame.who
            elif isinstance(frame, p.WorkerPhase):
                phase = frame.name
                deadline = time.monotonic() + self.limits.phase_limit(phase) + JUDGE_GRACE_S
            elif isinstance(frame, p.WorkerDone):
                result = frame.result
                if result.correctness and self.on_gpu and result.baseline_runtime > 0:
                    self._baselines[baseline_key] = result.baseline_runtime
                return result

    def _worker_died(self, phase: str, running: str) -> m.EvalResult:
        assert self._proc is not None
        code = self._proc.wait()
        tail = self._log_tail()
        self._replace()
        kind, what = "crash", f"exited with status {code}"
        if code < 0:
            kind, what = SIGNAL_KINDS.get(signal.Signals(-code), ("crash", f"died of signal {-code}"))
        if running == "reference":
            return m.EvalResult(
                compiled=phase != "load",
                error_kind="cannot_verify",
                error_message=f"the reference program {what.replace('crashed', 'crashes')} on {self.device}; "
                "this candidate cannot be verified here",
            )
        if kind == "crash" and self.on_gpu:
            kind = "cuda_fault"
        message = f"the evaluation judge {what} during the {phase} phase"
        frames = candidate_frames(tail)
        if frames:
            message += "\n" + frames
        return m.EvalResult(compiled=phase != "load", error_kind=kind, error_message=message[-2000:])

    def _log_tail(self, n_bytes: int = 1500) -> str:
        if self._root is None:
            return ""
        try:
            data = (self._root / "worker.log").read_bytes()[-n_bytes:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    def _replace(self) -> None:
        self.stop()
        self.restarts += 1

    def stop(self) -> None:
        proc, self._proc, self.ready = self._proc, None, None
        self._jobs_on_this_worker = 0
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _request_problem(request: m.EvalRequest) -> m.EvalResult | None:
    """A request that cannot be evaluated as sent: an error result naming what is wrong with it."""
    size = len(request.candidate_source.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        return m.EvalResult(error_kind="forbidden", error_message=f"the candidate source is {size} bytes; "
                            f"the limit is {MAX_SOURCE_BYTES}")  # fmt: skip
    if not request.candidate_source.strip():
        return m.EvalResult(error_kind="no_model", error_message="the request carries no candidate source")
    return None
