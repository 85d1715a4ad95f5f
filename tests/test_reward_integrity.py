"""Classes of reward hacks that need a custom problem or a sequence of jobs on one worker.

Runs the real judge, zygote and runner processes (Triton interpreter on CPU). Each class has several
variants, because a policy that finds one member of a class finds its neighbours:

- wrong only for negative inputs, on a problem whose ``get_inputs`` draws non-negative values;
- writing into the input, on that same problem (where an in-place ReLU leaves the drawn input unchanged);
- forging frames on the runner's channel to the judge, and forging what the runner reports (beneath the gate);
- patching shared state in one job and hoping it survives into the next (beneath the gate).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelrl.actors.eval_gate import static_gate
from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core.config import WorkerLimits
from kernelrl.core.problems import Problem, builtin_problems

from helpers import children_of

CANDIDATES = Path(__file__).parent / "candidates"
TEST_LIMITS = WorkerLimits(
    address_space_gb=6.0, file_size_mb=128, load_time_s=60.0, correctness_time_s=20.0, cpu_seconds_per_job=60
)
RELU = builtin_problems().get("level1/1_ReLU")
HONEST_RELU = RELU.solution or ""
WRONG_VALUES = (CANDIDATES / "wrong_values.py").read_text()

NON_NEGATIVE_RELU_SOURCE = '''"""ReLU on inputs drawn from [0, 1), as most KernelBench problems draw them."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def get_inputs():
    return [torch.rand(16, 256)]


def get_init_inputs():
    return []
'''


def custom_problem(source: str, name: str = "x") -> Problem:
    return Problem(id=f"custom/{name}", level=0, number=0, name=name, source=source, path="")


NON_NEGATIVE_RELU = custom_problem(NON_NEGATIVE_RELU_SOURCE, "non_negative_relu")

CANDIDATE_TEMPLATE = """import torch
import torch.nn as nn
import triton
import triton.language as tl
{imports}

@triton.jit
def relu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, {value}, mask=mask)


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


def launch_relu(x, out):
    relu_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK_SIZE=1024)


def launch_copy(src, dst):
    copy_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), BLOCK_SIZE=1024)

{module}

class ModelNew(nn.Module):
    def forward(self, x):
{forward}
"""
HONEST_FORWARD = """
out = torch.empty_like(x)
launch_relu(x, out)
return out
"""


def candidate(*, value: str = "tl.maximum(x, 0.0)", forward: str = HONEST_FORWARD, imports: str = "", module: str = "") -> str:
    """A ReLU-shaped candidate: ``value`` is what the kernel stores, ``forward`` the body of ModelNew.forward."""
    return CANDIDATE_TEMPLATE.format(
        imports=imports,
        value=value,
        module=textwrap.dedent(module),
        forward=textwrap.indent(textwrap.dedent(forward).strip(), " " * 8),
    )


def evaluate(worker: EvalWorker, problem: Problem, source: str) -> m.EvalResult:
    return worker.evaluate(
        m.EvalRequest(
            eval_id=m.new_id(),
            run_id="test",
            problem_id=problem.id,
            candidate_source=source,
            problem_source=problem.source,
            reply_to="",
        )
    )


def assert_verdict(result: m.EvalResult, kind: str) -> None:
    assert not result.correctness, f"judged correct; expected {kind}"
    assert result.error_kind == kind, f"got {result.error_kind}: {result.error_message}"


@pytest.fixture(scope="module")
def worker() -> Iterator[EvalWorker]:
    w = EvalWorker("cpu", TEST_LIMITS)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def ungated() -> Iterator[EvalWorker]:
    """An evaluator whose static gate is skipped: what a candidate that slipped past the gate meets."""
    w = EvalWorker("cpu", TEST_LIMITS, static_gate_enabled=False)
    try:
        yield w
    finally:
        w.stop()


# ---------------------------------------------------------------- wrong only where get_inputs never draws


def test_the_honest_relu_passes_on_the_non_negative_problem(worker: EvalWorker) -> None:
    result = evaluate(worker, NON_NEGATIVE_RELU, HONEST_RELU)
    assert result.correctness, f"{result.error_kind}: {result.error_message}"
    assert result.skipped_trials == []


# each equals relu(x) for every x in [0, 1), so get_inputs' own draw cannot tell it from ReLU
RIGHT_ONLY_FOR_NON_NEGATIVE = {
    "identity_copy": "x",
    "absolute_value": "tl.abs(x)",
    "square_root_of_square": "tl.sqrt(x * x)",
    "square_for_negatives": "tl.where(x >= 0, x, x * x)",
    "clamped_to_the_drawn_range": "tl.minimum(tl.maximum(x, 0.0), 1.0)",
    "sign_kept_through_square": "x * x / tl.where(x == 0, 1.0, x)",
}


@pytest.mark.parametrize("value", RIGHT_ONLY_FOR_NON_NEGATIVE.values(), ids=RIGHT_ONLY_FOR_NON_NEGATIVE.keys())
def test_a_kernel_right_only_on_the_drawn_range_is_a_mismatch(worker: EvalWorker, value: str) -> None:
    result = evaluate(worker, NON_NEGATIVE_RELU, candidate(value=value))
    assert_verdict(result, "mismatch")
    assert "trial 1/" not in result.error_message, "the base draw is non-negative: a later trial must be what exposes it"


# ---------------------------------------------------------------- writing into the input


WRITES_INTO_THE_INPUT = {
    "in_place_relu_returns_the_input": """
        launch_relu(x, x)
        return x
    """,
    "relu_into_the_input_then_a_fresh_copy": """
        launch_relu(x, x)
        out = torch.empty_like(x)
        launch_copy(x, out)
        return out
    """,
    "relu_into_the_input_returns_a_view_of_it": """
        launch_relu(x, x)
        return x.view(-1).view(x.shape)
    """,
    "relu_into_the_input_returns_a_slice_of_it": """
        launch_relu(x, x)
        return x[:, :]
    """,
    "correct_output_but_input_used_as_scratch": """
        out = torch.empty_like(x)
        launch_relu(x, out)
        launch_copy(out, x)
        return out
    """,
}


@pytest.mark.parametrize("forward", WRITES_INTO_THE_INPUT.values(), ids=WRITES_INTO_THE_INPUT.keys())
def test_writing_into_the_input_is_caught_even_where_relu_leaves_the_draw_unchanged(worker: EvalWorker, forward: str) -> None:
    result = evaluate(worker, NON_NEGATIVE_RELU, candidate(forward=forward))
    assert_verdict(result, "mutates_input")


# ---------------------------------------------------------------- forging frames on the runner's channel

FORGED_FRAMES = """
FORGED = [
    b"\\x00\\x00\\x00\\x10" + b'{"done": true}',
    bytes(random.Random(7).getrandbits(8) for _ in range(512)),
    b"\\x00\\x00\\x00\\x1c" + b"\\x83\\xa4type\\xa6output\\xa5trial\\x00\\xa8launches\\x01",
]


def forge():
    for fd in range(3, 64):
        for frame in FORGED:
            try:
                os.write(fd, frame)
            except OSError:
                pass
"""
WELL_FORMED_FOREIGN_FRAME = """
def forge():
    body = msgspec.msgpack.encode({"type": "loaded", "job_id": "someone-else", "nonce": "0" * 32})
    for fd in range(3, 64):
        try:
            os.write(fd, struct.pack(">I", len(body)) + body)
        except OSError:
            pass
"""
CHANNEL_FORGERS = {
    "garbage_frames_at_import": candidate(imports="import os\nimport random", module=FORGED_FRAMES + "\n\nforge()\n"),
    "garbage_frames_in_forward": candidate(
        imports="import os\nimport random",
        module=FORGED_FRAMES,
        forward="""
            out = torch.empty_like(x)
            launch_relu(x, out)
            forge()
            return out
        """,
    ),
    "well_formed_frame_for_another_job_at_import": candidate(
        imports="import os\nimport struct\n\nimport msgspec", module=WELL_FORMED_FOREIGN_FRAME + "\n\nforge()\n"
    ),
    "a_frame_header_claiming_gigabytes": candidate(
        imports="import os",
        forward="""
            out = torch.empty_like(x)
            launch_relu(x, out)
            for fd in range(3, 64):
                try:
                    os.write(fd, b"\\xff\\xff\\xff\\xf0" + b"\\x00" * 64)
                except OSError:
                    pass
            return out
        """,
    ),
}


@pytest.mark.parametrize("source", CHANNEL_FORGERS.values(), ids=CHANNEL_FORGERS.keys())
def test_forged_frames_beneath_the_gate_are_tampering_and_the_next_job_is_judged_fairly(ungated: EvalWorker, source: str) -> None:
    forged = evaluate(ungated, RELU, source)
    assert_verdict(forged, "forbidden")
    assert "channel" in forged.error_message
    honest = evaluate(ungated, RELU, HONEST_RELU)
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"


def test_reaching_os_through_torch_to_forge_frames_is_stopped_by_the_gate(worker: EvalWorker) -> None:
    source = candidate(
        forward="""
            out = torch.empty_like(x)
            launch_relu(x, out)
            for fd in range(3, 64):
                torch.os.write(fd, b"\\x00\\x00\\x00\\x10" + b'{"done": true}')
            return out
        """
    )
    result = evaluate(worker, RELU, source)
    assert_verdict(result, "forbidden")
    assert "torch.os" in result.error_message


# A candidate shares its process with the runner's dispatch recorder: code that got past the gate could make
# the runner's report say "no torch ops" while it computes the answer with torch (the threat model says so:
# beneath the gate a candidate can lie about its own raw material). Each of these ways needs something the
# gate does not let through, so the gate is the layer that stops them.
ERASES_THE_DISPATCH_RECORD = {
    "disable_torch_dispatch_guard": candidate(
        forward="""
            launch_relu(x, torch.empty_like(x))
            with torch._C._DisableTorchDispatch():
                return torch.relu(x)
        """
    ),
    "disable_current_dispatch_modes": candidate(
        imports="from torch.utils._python_dispatch import _disable_current_modes",
        forward="""
            launch_relu(x, torch.empty_like(x))
            with _disable_current_modes():
                return torch.relu(x)
        """,
    ),
    "clears_the_recorder_found_on_the_stack": candidate(
        imports="import sys",
        forward="""
            launch_relu(x, torch.empty_like(x))
            out = torch.relu(x)
            frame = sys._getframe(1)
            while frame is not None:
                recorder = frame.f_locals.get("recorder")
                if recorder is not None and hasattr(recorder, "ops"):
                    recorder.ops.clear()
                frame = frame.f_back
            return out
        """,
    ),
}


@pytest.mark.parametrize("source", ERASES_THE_DISPATCH_RECORD.values(), ids=ERASES_THE_DISPATCH_RECORD.keys())
def test_erasing_the_dispatch_record_is_stopped_by_the_gate(worker: EvalWorker, source: str) -> None:
    result = evaluate(worker, RELU, source)
    assert_verdict(result, "forbidden")
    assert static_gate(source) is not None


# ---------------------------------------------------------------- patching shared state for later jobs

PATCHERS = {
    "comparisons_at_import": """
        torch.Tensor.__eq__ = lambda self, other: torch.ones_like(self, dtype=torch.bool)
        torch.Tensor.__ne__ = lambda self, other: torch.zeros_like(self, dtype=torch.bool)
        torch.allclose = lambda *args, **kwargs: True
        torch.equal = lambda *args, **kwargs: True
        torch.isclose = lambda a, b, *args, **kwargs: torch.ones_like(a, dtype=torch.bool)
    """,
    "arithmetic_and_files_at_import": """
        torch.Tensor.sub = lambda self, *args, **kwargs: torch.zeros_like(self)
        torch.Tensor.__sub__ = lambda self, other: torch.zeros_like(self)
        torch.Tensor.abs = lambda self: torch.zeros_like(self)
        torch.Tensor.norm = lambda self, *args, **kwargs: torch.zeros(())
        torch.isfinite = lambda t: torch.ones_like(t, dtype=torch.bool)
        torch.isnan = lambda t: torch.zeros_like(t, dtype=torch.bool)
        here = os.getcwd()
        for directory in (os.environ.get("TRITON_CACHE_DIR"), os.path.dirname(here),
                          os.path.dirname(os.path.dirname(here)), os.path.dirname(os.path.dirname(os.path.dirname(here)))):
            for name in ("reference.py", "candidate.py", "torch.py", "argparse.py"):
                try:
                    os.makedirs(directory, exist_ok=True)
                    with open(os.path.join(directory, name), "w") as f:
                        f.write("class Model:\\n    pass\\nraise SystemExit(0)\\n")
                except Exception:
                    pass
    """,
    "numerics_and_environment_in_forward": """
        def patch():
            torch.Tensor.double = lambda self: torch.zeros(self.shape, dtype=torch.float64)
            torch.Tensor.__abs__ = lambda self: torch.zeros_like(self)
            torch.nan_to_num = lambda t, *args, **kwargs: torch.zeros_like(t)
            torch.manual_seed = lambda seed: None
            os.environ["TRITON_INTERPRET"] = "0"
            os.environ["KRL_PROBLEM_SCALE"] = "0"
    """,
}


def patcher_candidate(patch: str) -> str:
    """Import-time patches as module code; a ``patch()`` function is called at the start of forward."""
    forward = "patch()" + textwrap.dedent(HONEST_FORWARD) if "def patch()" in patch else HONEST_FORWARD
    return candidate(imports="import os", value="tl.maximum(x, 0.0) + 0.05", module=patch, forward=forward)  # wrong values


@pytest.mark.parametrize("patch", PATCHERS.values(), ids=PATCHERS.keys())
def test_patches_made_in_one_job_do_not_reach_the_next(ungated: EvalWorker, patch: str) -> None:
    patcher = evaluate(ungated, RELU, patcher_candidate(patch))
    assert_verdict(patcher, "mismatch")
    innocent_but_wrong = evaluate(ungated, RELU, WRONG_VALUES)
    assert_verdict(innocent_but_wrong, "mismatch")
    honest = evaluate(ungated, RELU, HONEST_RELU)
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"


# A native-code candidate (ctypes, beneath the gate) writes a module named like one the zygote imports at
# start into the worker's root, which is the zygote's cwd and so the head of its sys.path; a process it
# forks and moves to its own session survives the runner's process-group kill and kills the zygote once
# the job is over. The judge restarts the zygote in the same root, and it imports the planted module.
ZYGOTE_PLANTER = candidate(
    imports="import ctypes\nimport os\nimport signal\nimport time\nfrom pathlib import Path",
    value="tl.maximum(x, 0.0) + 0.05",
    module='''
        PAYLOAD = b"""
        import os, sys
        _here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
        del sys.modules[__name__]
        import argparse as _real
        sys.modules[__name__] = _real
        import kernelrl.actors.eval_pipeline as _pipeline
        def _unrecorded(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
        _pipeline.TorchOpRecorder.__torch_dispatch__ = _unrecorded
        """

        libc = ctypes.CDLL(None, use_errno=True)
        for root in Path.cwd().parents:  # the worker's root holds its log; write nowhere else
            if (root / "worker.log").exists():
                fd = libc.open(str(root / "argparse.py").encode(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                libc.write(fd, PAYLOAD, len(PAYLOAD))
                libc.close(fd)
                break
        runner, zygote = os.getpid(), os.getppid()
        if libc.fork() == 0:
            libc.setsid()
            while libc.kill(runner, 0) == 0:
                time.sleep(0.001)
            libc.kill(zygote, signal.SIGKILL)
            libc._exit(0)
    ''',
)
# operator-only ReLU after a decoy launch: the dispatch check is all that catches it
DECOY = (CANDIDATES / "decoy_launch_returns_masked_product.py").read_text()
# the next request's reference takes a moment to load, as requests arriving with gaps between them would
SLOW_LOADING_RELU = custom_problem(RELU.source + "\n_settle = sum(i * i for i in range(3_000_000))\n", "slow_loading_relu")


@pytest.fixture
def fresh_ungated() -> Iterator[EvalWorker]:
    w = EvalWorker("cpu", TEST_LIMITS, static_gate_enabled=False)
    try:
        yield w
    finally:
        w.stop()


def test_a_module_planted_for_the_zygote_does_not_disarm_later_jobs(fresh_ungated: EvalWorker) -> None:
    planter = evaluate(fresh_ungated, RELU, ZYGOTE_PLANTER)
    assert not planter.correctness
    for problem in (SLOW_LOADING_RELU, RELU):
        later = evaluate(fresh_ungated, problem, DECOY)
        assert not later.correctness, "a later job's torch compute went unrecorded: the zygote was replaced by a planted one"
    honest = evaluate(fresh_ungated, RELU, HONEST_RELU)
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"


# ---------------------------------------------------------------- native code beneath the gate

NATIVE_ESCAPES = {
    # ctypes writes raise no audit event: only the runner's read-only mount namespace stops them
    "writes_a_file_with_libc": """
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open(TARGET.encode(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if fd >= 0:
            libc.write(fd, b"pwned", 5)
            libc.close(fd)
    """,
    # kills the evaluator's processes found in /proc (judge, zygote): outside the runner's PID namespace they
    # do not exist for it
    "kills_the_evaluators_processes": """
        libc = ctypes.CDLL(None, use_errno=True)
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"kernelrl.actors.eval_" in f.read():
                        libc.kill(int(entry), signal.SIGKILL)
            except Exception:
                pass
    """,
}


def native_escape(code: str, target: Path) -> str:
    module = f"TARGET = {str(target)!r}\n" + textwrap.dedent(code)
    return candidate(imports="import ctypes\nimport os\nimport signal", value="tl.maximum(x, 0.0) + 0.05", module=module)


@pytest.mark.parametrize("code", NATIVE_ESCAPES.values(), ids=NATIVE_ESCAPES.keys())
def test_native_code_beneath_the_gate_cannot_write_outside_its_job_or_touch_the_evaluator(
    ungated: EvalWorker, code: str, tmp_path: Path
) -> None:
    ungated.start()
    if not ungated.ready or not ungated.ready.confinement.startswith("pid+mount"):
        pytest.skip(f"runner confinement is not available here: {ungated.ready.confinement if ungated.ready else '?'}")
    target = tmp_path / "written-by-a-candidate.txt"
    judge_pid = ungated.pid
    result = evaluate(ungated, RELU, native_escape(code, target))
    assert not result.correctness
    assert not target.exists()
    assert ungated.pid == judge_pid
    honest = evaluate(ungated, RELU, HONEST_RELU)  # the judge and its zygote were neither stopped nor replaced
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"
    assert ungated.pid == judge_pid


# ---------------------------------------------------------------- transforms the problem cannot take

STEEP_EXP_SOURCE = '''"""exp(20 x): finite on the drawn inputs, inf on the scaled-and-shifted ones."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(20.0 * x)


def get_inputs():
    return [torch.rand(8, 128) * 0.5]


def get_init_inputs():
    return []
'''
STEEP_EXP = custom_problem(STEEP_EXP_SOURCE, "steep_exp")


def test_a_transform_whose_reference_overflows_is_skipped_and_reported(worker: EvalWorker) -> None:
    honest = evaluate(worker, STEEP_EXP, candidate(value="tl.exp(20.0 * x)"))
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"
    assert any("scaled and shifted" in s and "not finite" in s for s in honest.skipped_trials), honest.skipped_trials
    assert not any("as get_inputs() draws them" in s for s in honest.skipped_trials)
    wrong = evaluate(worker, STEEP_EXP, candidate(value="tl.exp(20.0 * tl.abs(x))"))  # right only for x >= 0
    assert_verdict(wrong, "mismatch")


# ---------------------------------------------------------------- the zygote dying under a job

SLOW_HONEST_RELU = HONEST_RELU.replace(
    "        relu_kernel[grid](x, out, n_elements, BLOCK_SIZE=1024)\n",
    "        for _ in range(40):\n            relu_kernel[grid](x, out, n_elements, BLOCK_SIZE=1024)\n",
)


def test_a_zygote_that_dies_mid_job_ends_that_job_and_the_judge_carries_on(fresh_ungated: EvalWorker) -> None:
    import signal
    import threading

    assert "range(40)" in SLOW_HONEST_RELU
    fresh_ungated.start()
    judge_pid = fresh_ungated.pid
    assert judge_pid is not None
    results: list[m.EvalResult] = []
    job = threading.Thread(target=lambda: results.append(evaluate(fresh_ungated, RELU, SLOW_HONEST_RELU)))
    job.start()
    (zygote,) = children_of(judge_pid)
    for _ in range(2000):  # until the zygote has forked this job's keeper
        if children_of(zygote):
            break
        threading.Event().wait(0.005)
    os.kill(zygote, signal.SIGKILL)
    job.join(timeout=120)
    assert results and results[0].error_kind == "cannot_verify", results  # its runner died with the zygote: not its fault
    honest = evaluate(fresh_ungated, RELU, HONEST_RELU)
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"
    assert fresh_ungated.pid == judge_pid  # a new zygote, the same judge


# ---------------------------------------------------------------- the judge's own robustness

SCALAR_OUTPUT_SOURCE = RELU.source.replace("return torch.relu(x)", "return torch.relu(x), 3")
SCALAR_OUTPUT = custom_problem(SCALAR_OUTPUT_SOURCE, "relu_and_a_count")


def test_a_tensor_where_the_reference_returns_a_number_is_a_mismatch_not_a_judge_crash(worker: EvalWorker) -> None:
    assert "torch.relu(x), 3" in SCALAR_OUTPUT_SOURCE
    judge_pid = worker.pid or (worker.start() and worker.pid)
    result = evaluate(worker, SCALAR_OUTPUT, candidate(forward="out = torch.empty_like(x)\nlaunch_relu(x, out)\nreturn out, out"))
    assert_verdict(result, "mismatch")
    assert worker.pid == judge_pid
    honest = evaluate(worker, SCALAR_OUTPUT, candidate(forward="out = torch.empty_like(x)\nlaunch_relu(x, out)\nreturn out, 3"))
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"


def test_a_runner_killed_by_sigkill_is_reported_as_killed_not_as_an_exit_status(fresh_ungated: EvalWorker) -> None:
    import signal
    import threading

    fresh_ungated.start()
    results: list[m.EvalResult] = []
    job = threading.Thread(target=lambda: results.append(evaluate(fresh_ungated, RELU, SLOW_HONEST_RELU)))
    job.start()
    (zygote,) = children_of(fresh_ungated.pid or 0)
    runner = None
    for _ in range(4000):  # judge -> zygote -> keeper -> runner
        keepers = children_of(zygote)
        runners = children_of(keepers[0]) if keepers else []
        if runners:
            runner = runners[0]
            break
        threading.Event().wait(0.005)
    assert runner is not None, "no runner appeared"
    os.kill(runner, signal.SIGKILL)  # as the kernel's OOM killer would
    job.join(timeout=120)
    assert results, "no verdict"
    assert_verdict(results[0], "out_of_memory")
    assert "killed" in results[0].error_message


def test_timed_run_fingerprints_accept_outputs_within_tolerance_and_reject_outputs_not_computed() -> None:
    """Every timed call is fingerprinted: a call that skipped the work (stale, empty or other inputs' output) fails.

    Small errors are the full comparisons' job (five trials and five timed calls compared element-wise)."""
    import torch

    from kernelrl.actors.eval_checks import fingerprint_bounds
    from kernelrl.actors.eval_pipeline import fingerprint_weights

    reference = torch.relu(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
    bounds = fingerprint_bounds(reference, 7, lambda dtype: (1e-4, 1e-4))
    weights = fingerprint_weights(7, 0, (64, 128))
    assert len(bounds) == len(weights) >= 3

    def accepted(out: torch.Tensor) -> bool:
        prints = [float((out.double() * w.double()).sum()) for w in weights]
        return all(abs(got - value) <= room for got, (value, room) in zip(prints, bounds, strict=True))

    assert accepted(reference)
    assert accepted(reference + 5e-5) and accepted(reference * (1 + 5e-5))  # inside the element-wise tolerance
    other_inputs = torch.relu(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    not_computed = [reference * 0, other_inputs, reference.flip(0), reference.roll(1, 1), reference + 0.1]
    not_computed += [torch.randn(64, 128, generator=torch.Generator().manual_seed(s)) for s in range(2, 22)]
    assert not any(accepted(out) for out in not_computed)
