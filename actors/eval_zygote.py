"""The judge's side of the runners: its zygote, one ``RunnerSession`` per job, and how a runner died.

The zygote (``eval_runner``) forks a runner per job; the judge hands it one end of a fresh socket made
for that job. ``RunnerSession`` holds the other end and accepts only frames that carry the job's id and
the nonce generated for it; ``close`` kills the runner's process group (a runner serves one job).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from kernelrl.actors import eval_protocol as p
from kernelrl.core.config import WorkerLimits

SIGNAL_KINDS = {
    signal.SIGXCPU: ("timeout", "ran out of CPU time"),
    signal.SIGXFSZ: ("resource", "wrote more than the file-size limit"),
    signal.SIGKILL: ("out_of_memory", "was killed (out of memory?)"),
    signal.SIGSEGV: ("crash", "crashed with a segmentation fault (an out-of-bounds memory access?)"),
    signal.SIGBUS: ("crash", "crashed with a bus error (a misaligned or out-of-bounds access?)"),
    signal.SIGABRT: ("crash", "aborted"),
    signal.SIGILL: ("crash", "executed an illegal instruction"),
    signal.SIGFPE: ("crash", "raised a floating-point exception"),
}


class RunnerGone(Exception):
    """The runner exited (crash, signal, its own exit) before answering."""


# ---------------------------------------------------------------- the zygote and its runners


class Zygote:
    """The judge's handle on its zygote: fork a runner with a fresh per-job socket, reap it."""

    def __init__(self, device: str, limits: WorkerLimits, root: Path) -> None:
        self.device = device
        self.limits = limits
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.network = ""
        self.confinement = ""
        self.restarts = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(p.ZygoteFrame)

    def start(self, timeout_s: float = 300.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        limits_json = msgspec.json.encode(self.limits).decode()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "kernelrl.actors.eval_runner", "--control-fd", str(theirs.fileno()),
             "--device", self.device, "--limits", limits_json],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, cwd=self.root,
            env={**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},  # a device-count check must not initialise CUDA
        )  # fmt: skip
        theirs.close()
        self.control = ours
        ours.settimeout(timeout_s)
        ready = self._receive()
        ours.settimeout(None)
        if not isinstance(ready, p.ZygoteReady):
            raise RuntimeError(f"the evaluation zygote did not start: {ready!r}")
        self.network = ready.network
        self.confinement = ready.confinement

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _receive(self) -> Any:
        assert self.control is not None
        data = self.control.recv(1 << 16)
        if not data:
            raise RuntimeError("the evaluation zygote exited")
        return self._decoder.decode(data)

    def fork(self, job_dir: Path) -> tuple[int, socket.socket]:
        """A new runner's pid and the judge's end of its socket; a zygote that died is restarted once."""
        for attempt in (1, 2):
            if not self.alive:
                self.stop()
                self.start()
                self.restarts += 1
            try:
                return self._fork(job_dir)
            except (OSError, RuntimeError, msgspec.DecodeError):
                if attempt == 2:
                    raise
                self.stop()
        raise AssertionError("unreachable")

    def _fork(self, job_dir: Path) -> tuple[int, socket.socket]:
        assert self.control is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.control, [self._encoder.encode(p.ForkRunner(job_dir=str(job_dir)))], [theirs.fileno()])
        finally:
            theirs.close()
        forked = self._receive()
        if not isinstance(forked, p.RunnerForked):
            ours.close()
            raise RuntimeError(f"the evaluation zygote answered {forked!r}")
        return forked.pid, ours

    def reap(self, pid: int, grace_s: float) -> int:
        """The runner's exit code (negative: killed by that signal).

        ``grace_s`` > 0: a runner that closed its channel gets that long to exit by itself, so its own death
        (a segfault, say) is what is reported; then, or at once with 0, its keeper's process group is killed.
        """
        if grace_s <= 0:
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    target()
        if self.control is None:
            return -int(signal.SIGKILL)
        try:
            self.control.send(self._encoder.encode(p.ReapRunner(pid=pid, grace_s=grace_s)))
            reaped = self._receive()
        except (OSError, RuntimeError, msgspec.DecodeError):  # the zygote died, and its runners with it
            self.stop()
            return -int(signal.SIGKILL)
        return reaped.status if isinstance(reaped, p.RunnerReaped) else -int(signal.SIGKILL)

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


class RunnerSession:
    """One runner, one job: every frame it sends must name this job and nonce and come in order."""

    def __init__(self, zygote: Zygote, job_dir: Path, job_id: str, max_frame_bytes: int) -> None:
        self.zygote = zygote
        self.job_dir = job_dir
        self.job_id = job_id
        self.nonce = secrets.token_hex(16)
        self.codec = p.FrameCodec(p.RunnerToJudge, max_frame_bytes)
        self.pid, self.sock = zygote.fork(job_dir)
        self.exit_code: int | None = None

    def send(self, frame: Any, deadline: float) -> None:
        """TimeoutError if the runner does not take the frame by ``deadline``; RunnerGone if it exited."""
        try:
            p.JUDGE_TO_RUNNER.write(self.sock.fileno(), frame, deadline)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise RunnerGone from exc

    def receive(self, deadline: float) -> p.RunnerLoaded | p.RunnerFailed | p.TrialOutput | p.BenchmarkOutput:
        """The runner's next frame; TimeoutError past the deadline; RunnerGone if it exited."""
        try:
            frame = self.codec.read(self.sock.fileno(), deadline)
        except ConnectionResetError as exc:
            raise RunnerGone from exc
        if frame is None:
            raise RunnerGone
        if frame.job_id != self.job_id or not secrets.compare_digest(frame.nonce, self.nonce):
            raise p.ProtocolViolation("a frame for another job (wrong job id or nonce)")
        return frame

    def assert_quiet(self) -> None:
        """After the last answer the runner has nothing more to say; bytes waiting on the channel are a violation."""
        import select

        if select.select([self.sock], [], [], 0)[0]:
            try:
                extra = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return
            if extra:
                raise p.ProtocolViolation("a frame after the runner's last answer")

    def close(self, grace_s: float = 0.0) -> int:
        """Ends the runner (a runner serves one job: killed at once, or after ``grace_s`` if it is already
        on its way out) and returns its exit code."""
        if self.exit_code is None:
            self.sock.close()
            self.exit_code = self.zygote.reap(self.pid, grace_s)
        return self.exit_code

    def log_tail(self, n_bytes: int = 1500) -> str:
        try:
            data = (self.job_dir / "runner.log").read_bytes()[-n_bytes:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()


def candidate_frames(log_tail: str) -> str:
    """The faulthandler lines that point into the candidate, without the job's temp paths."""
    lines = []
    for line in log_tail.splitlines():
        if line.startswith("Fatal Python error"):
            lines.append(line.strip())
        elif "candidate.py" in line:
            lines.append(re.sub(r'File "[^"]*candidate\.py"', 'File "candidate.py"', line.strip()))
    return "\n".join(lines)
