"""What every command shares: the run's configuration, where NATS is, how much to log, how a command ends.

The configuration is the ``--config`` TOML file, then each ``--set section.key=value``, then named flags
(``--nats`` is ``bus.url``, ``--run`` is ``bus.run`` ...). An unset URL and run id resolve like
``core.run_dirs`` says: the environment (``KRL_NATS``, ``KRL_RUN``), the latest local run, the default.
A configuration error ends a command with one line naming the key, a broker that cannot be reached with
one line naming the URL; both exit 2, never a traceback or a reconnect loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from kernelrl.core.config import Config
from kernelrl.core.config_file import ConfigError, config_toml, load_config, validate
from kernelrl.core.run_dirs import resolve_nats_url, resolve_run_id


def add_config_arguments(parser: argparse.ArgumentParser, resolve: bool = True) -> None:
    """``--config``, ``--set``, ``--print-config`` and the named flags every command shares (``--nats``,
    ``--run``, ``--replicas``); with ``resolve`` an unset bus URL and run id are found before the command runs."""
    parser.add_argument(
        "--config",
        dest="config_file",
        default=os.environ.get("KRL_CONFIG") or None,
        metavar="FILE",
        help="the run's TOML configuration (default: $KRL_CONFIG, else the built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="config_sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set one configuration key, e.g. --set evaluator.limits.correctness_time_s=60 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration as TOML and exit")
    parser.add_argument("--log-level", default=os.environ.get("KRL_LOG_LEVEL", "INFO"))
    add_setting_flag(parser, "--nats", key="bus.url", help="NATS server URL (default: $KRL_NATS, the latest run's, or 4222)")
    add_setting_flag(parser, "--run", key="bus.run", help="run id (default: $KRL_RUN, the latest local run, or 'default')")
    add_setting_flag(parser, "--replicas", key="bus.replicas", type=int, help="store streams on this many servers of a cluster")
    parser.set_defaults(resolve_bus=resolve)


def add_setting_flag(parser: argparse.ArgumentParser, *names: str, key: str | tuple[str, ...], **kwargs: Any) -> None:
    """A named flag for configuration key ``key`` (or several); given, it overrides the file and ``--set``."""
    if kwargs.get("action") == "store_true":
        kwargs.update(action="store_const", const=True)
    action = parser.add_argument(*names, default=None, **kwargs)
    keys = dict(parser.get_default("setting_flags") or {})
    keys[action.dest] = key
    parser.set_defaults(setting_flags=keys)


def config_from_arguments(args: argparse.Namespace) -> Config:
    """The effective configuration: the file, ``--set``, the named flags; then an unset bus URL and run id
    resolved (for commands that join a run): ``$KRL_NATS``/``$KRL_RUN``, the latest local run, the defaults."""
    flags = getattr(args, "setting_flags", {}) or {}
    named: dict[str, Any] = {}
    for dest, keys in flags.items():
        if getattr(args, dest) is not None:
            named.update(dict.fromkeys((keys,) if isinstance(keys, str) else keys, getattr(args, dest)))
    config = load_config(args.config_file, args.config_sets, named)
    if getattr(args, "resolve_bus", False):
        root = Path(config.run.runs_root)
        url, run = config.bus.url or resolve_nats_url(None, root)[0], config.bus.run or resolve_run_id(None, root)
    else:  # ``kernelrl run``: unset means "start a broker" and "a new run", unless the environment names them
        url, run = config.bus.url or os.environ.get("KRL_NATS", ""), config.bus.run or os.environ.get("KRL_RUN", "")
    config = msgspec.structs.replace(config, bus=msgspec.structs.replace(config.bus, url=url, run=run))
    try:
        validate(config)  # the run id from the environment too
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from the environment or the latest run)") from None
    return config


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
    """Load the configuration (``args.config``), run the command's coroutine; a configuration error and an
    unreachable broker are one line and exit 2."""
    from kernelrl.core.actor import run_main

    if hasattr(args, "config_sets"):
        try:
            args.config = config_from_arguments(args)
        except ConfigError as exc:
            print(f"{prog}: configuration: {exc}", file=sys.stderr)
            return 2
        if args.print_config:
            print(config_toml(args.config), end="")
            return 0
        args.nats, args.run = args.config.bus.url, args.config.bus.run
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
