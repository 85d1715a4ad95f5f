"""Arguments every command shares: where NATS is, which run, how much to log."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from kernelrl.core.config import BusSettings

DEFAULT_NATS = "nats://127.0.0.1:4222"


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats",
        default=os.environ.get("KRL_NATS", DEFAULT_NATS),
        help="NATS server URL (env KRL_NATS; default %(default)s)",
    )
    parser.add_argument("--run", default=os.environ.get("KRL_RUN", "default"), help="run id (env KRL_RUN)")
    parser.add_argument("--log-level", default=os.environ.get("KRL_LOG_LEVEL", "INFO"))


def bus_settings(args: argparse.Namespace) -> BusSettings:
    return BusSettings(url=args.nats, run=args.run)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def command_main(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    amain: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    argv: list[str] | None = None,
) -> int:
    """Parse, set up logging and run one command's coroutine (the body of every ``bin/`` entrypoint)."""
    from kernelrl.core.actor import run_main

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    return run_main(amain(args))
