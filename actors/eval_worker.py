"""The evaluation worker: the only process where candidate code runs, and the handle that owns it.

``EvalWorker`` (in the evaluator's process) spawns ``python -m kernelrl.actors.eval_worker`` with a
stripped environment, sends it one job at a time over a pipe, enforces each phase's time limit, and
replaces the worker after a crash, a time-out or a CUDA fault. The worker confines itself
(``eval_sandbox``) before it touches candidate code, and answers every job with an ``EvalResult``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from kernelrl.actors.eval_gate import static_gate
from kernelrl.actors.eval_sandbox import (
    Sandbox,
    WorkerLimits,
    allow_cpu_seconds,
    apply_limits,
    die_with_parent,
    isolate_network,
    worker_environment,
)
from kernelrl.core import messages as m

# ---------------------------------------------------------------- protocol (parent <-> worker pipes)


class WorkerJob(msgspec.Struct, tag="job", frozen=True, kw_only=True):
    job_id: str
    problem_source: str
    candidate_source: str
    settings: m.CheckSettings
    baseline_ms: float | None = None


class WorkerReady(msgspec.Struct, tag="ready", frozen=True, kw_only=True):
    device_name: str
    torch_version: str
    triton_version: str
    network: str


class WorkerPhase(msgspec.Struct, tag="phase", frozen=True):
    name: str


class WorkerRunning(msgspec.Struct, tag="running", frozen=True):
    """Whose code the worker is running now: ``reference`` or ``candidate``."""

    who: str


class WorkerDone(msgspec.Struct, tag="done", frozen=True):
    result: m.EvalResult


Frame = WorkerJob | WorkerReady | WorkerPhase | WorkerRunning | WorkerDone
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Frame)
_HEADER = struct.Struct(">I")


def write_frame(fd: int, frame: Frame) -> None:
    data = _encoder.encode(frame)
    payload = _HEADER.pack(len(data)) + data
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes, or None at EOF; raises TimeoutError past the deadline."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float | None = None) -> Frame | None:
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0], deadline)
    return None if body is None else _decoder.decode(body)


# ---------------------------------------------------------------- the worker process


def _worker_main(device: str, limits: WorkerLimits, root: Path) -> int:
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # candidate prints go to the worker log, never into the protocol
    faulthandler.enable()  # a segfault leaves a Python traceback in the log for the error message
    die_with_parent()
    on_gpu = device.startswith("cuda")
    apply_limits(limits, on_gpu)
    network = isolate_network()

    import torch
    import triton

    from kernelrl.actors import eval_pipeline as pipeline

    if not on_gpu:
        pipeline.patch_triton_interpreter()
    launches = pipeline.LaunchCounter()
    launches.install()
    sandbox = Sandbox([root / "triton-cache", root / "inductor-cache"])
    sandbox.install()
    device_name = torch.cuda.get_device_name(0) if on_gpu else "cpu (Triton interpreter)"
    write_frame(
        proto_out,
        WorkerReady(
            device_name=device_name,
            torch_version=str(torch.__version__),
            triton_version=str(triton.__version__),
            network=network,
        ),
    )
    torch_device = "cuda:0" if on_gpu else "cpu"
    while True:
        frame = read_frame(proto_in)
        if frame is None:
            return 0
        assert isinstance(frame, WorkerJob)
        allow_cpu_seconds(limits.cpu_seconds_per_job)
        job_dir = Path(tempfile.mkdtemp(prefix=f"job-{frame.job_id[:12]}-", dir=root))
        os.chdir(job_dir)
        ctx = pipeline.CheckContext(
            device=torch_device,
            job_dir=job_dir,
            report_phase=lambda name: write_frame(proto_out, WorkerPhase(name)),
            report_running=lambda who: write_frame(proto_out, WorkerRunning(who)),
            launches=launches,
            enforcing=lambda jd=job_dir: sandbox.enforcing(jd),
        )
        result = pipeline.run_checks(frame.problem_source, frame.candidate_source, frame.settings, frame.baseline_ms, ctx)
        write_frame(proto_out, WorkerDone(result))
        os.chdir(root)
        shutil.rmtree(job_dir, ignore_errors=True)
        for name in [n for n in sys.modules if n.startswith(("krl_candidate_", "krl_reference_"))]:
            del sys.modules[name]


# ---------------------------------------------------------------- the handle in the evaluator's process

_SIGNAL_KINDS = {
    signal.SIGXCPU: ("timeout", "ran out of CPU time"),
    signal.SIGXFSZ: ("resource", "wrote more than the file-size limit"),
    signal.SIGKILL: ("out_of_memory", "was killed (out of memory?)"),
    signal.SIGSEGV: ("crash", "crashed with a segmentation fault (an out-of-bounds memory access?)"),
    signal.SIGBUS: ("crash", "crashed with a bus error (a misaligned or out-of-bounds access?)"),
    signal.SIGABRT: ("crash", "aborted"),
    signal.SIGILL: ("crash", "executed an illegal instruction"),
    signal.SIGFPE: ("crash", "raised a floating-point exception"),
}


def candidate_frames(log_tail: str) -> str:
    """The faulthandler lines that point into the candidate, without the worker's temp paths."""
    lines = []
    for line in log_tail.splitlines():
        if line.startswith("Fatal Python error"):
            lines.append(line.strip())
        elif "candidate.py" in line:
            lines.append(re.sub(r'File "[^"]*candidate\.py"', 'File "candidate.py"', line.strip()))
    return "\n".join(lines)


class EvalWorker:
    """Owns one worker process; ``evaluate`` is blocking (run it in a thread from asyncio)."""

    def __init__(self, device: str = "cpu", limits: WorkerLimits | None = None) -> None:
        """``device``: ``cpu`` (Triton interpreter), ``cuda`` (the GPUs this process sees) or ``cuda:N``."""
        self.device = device
        self.limits = limits or WorkerLimits()
        self.on_gpu = device.startswith("cuda")
        self.visible_gpu = device.split(":", 1)[1] if device.startswith("cuda:") else None
        self.ready: WorkerReady | None = None
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._root: Path | None = None
        self._baselines: dict[tuple[str, str, str], float] = {}
        self._jobs_on_this_worker = 0

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 300.0) -> WorkerReady:
        if self.alive and self.ready is not None:
            return self.ready
        self._root = Path(tempfile.mkdtemp(prefix="krl-worker-"))
        env = worker_environment(self._root, interpret=not self.on_gpu, visible_gpu=self.visible_gpu)
        limits_json = msgspec.json.encode(self.limits).decode()
        log = open(self._root / "worker.log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kernelrl.actors.eval_worker", "--device", "cuda" if self.on_gpu else "cpu",
             "--limits", limits_json, "--root", str(self._root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=self._root,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        frame = self._read(time.monotonic() + timeout_s)
        if not isinstance(frame, WorkerReady):
            tail = self._log_tail()
            self.stop()
            raise RuntimeError(f"evaluation worker failed to start on {self.device}:\n{tail}")
        self.ready = frame
        return frame

    def _read(self, deadline: float | None) -> Frame | None:
        assert self._proc is not None and self._proc.stdout is not None
        return read_frame(self._proc.stdout.fileno(), deadline)

    def _phase_limit(self, phase: str) -> float:
        return {
            "load": self.limits.load_time_s,
            "correctness": self.limits.correctness_time_s,
            "benchmark": self.limits.benchmark_time_s,
        }.get(phase, self.limits.load_time_s)

    def evaluate(self, request: m.EvalRequest) -> m.EvalResult:
        """The verdict on one candidate. Never raises for anything the candidate does."""
        t0 = time.perf_counter()
        if not request.problem_source.strip():
            result = m.EvalResult(
                error_kind="bad_problem",
                error_message=f"no reference program for {request.problem_id!r}: the request carries no problem_source "
                "and the evaluator's problem set has no such problem",
            )
        elif (rejection := static_gate(request.candidate_source)) is not None:
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
            self.stop()  # a fresh worker sheds Triton's per-kernel caches
        ready = self.start()
        self._jobs_on_this_worker += 1
        baseline_key = (request.problem_id, ready.device_name, ready.torch_version)
        job = WorkerJob(
            job_id=request.eval_id,
            problem_source=request.problem_source,
            candidate_source=request.candidate_source,
            settings=request.settings,
            baseline_ms=self._baselines.get(baseline_key),
        )
        assert self._proc is not None and self._proc.stdin is not None
        try:
            write_frame(self._proc.stdin.fileno(), job)
        except BrokenPipeError:
            return self._worker_died("load", "candidate")
        phase, running = "load", "candidate"
        deadline = time.monotonic() + self._phase_limit(phase)
        while True:
            try:
                frame = self._read(deadline)
            except TimeoutError:
                self._replace()
                return m.EvalResult(
                    compiled=phase != "load",
                    error_kind="timeout",
                    error_message=f"the {phase} phase exceeded its {self._phase_limit(phase):.0f}s limit",
                )
            if frame is None:
                return self._worker_died(phase, running)
            if isinstance(frame, WorkerRunning):
                running = frame.who
            elif isinstance(frame, WorkerPhase):
                phase = frame.name
                deadline = time.monotonic() + self._phase_limit(phase)
            elif isinstance(frame, WorkerDone):
                result = frame.result
                if result.correctness and self.on_gpu and result.baseline_runtime > 0:
                    self._baselines[baseline_key] = result.baseline_runtime
                if result.error_kind == "cuda_fault":
                    self._replace()  # the CUDA context may be corrupt
                return result

    def _worker_died(self, phase: str, running: str) -> m.EvalResult:
        assert self._proc is not None
        code = self._proc.wait()
        tail = self._log_tail()
        self._replace()
        kind, what = "crash", f"exited with status {code}"
        if code < 0:
            kind, what = _SIGNAL_KINDS.get(signal.Signals(-code), ("crash", f"died of signal {-code}"))
        if running == "reference":
            return m.EvalResult(
                compiled=phase != "load",
                error_kind="cannot_verify",
                error_message=f"the reference program {what.replace('crashed', 'crashes')} on {self.device}; "
                "this candidate cannot be verified here",
            )
        if kind == "crash" and self.on_gpu:
            kind = "cuda_fault"
        message = f"the worker {what} during the {phase} phase"
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


def main() -> int:
    parser = argparse.ArgumentParser(description="kernelrl evaluation worker (started by EvalWorker)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--limits", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    return _worker_main(args.device, msgspec.json.decode(args.limits, type=WorkerLimits), Path(args.root))


if __name__ == "__main__":
    sys.exit(main())
