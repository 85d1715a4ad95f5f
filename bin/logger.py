"""``kernelrl logger``: the logger role (see ``kernelrl.actors.logger``).

Exit status: 0 after a clean stop; 2 if the log directory cannot be used (not writable, or another logger holds
it) or ``--wandb`` is given without wandb installed; 3 if an fsync failed (what was not synced is cut away and
redelivered: restart it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from kernelrl.actors.logger import LoggerActor, RunLogFiles
from kernelrl.actors.run_log import LogDirInUse, LogSyncError, LogWriteError
from kernelrl.actors.wandb_log import WandbMissing, WandbSink, wandb_run_id
from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core.actor import run_actor
from kernelrl.core.config import Config, LoggerSettings
from kernelrl.core.run_dirs import RunDirectory

EXIT_UNUSABLE_LOG_DIR = 2
EXIT_FSYNC_FAILED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_setting_flag(parser, "--log-dir", key="logger.log_dir", help="directory for the JSONL logs (default runs/<run>/logs)")
    add_setting_flag(parser, "--verbose", key="logger.verbose", action="store_true",
                     help="detailed console output (or VERBOSE=true)")  # fmt: skip
    add_setting_flag(parser, "--quiet", key="logger.console", action="store_const", const=False,
                     help="no console summaries, files only")  # fmt: skip
    add_setting_flag(parser, "--fsync-interval", key="logger.fsync_interval_s", type=float, help="seconds between fsyncs")
    add_setting_flag(parser, "--wandb", key="logger.wandb", action="store_true",
                     help="also log step and eval metrics and trajectories to W&B (pip install 'kernelrl[wandb]')")  # fmt: skip


def open_wandb(config: Config, settings: LoggerSettings) -> WandbSink | None:
    """The W&B run of these logs (its id kept beside them: a restarted logger continues it). W&B failing to start
    (no network in online mode, a bad project) costs the W&B view only: a warning, and the logger writes its files."""
    try:
        run_id = wandb_run_id(config.bus.run or "run", Path(settings.log_dir))
        return WandbSink(project=settings.wandb_project, run_name=config.bus.run, max_turns=config.reward.max_turns,
                         samples_per_step=settings.wandb_samples_per_step, reward=config.reward, run_id=run_id,
                         resume="allow")  # fmt: skip
    except WandbMissing:
        raise
    except Exception as exc:  # wandb's own errors have no common base worth naming; the logs must not wait on them
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"kernelrl logger: W&B did not start ({type(exc).__name__}: {reason}); logging to files only", file=sys.stderr)
        return None


async def amain(args: argparse.Namespace) -> int:
    config: Config = args.config
    settings = config.logger
    if not settings.log_dir:
        run_dir = RunDirectory(root=config.run.runs_root, run_id=config.bus.run)
        settings = msgspec.structs.replace(settings, log_dir=str(run_dir.logs))
    try:
        # The directory is locked and opened before W&B or NATS is touched: a refused logger leaves no trace.
        files = RunLogFiles(Path(settings.log_dir), settings)
        sink = None
        try:
            sink = open_wandb(config, settings) if settings.wandb else None
            return await run_actor(lambda bus: LoggerActor(bus, settings, files=files, sink=sink), config)
        finally:
            files.close()  # a no-op once the actor has closed them
            if sink is not None:
                sink.finish()  # likewise
    except WandbMissing as exc:
        print(f"kernelrl logger: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE_LOG_DIR
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
