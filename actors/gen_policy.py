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
import nats.js.errors

from kernelrl.actors.gen_backend import Backend, BackendError
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
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


async def watch_policy(bus: Bus, backend: Backend, gate: TurnGate, counters: Counter[str], stopping: asyncio.Event,
                       poll_s: float = 1.0) -> None:  # fmt: skip
    """Apply every newer ``PolicyUpdate`` published under the bucket's ``latest`` key until ``stopping``."""
    kv = await bus.kv(bus.subjects.policy_bucket)
    codec = m.codec_for(m.PolicyUpdate)
    refused = -1  # a version that failed to load is not retried (the generator keeps sampling the one it has)
    while not stopping.is_set():
        try:
            entry = await kv.get(s.POLICY_LATEST_KEY)
            update = codec.decode(entry.value or b"")
        except nats.js.errors.KeyNotFoundError:
            update = None
        except (nats.errors.Error, TimeoutError, m.DecodeError) as exc:
            log.warning("policy bucket not read: %r", exc)
            update = None
        if update is not None and update.version > backend.policy_version and update.version != refused:
            async with gate.update():
                log.info("applying policy v%d (%s) over v%d", update.version, update.path, backend.policy_version)
                try:
                    await backend.apply_update(update)
                    counters["policy_updates"] += 1
                except BackendError as exc:
                    refused = update.version
                    counters["policy_update_failed"] += 1
                    log.error("policy v%d not applied, still sampling v%d: %s", update.version, backend.policy_version, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), poll_s)
