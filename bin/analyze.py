"""``kernelrl analyze LOGDIR… [--output analysis.json] [--plot FILE.png] [--top N] [--jobs N]``: what the policy did.

Streams ``turns.jsonl``, ``trajectories.jsonl`` and ``steps.jsonl`` of one or several runs (LOGDIR: a run's
``logs`` directory or the run directory) and prints a summary: outcomes of the final kernels (correctness,
speedup, fast_p), reward and its components by turn, levels and problems, the top trajectories by return and the
training steps' group-summary trend. ``--output`` writes the same numbers as JSON, ``--plot`` a PNG. Reward
weights come from the run's ``config.toml`` beside the logs, else from ``--config``/``--set`` (defaults).
Lines that are not valid records are skipped and counted. Files of 64 MB or more are read by ``--jobs`` worker
processes (default: one per CPU). A LOGDIR that is not a run's logs exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from kernelrl.bin.common import add_config_arguments, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="a run's logs directory, or the run directory holding logs/")
    parser.add_argument("--output", "-o", metavar="FILE.json", default=None, help="write the summary as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write a PNG: by turn, by step, speedup distribution")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="how many top trajectories by return (default 5)")
    parser.add_argument(
        "--jobs", "-j", type=int, default=None, metavar="N", help="worker processes for large logs (default: one per CPU)"
    )
    add_config_arguments(parser, resolve=False)


async def amain(args: argparse.Namespace) -> int:
    from kernelrl.actors.analysis_workers import interrupted_by_ctrl_c

    prog = "kernelrl analyze"
    if args.top < 0:
        print(f"{prog}: --top must be ≥ 0", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"{prog}: --jobs must be ≥ 1", file=sys.stderr)
        return 2
    with interrupted_by_ctrl_c():  # the command is synchronous: Ctrl-C stops it wherever it is (workers and all)
        try:
            return write_analysis(prog, args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130


def write_analysis(prog: str, args: argparse.Namespace) -> int:
    from kernelrl.actors.analysis_read import AnalysisError, analyze
    from kernelrl.actors.analysis_report import report

    try:
        analysis = analyze([Path(p) for p in args.logdirs], args.config.reward, args.top, args.jobs)
    except AnalysisError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(report(analysis))
    try:
        if args.output:
            Path(args.output).write_bytes(msgspec.json.format(msgspec.json.encode(analysis), indent=2) + b"\n")
            print(f"\nAnalysis saved to: {args.output}")
        if args.plot:
            from kernelrl.actors.analysis_plot import plot

            plot(analysis, Path(args.plot))
            print(f"Plot saved to: {args.plot}")
    except OSError as exc:
        print(f"{prog}: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl analyze", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
