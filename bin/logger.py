"""``kernelrl logger``: the logger role (see ``kernelrl.actors.logger``).

Exit status: 0 after a clean stop; 2 if the log directory cannot be used (not writable, or another
logger holds it); 3 if an fsync failed (what was not synced is cut away and redelivered: restart it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernelrl.actors.logger import LoggerActor, RunLogFiles
from kernelrl.actors.run_log import LogDirInUse, LogSyncError, LogWriteError
from kernelrl.bin.common import add_bus_arguments, bus_settings, command_main
from kernelrl.core.actor import run_actor
from kernelrl.core.config import LoggerSettings

EXIT_UNUSABLE_LOG_DIR = 2
EXIT_FSYNC_FAILED = 3


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
        # The directory is locked and opened before NATS is touched: a refused logger leaves no trace.
        files = RunLogFiles(Path(settings.log_dir), settings)
        try:
            return await run_actor(lambda bus: LoggerActor(bus, settings, files=files), bus_settings(args))
        finally:
            files.close()  # a no-op once the actor has closed them
    except LogDirInUse as exc:
        print(f"kernelrl logger: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE_LOG_DIR
    except LogSyncError as exc:
        print(f"kernelrl logger: {exc}; exiting so a restarted logger rewrites what was not acked", file=sys.stderr)
        return EXIT_FSYNC_FAILED
    except LogWriteError as exc:
        print(f"kernelrl logger: {exc}; events stay in JetStream until a logger can write them", file=sys.stderr)
        return EXIT_UNUSABLE_LOG_DIR


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl-logger", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
