"""A requester's eval results, from the run's results stream: nothing is missed while it was away, each
``eval_id`` is delivered once.

Evaluators publish each ``EvalResult`` to ``krl.<run>.eval.result.<requester>``, which the results stream
keeps for ``BusSettings.results_max_age_s``. The inbox reads that subject through an ordered JetStream
consumer from the beginning, so a result published while the requester was disconnected (or before it
started) still arrives, and a result seen twice (a job redelivered after its evaluator died) is counted
in ``duplicates`` and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from kernelrl.core import messages as m
from kernelrl.core.bus import Bus


class EvalResultInbox:
    def __init__(self, bus: Bus, requester_id: str) -> None:
        self.bus = bus
        self.subject = bus.subjects.eval_result(requester_id)
        self.results: dict[str, m.EvalResult] = {}
        self.duplicates = 0
        self.undecodable = 0
        self._waiters: dict[str, asyncio.Future[m.EvalResult]] = {}
        self._sub: object | None = None

    async def start(self) -> None:
        self._sub = await self.bus.js.subscribe(
            self.subject, cb=self._on_msg, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )

    async def _on_msg(self, msg: Msg) -> None:
        try:
            result = m.codec_for(m.EvalResult).decode(msg.data)
        except m.DecodeError:
            self.undecodable += 1
            return
        if result.eval_id in self.results:
            self.duplicates += 1
            return
        self.results[result.eval_id] = result
        waiter = self._waiters.pop(result.eval_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    async def wait(self, eval_id: str, timeout_s: float) -> m.EvalResult:
        """The result for ``eval_id``; TimeoutError if none arrives in time (the caller's own time-out)."""
        if eval_id in self.results:
            return self.results[eval_id]
        waiter = self._waiters.setdefault(eval_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            self._waiters.pop(eval_id, None)
            raise

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None
