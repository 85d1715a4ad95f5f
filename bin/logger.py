"""``kernelrl logger``: the logger role (see ``kernelrl.actors.logger``)."""

from __future__ import annotations

import argparse
import sys

from kernelrl.actors.logger import LoggerActor
from kernelrl.actors.run_log import LogWriteError
from kernelrl.bin.common import add_bus_arguments, bus_settings, command_main
from kernelrl.core.actor import run_actor
from kernelrl.core.config import LoggerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--log-dir", required=True, help="directory for turns/trajectories/steps JSONL")
    parser.add_argument("--verbose", action="store_true", help="detailed console output (or VERBOSE=true)")
    parser.add_argument("--quiet", action="store_true", help="no console summaries, files only")
    parser.add_argument("--fsync-interval", type=float, default=LoggerSettings().fsync_interval_s)


async def amain(args: argparse.Namespace) -> int:
    settings = LoggerSettings(
        log_dir=args.log_dir,
        verbose=args.verbose,
        console=not args.quiet,
        fsync_interval_s=args.fsync_interval,
    )
    try:
        return await run_actor(lambda bus: LoggerActor(bus, settings), bus_settings(args))
    except LogWriteError as exc:
        print(f"kernelrl logger: {exc}; events stay in JetStream until a logger can write them", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl-logger", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
