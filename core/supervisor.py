"""Child processes of ``kernelrl run``: start them, restart a crashed one, stop them all cleanly.

Invariant: on stop every child gets SIGTERM, then SIGKILL after the grace period; a child that exits
non-zero is restarted with backoff up to ``max_restarts`` times; one that exits 0 is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import msgspec

log = logging.getLogger(__name__)


class ChildSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    argv: list[str]
    restart: bool = True
    max_restarts: int = 5
    backoff_s: float = 1.0


class Supervisor:
    def __init__(self, specs: list[ChildSpec], grace_s: float = 30.0) -> None:
        self.specs = specs
        self.grace_s = grace_s
        self.exit_codes: dict[str, int] = {}
        self.starts: dict[str, int] = {spec.name: 0 for spec in specs}
        self.finished: dict[str, asyncio.Event] = {spec.name: asyncio.Event() for spec in specs}

    async def run(self, stopping: asyncio.Event) -> dict[str, int]:
        async with asyncio.TaskGroup() as tg:
            for spec in self.specs:
                tg.create_task(self._keep(spec, stopping))
        return self.exit_codes

    async def _keep(self, spec: ChildSpec, stopping: asyncio.Event) -> None:
        restarts = 0
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
                restarts += 1
                if restarts > spec.max_restarts:
                    log.error("%s exited with status %d %d times; giving up", spec.name, code, restarts)
                    stopping.set()
                    return
                log.warning("%s exited with status %d; restart %d/%d", spec.name, code, restarts, spec.max_restarts)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), min(spec.backoff_s * 2.0 ** (restarts - 1), 30.0))
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
