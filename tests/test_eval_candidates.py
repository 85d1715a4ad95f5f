"""The evaluator's verdicts: every built-in solution passes; every hostile candidate gets its error_kind.

Runs the real judge, zygote and runner processes (Triton interpreter on CPU) with limits tightened so
hostile candidates finish fast. A candidate file says ``# expect: KIND`` (the verdict through every
layer) and may say ``# beneath-gate: KIND`` (the verdict when the static gate is skipped, as if the
candidate had found a way past it: the runtime layers must still hold).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core.config import WorkerLimits
from kernelrl.core.problems import Problem, builtin_problems

CANDIDATES = Path(__file__).parent / "candidates"
SECRET = "krl-test-secret-value-42"
TEST_LIMITS = WorkerLimits(
    address_space_gb=6.0, file_size_mb=128, load_time_s=60.0, correctness_time_s=20.0, cpu_seconds_per_job=60
)


def candidate_files() -> list[Path]:
    return sorted(CANDIDATES.glob("*.py"))


def expectation(path: Path, header: str = "expect") -> tuple[str, str]:
    text = path.read_text()
    kind = re.search(rf"^# {header}: (\w+)", text, re.M)
    problem = re.search(r"^# problem: (\S+)", text, re.M)
    assert kind, f"{path.name} does not say what it expects"
    return kind.group(1), problem.group(1) if problem else "level1/1_ReLU"


def beneath_gate_files() -> list[Path]:
    return [f for f in candidate_files() if "# beneath-gate:" in f.read_text()]


def request(problem: Problem, candidate_source: str) -> m.EvalRequest:
    return m.EvalRequest(
        eval_id=m.new_id(),
        run_id="test",
        problem_id=problem.id,
        candidate_source=candidate_source,
        problem_source=problem.source,
        reply_to="",
    )


@pytest.fixture(scope="module")
def worker() -> Iterator[EvalWorker]:
    os.environ["KRL_TEST_SECRET"] = SECRET  # what a real evaluator's environment might hold
    w = EvalWorker("cpu", TEST_LIMITS)
    try:
        yield w
    finally:
        w.stop()
        os.environ.pop("KRL_TEST_SECRET", None)


@pytest.fixture(scope="module")
def ungated() -> Iterator[EvalWorker]:
    """An evaluator whose static gate is skipped: what a candidate that slipped past the gate meets."""
    os.environ["KRL_TEST_SECRET"] = SECRET
    w = EvalWorker("cpu", TEST_LIMITS, static_gate_enabled=False)
    try:
        yield w
    finally:
        w.stop()
        os.environ.pop("KRL_TEST_SECRET", None)


@pytest.mark.parametrize("problem", builtin_problems().problems, ids=lambda p: p.id)
def test_builtin_solution_passes_on_the_cpu_interpreter(worker: EvalWorker, problem: Problem) -> None:
    assert problem.solution is not None, f"{problem.id} has no .triton.py solution"
    result = worker.evaluate(request(problem, problem.solution))
    assert result.correctness, f"{problem.id}: {result.error_kind}: {result.error_message}"
    assert result.compiled and result.interpreter and result.speedup == 0.0
    assert result.rel_error is not None and result.rel_error < 1e-4
    assert result.atol == 1e-4 and result.rtol == 1e-4  # fp32 outputs: KernelBench's default


def test_there_are_at_least_30_builtin_problems_over_three_levels() -> None:
    problems = builtin_problems().problems
    assert len(problems) >= 30
    assert {p.level for p in problems} == {1, 2, 3}


@pytest.mark.parametrize("path", candidate_files(), ids=lambda p: p.stem)
def test_hostile_candidate_gets_the_right_verdict(worker: EvalWorker, path: Path) -> None:
    expected_kind, problem_id = expectation(path)
    problem = builtin_problems().get(problem_id)
    result = worker.evaluate(request(problem, path.read_text()))
    assert not result.correctness
    assert result.error_kind == expected_kind, f"{path.name}: got {result.error_kind}: {result.error_message}"
    assert result.error_message and len(result.error_message) <= 2000
    assert SECRET not in result.error_message
    assert not Path("/tmp/krl-pwned.txt").exists()
    assert not Path("/tmp/krl-should-not-exist").exists()


@pytest.mark.parametrize("path", beneath_gate_files(), ids=lambda p: p.stem)
def test_beneath_the_gate_the_runtime_layers_still_hold(ungated: EvalWorker, path: Path) -> None:
    expected_kind, problem_id = expectation(path, "beneath-gate")
    problem = builtin_problems().get(problem_id)
    result = ungated.evaluate(request(problem, path.read_text()))
    assert not result.correctness
    assert result.error_kind == expected_kind, f"{path.name}: got {result.error_kind}: {result.error_message}"
    assert SECRET not in result.error_message
    if path.stem == "reads_secret":
        assert "secret=absent" in result.error_message
    assert not Path("/tmp/krl-pwned.txt").exists()
    assert not Path("/tmp/krl-should-not-exist").exists()


def test_a_crash_is_contained_in_the_runner_and_the_judge_keeps_answering(worker: EvalWorker) -> None:
    problem = builtin_problems().get("level1/1_ReLU")
    worker.start()
    judge_pid, before = worker.pid, worker.restarts
    crash = worker.evaluate(request(problem, (CANDIDATES / "crash_out_of_bounds.py").read_text()))
    assert crash.error_kind == "crash" and "candidate.py" in crash.error_message
    assert worker.restarts == before and worker.pid == judge_pid  # only the per-job runner died
    good = worker.evaluate(request(problem, problem.solution or ""))
    assert good.correctness


def test_the_error_message_points_at_the_candidates_line(worker: EvalWorker) -> None:
    problem = builtin_problems().get("level1/1_ReLU")
    result = worker.evaluate(request(problem, (CANDIDATES / "runtime_error.py").read_text()))
    assert 'File "candidate.py", line' in result.error_message
    assert "ValueError: the kernel result was rejected" in result.error_message
    assert "/tmp/" not in result.error_message


GAPS = Path(__file__).parent / "interpreter_gaps"


def test_multi_config_autotune_runs_on_the_interpreter_without_a_gpu_benchmark(worker: EvalWorker) -> None:
    problem = builtin_problems().get("level1/1_ReLU")
    result = worker.evaluate(request(problem, (GAPS / "autotune_relu.py").read_text()))
    assert result.correctness, f"{result.error_kind}: {result.error_message}"


def test_bf16_dot_is_computed_correctly_on_the_interpreter_not_judged_wrong(worker: EvalWorker) -> None:
    source = (GAPS / "bf16_matmul_problem.py").read_text()
    problem = Problem(id="gaps/bf16_matmul", level=0, number=0, name="bf16_matmul", source=source, path="")
    result = worker.evaluate(request(problem, (GAPS / "bf16_matmul.py").read_text()))
    assert result.correctness, f"{result.error_kind}: {result.error_message}"
    assert result.rel_error is not None and result.rel_error < 1e-2


def _custom_problem(source: str) -> Problem:
    return Problem(id="custom/probe", level=0, number=0, name="probe", source=source, path="")


RELU_SOLUTION = builtin_problems().get("level1/1_ReLU").solution or ""
RELU_SOURCE = builtin_problems().get("level1/1_ReLU").source


def test_a_broken_reference_is_the_problems_fault_not_the_candidates(worker: EvalWorker) -> None:
    broken = RELU_SOURCE.replace("return [torch.randn(batch_size, dim)]", "raise RuntimeError('dataset missing')")
    result = worker.evaluate(request(_custom_problem(broken), RELU_SOLUTION))
    assert result.error_kind == "bad_problem"
    assert "dataset missing" in result.error_message


def test_a_reference_that_crashes_this_device_means_cannot_verify_never_wrong(worker: EvalWorker) -> None:
    crashing = RELU_SOURCE.replace("return torch.relu(x)", "import ctypes\n        return ctypes.string_at(0)")
    result = worker.evaluate(request(_custom_problem(crashing), RELU_SOLUTION))
    assert result.error_kind == "cannot_verify"
    assert worker.evaluate(request(builtin_problems().get("level1/1_ReLU"), RELU_SOLUTION)).correctness


def test_a_request_without_a_reference_program_is_answered_clearly(worker: EvalWorker) -> None:
    result = worker.evaluate(request(_custom_problem(""), RELU_SOLUTION))
    assert result.error_kind == "bad_problem" and "custom/probe" in result.error_message
