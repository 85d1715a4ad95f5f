"""Helpers shared by tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kernelrl.core import messages as m


def kernelrl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kernelrl.bin.cli", *args]


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def small_turn(run_id: str, i: int) -> m.TurnEvent:
    return m.TurnEvent(
        event_id=f"{run_id}-turn-{i}",
        timestamp=m.log_timestamp(),
        instance_id=f"level1/{i % 50}_Op",
        turn_idx=i % 3,
        turn_data=m.TurnData(response=f"response {i}", kernel_code="@triton.jit", reward=0.1 * (i % 4)),
        run_id=run_id,
    )


def command_env() -> dict[str, str]:
    """This environment without the variables that would point a command at another broker or run."""
    return {k: v for k, v in os.environ.items() if k not in ("KRL_NATS", "KRL_RUN")} | {"PYTHONUNBUFFERED": "1"}


def children_of(pid: int, needle: str = "") -> list[int]:
    """Pids of ``pid``'s children (whose command line contains ``needle``), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and needle.encode() in cmdline:
            found.append(int(entry.name))
    return found
