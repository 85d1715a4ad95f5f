"""Child processes of ``kernelrl run``: start them, restart a crashed one, stop them all cleanly.

Invariant: on stop every child gets SIGTERM, then SIGKILL after the grace period; a child that exits
non-zero is restarted with backoff while its ``RestartBudget`` allows (``max_restarts`` within
``window_s``, per child); one that exits 0 is done. A child that exhausts its budget stops the run and is
named in ``gave_up``, so the run exits non-zero with a summary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import time

import msgspec

from kernelrl.core.config import RunSettings

log = logging.getLogger(__name__)


_RUN_DEFAULTS = RunSettings()


class ChildSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    argv: list[str]
    restart: bool = True
    max_restarts: int = _RUN_DEFAULTS.restart_budget
    window_s: float = _RUN_DEFAULTS.restart_window_s
    backoff_s: float = 1.0


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self.total = 0

    def allow(self, now: float | None = None) -> bool:
        """Record a restart; False when it would exceed the budget."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        self._times.append(now)
        self.total += 1
        return len(self._times) <= self.max_restarts

    @property
    def recent(self) -> int:
        return len(self._times)


class Supervisor:
    def __init__(self, specs: list[ChildSpec], grace_s: float = 30.0) -> None:
        self.specs = specs
        self.grace_s = grace_s
        self.exit_codes: dict[str, int] = {}
        self.starts: dict[str, int] = {spec.name: 0 for spec in specs}
        self.finished: dict[str, asyncio.Event] = {spec.name: asyncio.Event() for spec in specs}
        self.gave_up: dict[str, str] = {}  # child name -> why the run stopped because of it

    async def run(self, stopping: asyncio.Event) -> dict[str, int]:
        async with asyncio.TaskGroup() as tg:
            for spec in self.specs:
                tg.create_task(self._keep(spec, stopping))
        return self.exit_codes

    async def _keep(self, spec: ChildSpec, stopping: asyncio.Event) -> None:
        budget = RestartBudget(spec.max_restarts, spec.window_s)
        try:
            while not stopping.is_set():
                proc = await asyncio.create_subprocess_exec(*spec.argv)
                self.starts[spec.name] += 1
                log.info("started %s (pid %d)", spec.name, proc.pid)
                code = await self._wait_or_stop(proc, stopping)
                self.exit_codes[spec.name] = code
                if stopping.is_set() or code == 0 or not spec.restart:
                    if code != 0 and not stopping.is_set():
                        log.error("%s exited with status %d", spec.name, code)
                    return
                if not budget.allow():
                    why = (f"exited with status {code}; {budget.recent} restarts within {spec.window_s:.0f}s "
                           f"({budget.total - 1} in all) exhausted its budget of {spec.max_restarts}")  # fmt: skip
                    log.error("%s %s; stopping the run", spec.name, why)
                    self.gave_up[spec.name] = why
                    stopping.set()
                    return
                log.warning("%s exited with status %d; restart %d/%d within %.0fs", spec.name, code, budget.recent,
                            spec.max_restarts, spec.window_s)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), min(spec.backoff_s * 2.0 ** (budget.recent - 1), 30.0))
        finally:
            self.finished[spec.name].set()

    async def _wait_or_stop(self, proc: asyncio.subprocess.Process, stopping: asyncio.Event) -> int:
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.grace_s)
            except TimeoutError:
                log.error("child pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        return await waiter
