"""GPU-only checks of the evaluator (``gpu`` mark): run on a machine with CUDA, skipped elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core.problems import builtin_problems

pytestmark = pytest.mark.gpu
CANDIDATES = Path(__file__).parent / "candidates"


@pytest.fixture(scope="module")
def gpu_worker() -> Iterator[EvalWorker]:
    worker = EvalWorker("cuda:0")
    yield worker
    worker.stop()


def request(problem_id: str, source: str | None = None) -> m.EvalRequest:
    problem = builtin_problems().get(problem_id)
    return m.EvalRequest(
        eval_id=m.new_id(), run_id="gpu", problem_id=problem.id, candidate_source=source or problem.solution or "",
        problem_source=problem.source, reply_to="",
    )  # fmt: skip


@pytest.mark.parametrize("problem_id", ["level1/1_ReLU", "level1/12_Softmax", "level1/17_Matmul", "level3/3_AttentionHead"])
def test_solution_is_correct_and_benchmarked_with_cuda_events(gpu_worker: EvalWorker, problem_id: str) -> None:
    result = gpu_worker.evaluate(request(problem_id))
    assert result.correctness, f"{result.error_kind}: {result.error_message}"
    assert not result.interpreter
    assert result.runtime > 0 and result.baseline_runtime > 0
    assert result.speedup == pytest.approx(result.baseline_runtime / result.runtime)
    assert result.runtime_stats["runs"] == 100
    assert result.runtime_stats["min"] <= result.runtime_stats["median"] <= result.runtime_stats["max"]


def test_baseline_is_cached_per_problem_and_device(gpu_worker: EvalWorker) -> None:
    first = gpu_worker.evaluate(request("level1/3_Sigmoid"))
    second = gpu_worker.evaluate(request("level1/3_Sigmoid"))
    assert first.correctness and second.correctness
    assert second.baseline_runtime == first.baseline_runtime


def test_out_of_bounds_kernel_is_a_cuda_fault_contained_in_its_runner(gpu_worker: EvalWorker) -> None:
    gpu_worker.start()
    judge_pid = gpu_worker.pid
    result = gpu_worker.evaluate(request("level1/1_ReLU", (CANDIDATES / "crash_out_of_bounds.py").read_text()))
    assert not result.correctness
    assert result.error_kind == "cuda_fault"
    assert gpu_worker.pid == judge_pid  # the judge's CUDA context is its own; only the runner died
    assert gpu_worker.evaluate(request("level1/1_ReLU")).correctness


SIDE_STREAM_MATMUL = (
    (builtin_problems().get("level1/17_Matmul").solution or "")
    .replace("    c = torch.empty((M, N), device=a.device, dtype=torch.float32)\n",
             "    c = torch.empty((M, N), device=a.device, dtype=torch.float32)\n    side = torch.cuda.Stream()\n")
    .replace("    matmul_kernel[grid](", "    with torch.cuda.stream(side):\n        matmul_kernel[grid](")
)  # fmt: skip


def test_work_on_a_side_stream_is_timed_at_its_true_cost(gpu_worker: EvalWorker) -> None:
    """A kernel launched on a non-default stream must not look faster than the same kernel on the default one."""
    assert "torch.cuda.stream(side)" in SIDE_STREAM_MATMUL
    honest = gpu_worker.evaluate(request("level1/17_Matmul"))
    dodging = gpu_worker.evaluate(request("level1/17_Matmul", SIDE_STREAM_MATMUL))
    assert honest.correctness, f"{honest.error_kind}: {honest.error_message}"
    if dodging.correctness:  # unsynchronised side-stream output may also simply be wrong, which is fine
        assert dodging.runtime >= 0.7 * honest.runtime, (dodging.runtime, honest.runtime)
