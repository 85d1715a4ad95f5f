"""Evaluator throughput on the built-in set with the judge/runner isolation, beside the landed design.

Figures:
- cpu_evals_per_min: reference solutions through one EvalWorker (a trusted judge; a fresh runner forked
  from a warm zygote for every job; Triton interpreter on CPU);
- landed_evals_per_min: the same problems and solutions through the design this replaced (one long-lived
  worker that ran candidate and reference in one process), its code checked out from git at
  ``--baseline-rev`` and run in a subprocess in the same run, and ratio_vs_landed (new / landed: the price
  of a fresh runner per job);
- runner_overhead_ms: the median wall time a job spends outside its candidate's and reference's own
  compute (fork, channel, tensor transfer), from the same run;
- with CUDA: gpu_evals_per_min (level-1 problems, one GPU, benchmarking on) and timing_cv, the
  coefficient of variation of repeated median timings of the same kernel.
Target: >= 100 evaluations/min on the full set on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core.problems import Problem, builtin_problems

REPO = Path(__file__).resolve().parent.parent
LANDED_REV = "67d8b5b"  # the last commit before the judge/runner split
PACKAGES = ("core", "actors", "bin", "problems")
LANDED_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from kernelrl.actors import eval_sandbox
eval_sandbox.PASSED_ENV = (*eval_sandbox.PASSED_ENV, "PYTHONPATH")  # its worker must import the same old code
from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
problems = json.load(open(sys.argv[2]))  # the same problems and solutions as the new design's run
worker = EvalWorker("cpu")
worker.start()
correct, start = 0, time.perf_counter()
for p in problems:
    r = worker.evaluate(m.EvalRequest(eval_id=m.new_id(), run_id="bench", problem_id=p["id"],
                                      candidate_source=p["solution"], problem_source=p["source"], reply_to=""))
    correct += r.correctness
elapsed = time.perf_counter() - start
worker.stop()
print(json.dumps({"evals_per_min": 60 * len(problems) / elapsed, "correct": correct}))
"""


def request(problem: Problem) -> m.EvalRequest:
    return m.EvalRequest(eval_id=m.new_id(), run_id="bench", problem_id=problem.id, candidate_source=problem.solution or "",
                         problem_source=problem.source, reply_to="")  # fmt: skip


def evals_per_min(device: str, problems: list[Problem]) -> tuple[float, int, float]:
    """(evaluations per minute, how many were correct, median ms per job outside the two programs' compute)."""
    worker = EvalWorker(device)
    worker.start()  # start-up is not counted, in either design
    correct, overheads = 0, []
    start = time.perf_counter()
    for problem in problems:
        t0 = time.perf_counter()
        result = worker.evaluate(request(problem))
        wall_ms = 1000 * (time.perf_counter() - t0)
        correct += result.correctness
        n = 5  # trials; runtime/baseline_runtime are per-call medians
        if result.correctness and result.interpreter:
            overheads.append(wall_ms - n * (result.runtime + result.baseline_runtime))
    elapsed = time.perf_counter() - start
    worker.stop()
    return 60.0 * len(problems) / elapsed, correct, statistics.median(overheads) if overheads else -1.0


def landed_evals_per_min(rev: str, problems: list[Problem]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="krl-landed-") as tmp:
        archive = Path(tmp) / "landed.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev, *PACKAGES], check=True)
        package = Path(tmp) / "kernelrl"
        package.mkdir()
        with tarfile.open(archive) as tar:
            tar.extractall(package, filter="data")
        (package / "__init__.py").write_text("")
        listing = Path(tmp) / "problems.json"
        listing.write_text(json.dumps([{"id": p.id, "source": p.source, "solution": p.solution} for p in problems]))
        env = {**os.environ, "PYTHONPATH": tmp}
        out = subprocess.run(
            [sys.executable, "-c", LANDED_SCRIPT, tmp, str(listing)],
            check=True, capture_output=True, text=True, env=env, cwd=tmp,
        ).stdout  # fmt: skip
        figures = json.loads(out.strip().splitlines()[-1])
        return figures["evals_per_min"], figures["correct"]


def timing_cv(problem: Problem, repeats: int) -> float:
    worker = EvalWorker("cuda")
    medians = [worker.evaluate(request(problem)).runtime for _ in range(repeats)]
    worker.stop()
    return statistics.pstdev(medians) / statistics.fmean(medians)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset, under 30 s")
    parser.add_argument("--baseline-rev", default=LANDED_REV, help="git revision of the design to compare with")
    args = parser.parse_args()
    problems = builtin_problems().problems
    cpu_set = problems[:8] if args.quick else problems
    figures: dict[str, float | int | str] = {"bench": "evaluator", "cpus": os.cpu_count() or 0}
    rate, correct, overhead = evals_per_min("cpu", cpu_set)
    figures.update(cpu_evals_per_min=round(rate, 1), cpu_problems=len(cpu_set), cpu_correct=correct,
                   runner_overhead_ms=round(overhead, 1))  # fmt: skip
    landed_rate, landed_correct = landed_evals_per_min(args.baseline_rev, cpu_set)
    figures.update(landed_evals_per_min=round(landed_rate, 1), landed_correct=landed_correct,
                   ratio_vs_landed=round(rate / landed_rate, 3))  # fmt: skip
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        level1 = [p for p in problems if p.level == 1]
        gpu_set = level1[:6] if args.quick else level1
        gpu_rate, gpu_correct, _ = evals_per_min("cuda", gpu_set)
        figures.update(gpu_evals_per_min=round(gpu_rate, 1), gpu_problems=len(gpu_set), gpu_correct=gpu_correct)
        figures["timing_cv"] = round(timing_cv(builtin_problems().get("level1/17_Matmul"), 5 if args.quick else 10), 4)
        figures["gpu"] = torch.cuda.get_device_name(0)
        figures["problem_scale"] = os.environ.get("KRL_PROBLEM_SCALE", "1")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
