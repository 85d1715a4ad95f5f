"""Evaluator throughput on the built-in set, and timing stability on a GPU.

Figures:
- cpu_evals_per_min: reference solutions through one reused worker (Triton interpreter on CPU);
- fresh_worker_evals_per_min: the same with a new worker process per evaluation (the baseline: what
  a pool that does not reuse its processes pays), and ratio_vs_fresh_worker;
- with CUDA: gpu_evals_per_min (level-1 problems, one GPU, benchmarking on) and timing_cv, the
  coefficient of variation of 10 repeated median timings of the same kernel.
Targets (GPU): >= 30 evaluations/min/GPU on level 1, timing CV <= 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core.problems import Problem, builtin_problems


def request(problem: Problem, settings: m.CheckSettings | None = None) -> m.EvalRequest:
    return m.EvalRequest(
        eval_id=m.new_id(),
        run_id="bench",
        problem_id=problem.id,
        candidate_source=problem.solution or "",
        problem_source=problem.source,
        reply_to="",
        settings=settings or m.CheckSettings(),
    )


def evals_per_min(worker_factory: type[EvalWorker], device: str, problems: list[Problem], reuse: bool) -> tuple[float, int]:
    worker = worker_factory(device)
    worker.start()  # start-up of the first worker is not counted in either mode
    correct = 0
    start = time.perf_counter()
    for problem in problems:
        if not reuse:
            worker.stop()
            worker = worker_factory(device)
        correct += worker.evaluate(request(problem)).correctness
    elapsed = time.perf_counter() - start
    worker.stop()
    return 60.0 * len(problems) / elapsed, correct


def timing_cv(device: str, problem: Problem, repeats: int = 10) -> float:
    worker = EvalWorker(device)
    medians = []
    for _ in range(repeats):
        result = worker.evaluate(request(problem))
        medians.append(result.runtime)
    worker.stop()
    return statistics.pstdev(medians) / statistics.fmean(medians)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a subset, under 30 s")
    args = parser.parse_args()
    problems = builtin_problems().problems
    cpu_set = problems[:8] if args.quick else problems
    fresh_set = problems[:3] if args.quick else problems[:8]
    figures: dict[str, float | int | str] = {"bench": "evaluator"}
    rate, correct = evals_per_min(EvalWorker, "cpu", cpu_set, reuse=True)
    figures.update(cpu_evals_per_min=round(rate, 1), cpu_problems=len(cpu_set), cpu_correct=correct)
    fresh_rate, _ = evals_per_min(EvalWorker, "cpu", fresh_set, reuse=False)
    figures.update(fresh_worker_evals_per_min=round(fresh_rate, 1), ratio_vs_fresh_worker=round(rate / fresh_rate, 2))
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        level1 = [p for p in problems if p.level == 1]
        gpu_set = level1[:6] if args.quick else level1
        gpu_rate, gpu_correct = evals_per_min(EvalWorker, "cuda", gpu_set, reuse=True)
        figures.update(gpu_evals_per_min=round(gpu_rate, 1), gpu_problems=len(gpu_set), gpu_correct=gpu_correct)
        figures["timing_cv"] = round(timing_cv("cuda", builtin_problems().get("level1/17_Matmul"), 5 if args.quick else 10), 4)
        figures["gpu"] = torch.cuda.get_device_name(0)
        figures["problem_scale"] = os.environ.get("KRL_PROBLEM_SCALE", "1")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
