"""``kernelrl view LOGDIR [--output report.html]``: one self-contained HTML report of a run's logs.

LOGDIR is a log directory (``runs/<id>/logs``) or a run directory (``runs/<id>``). The report (default
``LOGDIR/report.html``) opens from disk with no server and no network: the run's curves, a table of trajectories
filterable by split (training or held-out eval), step, problem, outcome and error kind, paged, and for each
trajectory its turns side by side — the feedback its prompt carried, the kernel diffed against the previous turn's,
the eval verdict, the reward and its components (with the weights of the run's ``config.toml`` ``[reward]``, else
of ``--config``/``--set``). See ``kernelrl.actors.viewer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernelrl.bin.common import add_config_arguments, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", type=Path, help="the run's log directory (runs/<id>/logs) or its run directory")
    parser.add_argument("--output", "-o", type=Path, default=None, help="the HTML file to write (default: LOGDIR/report.html)")
    parser.add_argument("--page-size", type=int, default=100, help="table rows per page (default 100)")
    add_config_arguments(parser, resolve=False)


async def amain(args: argparse.Namespace) -> int:
    from kernelrl.actors.analysis_read import AnalysisError, run_reward_config
    from kernelrl.actors.viewer import build_report, log_directory

    logs = log_directory(args.logdir)
    if not any((logs / name).exists() for name in ("turns.jsonl", "trajectories.jsonl", "steps.jsonl")):
        print(f"kernelrl view: no turns.jsonl, trajectories.jsonl or steps.jsonl in {args.logdir}", file=sys.stderr)
        return 2
    if args.page_size < 1:
        print("kernelrl view: --page-size must be at least 1", file=sys.stderr)
        return 2
    output = args.output or logs / "report.html"
    try:
        reward = run_reward_config(logs, args.config.reward)  # the run's own weights split each reward into its parts
    except AnalysisError as exc:
        print(f"kernelrl view: {exc}", file=sys.stderr)
        return 2
    try:
        stats = build_report(logs, output, reward, args.page_size)
    except OSError as exc:
        print(f"kernelrl view: cannot write {output}: {exc}", file=sys.stderr)
        return 2
    skipped = sum(stats.skipped.values())
    print(
        f"kernelrl view: {output} ({stats.bytes / 1e6:.1f} MB): {stats.trajectories} trajectories, {stats.turns} turns, "
        f"{stats.steps} steps"
        + (f", {stats.incomplete} incomplete" if stats.incomplete else "")
        + (f", {skipped} torn or malformed lines skipped" if skipped else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl view", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
