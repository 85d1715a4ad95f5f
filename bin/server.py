"""``kernelrl server``: only the broker — the embedded nats-server — for runs that span hosts.

Listens on ``--listen HOST:PORT`` (default ``0.0.0.0:4222``: reachable from the other hosts), keeps its
JetStream store in ``--store``, and with ``--cluster NAME --cluster-listen HOST:PORT --routes URL,…`` is one
node of a NATS cluster (give each node its own ``--name``). It is supervised: if it dies it is restarted on
the same port and store, at most 5 times in 10 minutes. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

from kernelrl.bin.common import command_main
from kernelrl.core.config import RunSettings
from kernelrl.core.nats_server import NATS_PORT, ClusterSettings, EmbeddedNatsServer
from kernelrl.core.supervisor import RestartBudget

RUN_DEFAULTS = RunSettings()  # the broker restarts and syncs like the embedded one of ``kernelrl run``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=f"0.0.0.0:{NATS_PORT}", help="client address, HOST:PORT (default %(default)s)")
    parser.add_argument("--store", type=Path, default=Path("runs/server"), help="JetStream store (default %(default)s)")
    parser.add_argument("--name", default=socket.gethostname(), help="server name, unique in a cluster (default: host name)")
    parser.add_argument("--cluster", default=None, help="cluster name: run as one node of a NATS cluster")
    parser.add_argument("--cluster-listen", default="0.0.0.0:6222", help="route address, HOST:PORT (default %(default)s)")
    parser.add_argument("--routes", default="", help="the other nodes' routes, comma-separated nats-route://HOST:PORT")
    parser.add_argument("--domain", default=None, help="JetStream domain")
    parser.add_argument("--nats-sync", default=RUN_DEFAULTS.nats_sync, help="JetStream sync_interval (see kernelrl run --help)")
    parser.add_argument("--log-level", default="INFO")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{flag} {text!r}: use HOST:PORT")
    return host, int(port)


async def amain(args: argparse.Namespace) -> int:
    try:
        host, port = parse_address(args.listen, "--listen")
        cluster = None
        if args.cluster:
            parse_address(args.cluster_listen, "--cluster-listen")
            routes = [r.strip() for r in args.routes.split(",") if r.strip()]
            cluster = ClusterSettings(name=args.cluster, listen=args.cluster_listen, routes=routes)
    except ValueError as exc:
        print(f"kernelrl server: {exc}", file=sys.stderr)
        return 2
    server = EmbeddedNatsServer(args.store, port=port, host=host, sync_interval=args.nats_sync, server_name=args.name,
                                cluster=cluster, domain=args.domain)  # fmt: skip
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    gave_up: dict[str, str] = {}
    async with server:
        where = f"cluster {args.cluster}, " if cluster else ""
        print(f"kernelrl server: NATS at {server.url} ({where}store {server.store_dir}); Ctrl-C stops", flush=True)
        budget = RestartBudget(RUN_DEFAULTS.restart_budget, RUN_DEFAULTS.restart_window_s)
        await server.supervise(stopping, budget, gave_up)
    if gave_up:
        print(f"kernelrl server: stopped because nats-server {gave_up['nats-server']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl server", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
