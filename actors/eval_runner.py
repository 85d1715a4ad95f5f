"""The untrusted side of an evaluation: a warm zygote, and the fresh runner it forks for every job.

The zygote (``python -m kernelrl.actors.eval_runner``, started by the judge) confines itself, imports
torch and Triton, installs the launch counter and the sandbox's audit hook — and never initialises
CUDA, so each forked runner creates its own CUDA context. It never runs candidate code.

A runner serves exactly one job over the per-job socket the judge handed the zygote: it learns the job
id and nonce from ``RunJob``, loads ``ModelNew`` under the sandbox, and for each trial sends back raw
material only: the outputs, the number of Triton launches, the aten ops that computed outside them,
digests of its inputs after the call and which inputs the outputs alias. It never sees the reference
program, the reference outputs or the tolerances; the judge decides. It exits after the job, so
nothing a candidate patched survives into another job.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from kernelrl.actors import eval_protocol as p
from kernelrl.actors.eval_sandbox import (
    Sandbox,
    SandboxViolation,
    allow_cpu_seconds,
    apply_limits,
    confine_to_job,
    die_with_parent,
    isolate_network,
)
from kernelrl.core.config import WorkerLimits

# torch, Triton and the modules that import them are imported inside functions: the zygote confines itself
# (rlimits, a new network or user namespace, which needs a single thread) before anything starts threads.
HOST_ESCAPE_METHODS = (
    "apply_",
    "map_",
    "map2_",
    "tolist",
    "numpy",
    "item",
    "__array__",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__format__",
)
_zygote_encoder = msgspec.msgpack.Encoder()
_zygote_decoder = msgspec.msgpack.Decoder(p.ZygoteFrame)
RUNNER_TO_JUDGE = p.FrameCodec(p.RunnerToJudge, 1 << 20)  # the runner only writes with it; the judge reads with its own bound
JOB_FRAMES = p.FrameCodec(p.JudgeToRunner, 1 << 34)


class RunnerTools:
    """What every runner inherits from the zygote, set up and warmed once.

    The first torch dispatch mode under no_grad imports torch._dynamo (~0.9 s) and the first interpreted
    launch costs ~40 ms; paying them here, before any fork, keeps them out of every job. Nothing here
    touches CUDA.
    """

    def __init__(self, device: str) -> None:
        import torch

        from kernelrl.actors import eval_pipeline as pipeline
        from kernelrl.actors.eval_tensors import pack_values, unpack_values, value_digests

        self.on_gpu = device.startswith("cuda")
        if not self.on_gpu:
            pipeline.patch_triton_interpreter()
        self.launches = pipeline.LaunchCounter()
        self.launches.install()
        probe = torch.zeros(8)
        with torch.no_grad(), pipeline.TorchOpRecorder(self.launches):
            scratch = torch.empty_like(probe)
        if not self.on_gpu:
            from kernelrl.actors.eval_warmup import warm_interpreter

            warm_interpreter(scratch)
        value_digests(unpack_values(pack_values([probe]), "cpu"))
        self.time_cuda = pipeline.time_cuda  # bound before any candidate runs
        self.sandbox = Sandbox([])
        self.sandbox.install()
        self._close_host_escapes()

    def _close_host_escapes(self) -> None:
        """While candidate code runs (grid callables and hooks inside a launch included), tensor methods that
        hand data to host Python or numpy raise, and so does printing a tensor (``str``, ``repr``, ``format``
        switch the dispatch recorder off and read every element): arithmetic there would never be recorded.
        Triton's interpreter reads its arguments through numpy views, not through these."""
        import torch
        import torch._tensor_str

        sandbox = self.sandbox

        def guard(owner: Any, name: str, what: str) -> None:
            original = getattr(owner, name)

            def guarded(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
                if sandbox.active:
                    raise SandboxViolation(f"sandbox: {what} takes data out of torch; compute in a Triton kernel")
                return __original(*args, **kwargs)

            setattr(owner, name, guarded)

        for name in HOST_ESCAPE_METHODS:
            guard(torch.Tensor, name, f"Tensor.{name}()")
        guard(torch._tensor_str, "_str", "printing a tensor")


def zygote_main(control_fd: int, device: str, limits: WorkerLimits) -> int:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    faulthandler.enable()
    die_with_parent()
    apply_limits(limits, device.startswith("cuda"))
    network = isolate_network()
    tools = RunnerTools(device)
    import torch

    if torch.cuda.is_initialized():  # every runner must create its own CUDA context after the fork
        raise RuntimeError("the evaluation zygote initialised CUDA before forking its runners")
    confinement = probe_confinement(Path.cwd())
    control = socket.socket(fileno=control_fd)
    control.send(_zygote_encoder.encode(p.ZygoteReady(pid=os.getpid(), network=network, confinement=confinement)))
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(control, 1 << 16, 1)
        except ConnectionResetError:
            return 0
        if not data:
            return 0
        frame = _zygote_decoder.decode(data)
        if isinstance(frame, p.ForkRunner):
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return 2
            pid = os.fork()
            if pid == 0:
                control.close()
                _keeper_main(fds[0], Path(frame.job_dir), device, limits, tools)
            os.close(fds[0])
            control.send(_zygote_encoder.encode(p.RunnerForked(pid=pid)))
        elif isinstance(frame, p.ReapRunner):
            control.send(_zygote_encoder.encode(p.RunnerReaped(pid=frame.pid, status=_reap(frame.pid, frame.grace_s))))


def _reap(pid: int, grace_s: float) -> int:
    """Wait up to ``grace_s`` for a keeper to exit, then kill its process group; its exit code."""
    deadline = time.monotonic() + grace_s
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
    except ChildProcessError:
        return -int(signal.SIGKILL)


def _keeper_main(sock_fd: int, job_dir: Path, device: str, limits: WorkerLimits, tools: RunnerTools) -> NoReturn:
    """The zygote's child for one job: confines itself (``confine_to_job``), forks the runner as the first
    process of a fresh PID namespace, waits for it and exits the way it did.

    The judge kills the keeper to end a job; the runner dies with it (parent-death signal), and with the
    runner, everything in its namespace.
    """
    code = 1
    try:
        faulthandler.disable()
        os.setsid()
        die_with_parent()
        confine_to_job(job_dir)
        runner = os.fork()
        if runner == 0:
            _runner_main(sock_fd, job_dir, device, limits, tools)
        os.close(sock_fd)
        _, status = os.waitpid(runner, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # die the way the runner died, so the zygote reports its signal
            if -code not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
    except BaseException:  # a keeper reports by its exit status alone
        code = 1
    os._exit(code if code >= 0 else 128 - code)


def probe_confinement(root: Path) -> str:
    """What ``confine_to_job`` achieves on this machine, tried once in a throwaway child."""
    probe_dir = root / "probe"
    probe_dir.mkdir(exist_ok=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, confine_to_job(probe_dir).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        achieved = f.read().decode()
    os.waitpid(pid, 0)
    return achieved or "none (the probe failed)"


def _runner_main(sock_fd: int, job_dir: Path, device: str, limits: WorkerLimits, tools: RunnerTools) -> NoReturn:
    """The runner: one job, then ``os._exit``."""
    code = 0
    try:
        os.setsid()  # its own process group, so the judge can kill it with anything it started
        die_with_parent()
        log = os.open(job_dir / "runner.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        faulthandler.enable()  # a segfault leaves the candidate's lines in the log for the error message
        os.closerange(3, sock_fd)
        os.closerange(sock_fd + 1, 1 << 16)
        os.chdir(job_dir)
        os.environ["TRITON_CACHE_DIR"] = str(job_dir / "triton-cache")
        os.environ["TMPDIR"] = os.environ["HOME"] = str(job_dir)
        tempfile.tempdir = str(job_dir)  # the zygote's tempfile module cached its own directory
        code = Runner(sock_fd, job_dir, device, limits, tools).serve()
    except BaseException:
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
        code = 3
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


class Runner:
    def __init__(self, sock_fd: int, job_dir: Path, device: str, limits: WorkerLimits, tools: RunnerTools) -> None:
        self.fd = sock_fd
        self.job_dir = job_dir
        self.torch_device = "cuda:0" if device.startswith("cuda") else "cpu"
        self.limits = limits
        self.tools = tools
        self.job_id = ""
        self.nonce = ""
        self.model: Any = None
        self.candidate_path = job_dir / "candidate.py"

    def send(self, frame: Any) -> None:
        RUNNER_TO_JUDGE.write(self.fd, frame)

    def fail(self, phase: str, exc: BaseException) -> None:
        from kernelrl.actors import eval_pipeline as pipeline

        kind = exc.error_kind if isinstance(exc, pipeline.CheckFailure) else pipeline.classify_exception(exc)
        message = exc.message if isinstance(exc, pipeline.CheckFailure) else pipeline.describe_exception(exc, self.candidate_path)
        self.send(p.RunnerFailed(job_id=self.job_id, nonce=self.nonce, phase=phase, error_kind=kind, message=message))

    def serve(self) -> int:
        job = JOB_FRAMES.read(self.fd)
        if not isinstance(job, p.RunJob):
            return 2
        self.job_id, self.nonce = job.job_id, job.nonce
        allow_cpu_seconds(job.cpu_seconds)
        if not self.load(job):
            return 0
        while True:
            frame = JOB_FRAMES.read(self.fd)
            if frame is None:
                return 0
            if isinstance(frame, p.RunTrial):
                if not self.trial(frame):
                    return 0
            elif isinstance(frame, p.RunBenchmark):
                if not self.benchmark(frame):
                    return 0
            else:
                return 2

    def load(self, job: p.RunJob) -> bool:
        import torch

        from kernelrl.actors import eval_pipeline as pipeline
        from kernelrl.actors.eval_tensors import unpack_values

        self.candidate_path.write_text(job.candidate_source)
        init_values = unpack_values(job.init_values, "cpu")
        with self.tools.sandbox.enforcing(self.job_dir):
            try:
                module = pipeline.load_module(self.candidate_path, "krl_candidate")
            except SyntaxError as exc:
                self.fail("load", pipeline.CheckFailure("syntax", pipeline.describe_exception(exc, self.candidate_path)))
                return False
            except Exception as exc:
                self.fail("load", pipeline.CheckFailure("import", pipeline.describe_exception(exc, self.candidate_path)))
                return False
            try:
                torch.manual_seed(pipeline.BASE_SEED)
                self.model = module.ModelNew(*init_values).to(self.torch_device).eval()
            except Exception as exc:
                self.fail("load", exc)
                return False
        self.send(p.RunnerLoaded(job_id=self.job_id, nonce=self.nonce))
        return True

    def trial(self, frame: p.RunTrial) -> bool:
        import torch

        from kernelrl.actors import eval_pipeline as pipeline
        from kernelrl.actors.eval_tensors import pack_values, unpack_values, value_digests

        inputs = unpack_values(frame.inputs, self.torch_device)
        recorder = pipeline.TorchOpRecorder(self.tools.launches)
        self.tools.launches.count = 0
        with torch.no_grad(), self.tools.sandbox.enforcing(self.job_dir):
            try:
                t0 = time.perf_counter()
                with recorder:
                    out = plain_outputs(self.model(*inputs))
                pipeline.sync(self.torch_device)
                elapsed = time.perf_counter() - t0
            except Exception as exc:
                self.fail("correctness", exc)
                return False
        launches = self.tools.launches.count
        outputs = pipeline.flatten_outputs(out)
        packed = pack_values(out)
        self.send(
            p.TrialOutput(
                job_id=self.job_id,
                nonce=self.nonce,
                trial=frame.trial,
                outputs=packed,
                launches=launches,
                torch_ops=sorted(recorder.ops),
                input_digests=value_digests(inputs),
                aliased_inputs=_aliased_inputs(inputs, outputs),
                elapsed_s=elapsed,
            )
        )
        pipeline.poison(out)
        return True

    def benchmark(self, frame: p.RunBenchmark) -> bool:
        import torch

        from kernelrl.actors import eval_pipeline as pipeline
        from kernelrl.actors.eval_tensors import pack_values, unpack_values

        input_sets = [unpack_values(packed, self.torch_device) for packed in frame.input_sets]
        recorder = pipeline.TorchOpRecorder(self.tools.launches)
        launches = self.tools.launches
        min_launches = [1 << 30]
        weights: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}
        fingerprints: list[list[torch.Tensor]] = []

        def counted(*args: Any) -> Any:
            launches.count = 0
            out = plain_outputs(self.model(*args))
            min_launches[0] = min(min_launches[0], launches.count)
            return out

        def fingerprint(run: int, out: Any) -> None:
            row = []
            for k, o in enumerate(pipeline.flatten_outputs(out)):
                if isinstance(o, torch.Tensor):
                    key = (k, tuple(o.shape))
                    if key not in weights:
                        weights[key] = [w.to(o.device) for w in pipeline.fingerprint_weights(frame.fingerprint_seed, k, key[1])]
                    o64 = o.detach().double()
                    row.extend((o64 * w.double()).sum() for w in weights[key])
            fingerprints.append(row)

        with torch.no_grad(), self.tools.sandbox.enforcing(self.job_dir):
            try:
                times, checked = self.tools.time_cuda(
                    counted, input_sets, frame.n_runs, frame.n_warmup, frozenset(frame.checked_runs), lambda: recorder,
                    poison_outputs=True, order=frame.order, after_run=fingerprint,
                )  # fmt: skip
            except Exception as exc:
                self.fail("benchmark", exc)
                return False
        self.send(
            p.BenchmarkOutput(
                job_id=self.job_id,
                nonce=self.nonce,
                times_ms=times,
                fingerprints=[[float(f) for f in row] for row in fingerprints],
                min_launches=min_launches[0] if times else 0,
                torch_ops=sorted(recorder.ops),
                checked_outputs=[pack_values(out) for out in checked],
            )
        )
        return True


def plain_outputs(out: Any) -> Any:
    """``forward``'s result as exact tensors and numbers, in a plain tuple, checked while the sandbox and the
    recorder still watch: a subclass or a custom container could compute later, where nothing looks."""
    import torch

    from kernelrl.actors.eval_pipeline import CheckFailure

    def plain(value: Any) -> Any:
        if type(value) is torch.Tensor or type(value) in (int, float, bool) or value is None:
            return value
        raise CheckFailure("shape", f"ModelNew.forward returned a {type(value).__name__}; return tensors (or a "
                           "tuple/list of tensors) as the reference does")  # fmt: skip

    if type(out) in (tuple, list):
        return tuple(plain(v) for v in out)
    return plain(out)


def _aliased_inputs(inputs: list[Any], outputs: list[Any]) -> list[int]:
    """Indices of tensor inputs whose storage an output tensor shares."""
    import torch

    def span(t: torch.Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.data_ptr() + storage.nbytes()

    out_spans = [span(o) for o in outputs if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes()]
    aliased = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes():
            lo, hi = span(x)
            if any(a < hi and lo < b for a, b in out_spans):
                aliased.append(i)
    return aliased


def main() -> int:
    parser = argparse.ArgumentParser(description="kernelrl evaluation zygote (started by the judge)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--limits", required=True)
    args = parser.parse_args()
    return zygote_main(args.control_fd, args.device, msgspec.json.decode(args.limits, type=WorkerLimits))


if __name__ == "__main__":
    sys.exit(main())
