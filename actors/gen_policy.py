"""Policy updates for a generator: watch the run's policy bucket, apply a new version between turns.

Turns hold ``TurnGate.turn()`` (shared) around their ``generate``; an update takes the gate exclusively, so it
waits for the turns being sampled to finish and holds new ones back until the weights are swapped: no turn is
ever sampled half with one policy and half with another, and each turn records the version it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator

import nats.errors

from kernelrl.actors.gen_backend import Backend, BackendError
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus

log = logging.getLogger(__name__)


class TurnGate:
    """Many turns at once, or one update alone; a waiting update goes before new turns."""

    def __init__(self) -> None:
        self._turns = 0
        self._updating = False
        self._update_waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._updating and not self._update_waiting)
            self._turns += 1
        try:
            yield
        finally:
            async with self._changed:
                self._turns -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def update(self) -> AsyncIterator[None]:
        async with self._changed:
            self._update_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._updating and self._turns == 0)
            finally:
                self._update_waiting -= 1
            self._updating = True
        try:
            yield
        finally:
            async with self._changed:
                self._updating = False
                self._changed.notify_all()


class PolicyWatcher:
    """Applies the policy bucket's newest ``PolicyUpdate`` to a generator's backend: polled every second, and asked
    directly before each dialogue, so a dialogue issued right after an update (a synchronous run) samples it."""

    def __init__(self, bus: Bus, backend: Backend, gate: TurnGate, counters: Counter[str]) -> None:
        self.bus = bus
        self.backend = backend
        self.gate = gate
        self.counters = counters
        self.refused = -1  # a version that failed to load is not retried (the generator keeps sampling the one it has)
        self._checking = asyncio.Lock()

    async def check(self) -> None:
        async with self._checking:  # one read and one load at a time, however many dialogues ask
            try:
                update = await self.bus.latest_policy()
            except (nats.errors.Error, TimeoutError, m.DecodeError) as exc:
                log.warning("policy bucket not read: %r", exc)
                return
            if update is None or update.version <= self.backend.policy_version or update.version == self.refused:
                return
            async with self.gate.update():
                log.info("applying policy v%d (%s) over v%d", update.version, update.path, self.backend.policy_version)
                try:
                    await self.backend.apply_update(update)
                    self.counters["policy_updates"] += 1
                except BackendError as exc:
                    self.refused = update.version
                    self.counters["policy_update_failed"] += 1
                    log.error("policy v%d not applied, still sampling v%d: %s", update.version, self.backend.policy_version, exc)

    async def watch(self, stopping: asyncio.Event, poll_s: float = 1.0) -> None:
        """Apply every newer update until ``stopping``."""
        while not stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), poll_s)
