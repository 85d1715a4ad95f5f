"""``kernelrl check PROBLEM.py CANDIDATE.py``: the evaluator's verdict on one candidate, without NATS.

Runs the same isolated worker and pipeline as the evaluator actor and prints the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.bin.common import command_main
from kernelrl.core import messages as m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", type=Path, help="reference program (Model, get_inputs, get_init_inputs)")
    parser.add_argument("candidate", type=Path, help="candidate program (ModelNew with Triton kernels)")
    parser.add_argument("--json", action="store_true", help="print the EvalResult as JSON")
    parser.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda:N")
    parser.add_argument("--strict", action="store_true", help="atol = rtol = 1e-4")
    parser.add_argument("--atol", type=float, default=m.CheckSettings().atol)
    parser.add_argument("--rtol", type=float, default=m.CheckSettings().rtol)
    parser.add_argument("--log-level", default="WARNING")


def format_result(r: m.EvalResult) -> str:
    mark = "✓" if r.correctness else "✗"
    lines = [f"{mark} {r.problem_id}: compiled={r.compiled} correct={r.correctness} device={r.device}"]
    if r.correctness:
        timing = "interpreter timing, no speedup" if r.interpreter else f"speedup {r.speedup:.2f}x"
        lines.append(f"  runtime {r.runtime:.3f} ms, baseline {r.baseline_runtime:.3f} ms ({timing})")
        lines.append(f"  max_abs_error {r.max_abs_error:.3g}, rel_error {r.rel_error:.3g}")
        if r.speedup_flagged:
            lines.append("  flagged: speedup above 10x, check the kernel by hand")
    else:
        lines.append(f"  error[{r.error_kind}]: " + r.error_message.replace("\n", "\n    "))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for path in (args.problem, args.candidate):
        if not path.is_file():
            print(f"kernelrl check: {path} is not a file", file=sys.stderr)
            return 2
    settings = m.CheckSettings(atol=args.atol, rtol=args.rtol, strict=args.strict)
    request = m.EvalRequest(
        eval_id=m.new_id(),
        run_id="check",
        problem_id=args.problem.stem,
        candidate_source=args.candidate.read_text(),
        problem_source=args.problem.read_text(),
        reply_to="",
        settings=settings,
    )
    worker = EvalWorker(args.device)
    try:
        result = worker.evaluate(request)
    finally:
        worker.stop()
    print(msgspec.json.encode(result).decode() if args.json else format_result(result))
    return 0 if result.correctness else 1


async def amain(args: argparse.Namespace) -> int:
    return run(args)


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl check", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
