"""What every command shares: where NATS is, which run, how much to log, and how a command ends.

``--nats`` and ``--run`` resolve like ``core.run_dirs`` says: the flag, the environment (``KRL_NATS``,
``KRL_RUN``), the latest local run, the default. A broker that cannot be reached ends a command with one
line naming the URL and exit status 2, never a traceback or a reconnect loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from kernelrl.core.config import BusSettings
from kernelrl.core.run_dirs import resolve_nats_url, resolve_run_id


def add_bus_arguments(parser: argparse.ArgumentParser, resolve: bool = True) -> None:
    """``--nats``, ``--run``, ``--log-level``; with ``resolve`` they are filled in before the command runs."""
    parser.add_argument("--nats", default=None, help="NATS server URL (default: $KRL_NATS, the latest run's, or 4222)")
    parser.add_argument("--run", default=None, help="run id (default: $KRL_RUN, the latest local run, or 'default')")
    parser.add_argument("--log-level", default=os.environ.get("KRL_LOG_LEVEL", "INFO"))
    parser.add_argument("--replicas", type=int, default=1, help="store streams on this many servers of a NATS cluster")
    parser.set_defaults(resolve_bus=resolve)


def resolve_bus_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "resolve_bus", False):
        args.nats, _ = resolve_nats_url(args.nats)
        args.run = resolve_run_id(args.run)


def bus_settings(args: argparse.Namespace) -> BusSettings:
    return BusSettings(url=args.nats, run=args.run, replicas=args.replicas)


async def connect_tool(url: str, name: str, reconnect: bool = False, timeout_s: float = 5.0) -> NatsClient:
    """A plain connection for tools (status, tap); ConnectionError naming the URL if the first try fails.

    With ``reconnect``, a connection once made rides out a broker restart (``tap`` keeps tapping).
    """

    async def quiet(exc: Exception) -> None:
        """Reconnect attempts are expected while a broker restarts."""

    try:
        return await asyncio.wait_for(
            nats.connect(url, name=name, allow_reconnect=reconnect, max_reconnect_attempts=-1 if reconnect else 0,
                         connect_timeout=max(1, int(timeout_s)), error_cb=quiet),
            timeout_s,
        )  # fmt: skip
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise ConnectionError(f"cannot reach NATS at {url}: {exc!r}") from exc


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(prog: str, amain: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace) -> int:
    """Resolve the bus arguments, run the command's coroutine, and turn an unreachable broker into exit 2."""
    from kernelrl.core.actor import run_main

    resolve_bus_arguments(args)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return run_main(amain(args))
    except ConnectionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def command_main(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    amain: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    argv: list[str] | None = None,
) -> int:
    """Parse and run one command (the body of every ``bin/`` entrypoint)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return run_command(prog, amain, parser.parse_args(argv))
