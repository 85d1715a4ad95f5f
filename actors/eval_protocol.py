"""The frames that cross the evaluator's process boundaries, and the length-prefixed framing.

Three links:
- evaluator ↔ judge (``EvalWorker`` ↔ ``eval_judge``): pipes; ``WorkerJob`` in, phases and ``WorkerDone`` out.
  Every frame after the job names the job it belongs to.
- judge ↔ zygote (``eval_runner``): a SOCK_SEQPACKET socket; ``ForkRunner`` carries the runner's end of a
  fresh per-job socket as ancillary data; the zygote answers ``RunnerForked`` and, on ``ReapRunner``,
  ``RunnerReaped`` with the exit status.
- judge ↔ runner: the per-job socket. The judge sends ``RunJob`` (with a nonce the runner learns only
  then), trials and the benchmark; the runner answers with raw material only (outputs, launch and
  dispatch records, digests, timings), each frame carrying the job id and nonce. The judge decides.

A frame whose length exceeds the reader's bound, that does not decode, or that names another job is a
``ProtocolViolation`` (never a crash of the reader).
"""

from __future__ import annotations

import os
import select
import struct
import time
from typing import Any

import msgspec

from kernelrl.core import messages as m

_HEADER = struct.Struct(">I")
MAX_CONTROL_FRAME = 64 << 20


class ProtocolViolation(Exception):
    """A frame that is not what the reader expected: garbage, oversized, another job's, out of order."""


# ---------------------------------------------------------------- evaluator ↔ judge


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
    confinement: str = ""


class WorkerPhase(msgspec.Struct, tag="phase", frozen=True):
    job_id: str
    name: str


class WorkerRunning(msgspec.Struct, tag="running", frozen=True):
    """Whose code the judge is running now: ``reference`` or ``candidate`` (in the runner)."""

    job_id: str
    who: str


class WorkerDone(msgspec.Struct, tag="done", frozen=True):
    job_id: str
    result: m.EvalResult


WorkerFrame = WorkerJob | WorkerReady | WorkerPhase | WorkerRunning | WorkerDone

# ---------------------------------------------------------------- judge ↔ zygote


class ZygoteReady(msgspec.Struct, tag="zready", frozen=True):
    pid: int
    network: str
    confinement: str  # what each runner gets beyond the sandbox (``eval_sandbox.confine_to_job``)


class ForkRunner(msgspec.Struct, tag="fork", frozen=True):
    job_dir: str


class RunnerForked(msgspec.Struct, tag="forked", frozen=True):
    pid: int


class ReapRunner(msgspec.Struct, tag="reap", frozen=True):
    pid: int
    grace_s: float = 0.0  # wait this long for it to exit by itself before killing it


class RunnerReaped(msgspec.Struct, tag="reaped", frozen=True):
    pid: int
    status: int  # as os.waitstatus_to_exitcode: negative = killed by that signal


ZygoteFrame = ZygoteReady | ForkRunner | RunnerForked | ReapRunner | RunnerReaped

# ---------------------------------------------------------------- judge ↔ runner (per job)


class PackedValues(msgspec.Struct, frozen=True):
    """Tensors as one safetensors blob (no pickle) plus the structure around them (``eval_tensors``)."""

    blob: bytes
    layout: Any  # nested lists of {"t": key, "d": device type} | {"s": scalar} | {"l"/"u": [...]} ; checked on unpack


class RunJob(msgspec.Struct, tag="run", frozen=True, kw_only=True):
    job_id: str
    nonce: str
    candidate_source: str
    init_values: PackedValues
    device: str
    cpu_seconds: int


class RunTrial(msgspec.Struct, tag="trial", frozen=True):
    trial: int
    inputs: PackedValues


class RunBenchmark(msgspec.Struct, tag="bench", frozen=True, kw_only=True):
    input_sets: list[PackedValues]
    order: list[int]  # timed run i uses input_sets[order[i]]
    n_warmup: int
    n_runs: int
    checked_runs: list[int]  # runs whose output comes back and whose torch ops are recorded
    fingerprint_seed: int  # every run's outputs are fingerprinted with weights from this seed


class RunnerLoaded(msgspec.Struct, tag="loaded", frozen=True, kw_only=True):
    job_id: str
    nonce: str


class RunnerFailed(msgspec.Struct, tag="failed", frozen=True, kw_only=True):
    """The candidate raised: the runner's classification and message (it can only lower a verdict)."""

    job_id: str
    nonce: str
    phase: str
    error_kind: str
    message: str


class TrialOutput(msgspec.Struct, tag="output", frozen=True, kw_only=True):
    job_id: str
    nonce: str
    trial: int
    outputs: PackedValues
    launches: int
    torch_ops: list[str]
    input_digests: list[str]
    aliased_inputs: list[int]
    elapsed_s: float


class BenchmarkOutput(msgspec.Struct, tag="timed", frozen=True, kw_only=True):
    job_id: str
    nonce: str
    times_ms: list[float]
    fingerprints: list[list[float]]  # per run, per output tensor: sum(output * weights)
    min_launches: int
    torch_ops: list[str]
    checked_outputs: list[PackedValues]


JudgeToRunner = RunJob | RunTrial | RunBenchmark
RunnerToJudge = RunnerLoaded | RunnerFailed | TrialOutput | BenchmarkOutput

# ---------------------------------------------------------------- framing


class FrameCodec:
    """Length-prefixed msgpack frames of one tagged union, with a size bound on reads."""

    def __init__(self, union: Any, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(union)

    def write(self, fd: int, frame: Any, deadline: float | None = None) -> None:
        """Write one frame; with a ``deadline``, TimeoutError if the reader has not taken it by then."""
        data = self._encoder.encode(frame)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                    raise TimeoutError
            view = view[os.write(fd, view[: 1 << 20]) :]

    def read(self, fd: int, deadline: float | None = None) -> Any:
        """The next frame; None at a clean EOF; TimeoutError past ``deadline``; ProtocolViolation on garbage."""
        header = read_exact(fd, _HEADER.size, deadline)
        if header is None:
            return None
        size = _HEADER.unpack(header)[0]
        if size > self.max_bytes:
            raise ProtocolViolation(f"a frame of {size} bytes (limit {self.max_bytes})")
        body = read_exact(fd, size, deadline)
        if body is None:
            raise ProtocolViolation("the channel closed in the middle of a frame")
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise ProtocolViolation(f"an undecodable frame ({exc})") from exc


def read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes, or None at EOF before the first byte; raises TimeoutError past the deadline."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 24))
        if not chunk:
            if got == 0:
                return None
            raise ProtocolViolation(f"the channel closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


WORKER_FRAMES = FrameCodec(WorkerFrame, MAX_CONTROL_FRAME)
JUDGE_TO_RUNNER = FrameCodec(JudgeToRunner, 1 << 34)
