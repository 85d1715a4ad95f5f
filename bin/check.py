"""``kernelrl check PROBLEM.py CANDIDATE.py``: the evaluator's verdict on one candidate, without NATS.

Runs the same isolated worker and pipeline as the evaluator actor and prints the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from kernelrl.actors.eval_checks import TOLERANCE_PRESETS
from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.bin.common import command_main
from kernelrl.core import messages as m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", type=Path, help="reference program (Model, get_inputs, get_init_inputs)")
    parser.add_argument("candidate", type=Path, help="candidate program (ModelNew with Triton kernels)")
    parser.add_argument("--json", action="store_true", help="print the EvalResult as JSON")
    parser.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda:N")
    parser.add_argument("--strict", action="store_true", help="atol = rtol = 1e-4 for every output dtype")
    parser.add_argument(
        "--tolerance",
        default="kernelbench",
        help="'kernelbench' (default: fp32 1e-4, fp16/bf16 1e-2, or the problem's TOLERANCE), "
        "'legacy' (1e-2, as older published numbers), or a number for atol = rtol",
    )
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (overrides --tolerance)")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance (overrides --tolerance)")
    parser.add_argument("--log-level", default="WARNING")


def format_result(r: m.EvalResult) -> str:
    mark = "✓" if r.correctness else "✗"
    lines = [f"{mark} {r.problem_id}: compiled={r.compiled} correct={r.correctness} device={r.device}"]
    if r.correctness:
        timing = "interpreter timing, no speedup" if r.interpreter else f"speedup {r.speedup:.2f}x"
        lines.append(f"  runtime {r.runtime:.3f} ms, baseline {r.baseline_runtime:.3f} ms ({timing})")
        lines.append(f"  max_abs_error {r.max_abs_error:.3g}, rel_error {r.rel_error:.3g} (atol {r.atol:g}, rtol {r.rtol:g})")
        for skipped in r.skipped_trials:
            lines.append(f"  skipped {skipped}")
        if r.speedup_flagged:
            lines.append("  flagged: speedup above 10x, check the kernel by hand")
    else:
        lines.append(f"  error[{r.error_kind}]: " + r.error_message.replace("\n", "\n    "))
    return "\n".join(lines)


def tolerance_setting(text: str) -> float | None:
    """None (by output dtype) or one number for atol = rtol; ValueError names the accepted forms."""
    if text in TOLERANCE_PRESETS:
        return TOLERANCE_PRESETS[text]
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        presets = ", ".join(TOLERANCE_PRESETS)
        raise ValueError(f"--tolerance {text!r} is neither a preset ({presets}) nor a positive number")
    return value


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run checks here, or None."""
    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"--device {device!r}: use cpu or cuda:N"
    import torch

    index = device.partition(":")[2] or "0"
    if not index.isdigit():
        return f"--device {device!r}: use cpu or cuda:N"
    if not torch.cuda.is_available():
        return f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu"
    if int(index) >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def run(args: argparse.Namespace) -> int:
    for path in (args.problem, args.candidate):
        if not path.is_file():
            print(f"kernelrl check: {path} is not a file", file=sys.stderr)
            return 2
    try:
        preset = tolerance_setting(args.tolerance)
    except ValueError as exc:
        print(f"kernelrl check: {exc}", file=sys.stderr)
        return 2
    if (problem := device_problem(args.device)) is not None:
        print(f"kernelrl check: {problem}", file=sys.stderr)
        return 2
    atol = args.atol if args.atol is not None else preset
    rtol = args.rtol if args.rtol is not None else preset
    settings = m.CheckSettings(atol=atol, rtol=rtol, strict=args.strict)
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
