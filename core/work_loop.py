"""The work loop every pull-consuming role shares: fetch, work, publish the outcome durably, then ack.

For each message of a work queue (``core.consumers``): the role's handler runs while the message is kept
in progress; its outcome (``(subject, message)`` pairs) is published — through JetStream for the run's
subjects — and only then is the message acked. A message that does not decode is terminated (the role may
answer it first); a handler that raises ``Reject`` terminates it; a handler that raises anything else
releases it for a retry after ``retry_delay_s``; on shutdown an unfinished job is interrupted and released
after ``release_delay_s``. A message that exhausts ``max_deliver`` (a batch that crashed the learner every
time) is parked: copied to ``krl.<run>.parked.<consumer>``, announced by a ``WorkParked`` event in the
run's log, and removed from its queue, so it is never redelivered and never lost.

Handlers must run blocking work off the event loop (``asyncio.to_thread``) so heartbeats keep beating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg

from kernelrl.core import messages as m
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus, Delivery, PullConsumer
from kernelrl.core.config import WorkSettings
from kernelrl.core.consumers import ConsumerSpec

log = logging.getLogger(__name__)

T = TypeVar("T", bound=m.Message)

Outcome = Sequence[tuple[str, m.Message]]

PARKED_FROM_HEADER = "Krl-Parked-From"
PARK_ATTEMPTS = 5
DELIVERIES_HEADER = "Krl-Deliveries"


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: it is terminated, not retried."""


class WorkOwner(Protocol):
    state: str
    counters: Counter[str]


def max_deliveries_advisory(stream: str, durable: str) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"


class WorkLoop(Generic[T]):
    """One role instance's loop over its work consumer. ``handle`` gets each decoded delivery (its message, and
    ``attempt``: which delivery this is) and must not settle it. ``owner.state`` is ``busy_state`` while a job runs."""

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        work: WorkSettings,
        owner: WorkOwner,
        handle: Callable[[Delivery[T]], Awaitable[Outcome]],
        *,
        busy_state: str = "working",
        interrupt: Callable[[], Awaitable[None]] | None = None,
        on_undecodable: Callable[[Msg, str], Awaitable[None]] | None = None,
        on_exhausted: Callable[[T, int], Awaitable[Outcome]] | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.work = work
        self.owner = owner
        self.handle = handle
        self.busy_state = busy_state
        self.interrupt = interrupt  # unblocks a handler stuck in blocking work (the evaluator kills its worker)
        self.on_undecodable = on_undecodable
        self.on_exhausted = on_exhausted  # extra outcomes for a parked message (the evaluator: "evaluator_lost")
        self._busy: dict[int, float] = {}  # job (delivery id) -> when it started
        self._last_job_s = 0.0
        self._in_progress_interval_s = work.in_progress_interval_s

    def gauges(self) -> dict[str, float]:
        """``job_s``: seconds into the oldest job in hand (0 when idle); ``jobs_in_hand``; ``last_job_s``: how long
        the last one took."""
        now = time.monotonic()
        oldest = now - min(self._busy.values()) if self._busy else 0.0
        return {"job_s": round(oldest, 3), "jobs_in_hand": float(len(self._busy)), "last_job_s": round(self._last_job_s, 3)}

    async def run(self, stopping: asyncio.Event, ready: Callable[[], Awaitable[None]] | None = None, slots: int = 1) -> None:
        """Listen for exhausted messages, run ``ready`` (a slow start-up), then pull until ``stopping``, with up to
        ``slots`` jobs in hand at once (one pull subscription each, so a slow job never holds up another)."""
        advisories = await self.bus.nc.subscribe(
            max_deliveries_advisory(self.spec.stream, self.spec.durable),
            queue=f"krl-park-{self.spec.stream}-{self.spec.durable}",  # one instance parks each message
            cb=self._on_max_deliveries,
        )
        consumers: list[PullConsumer[T]] = []
        try:
            if ready is not None:
                await ready()
            await self._check_ack_wait()
            for _ in range(slots):
                consumers.append(await self.bus.pull(self.spec.stream, self.spec.durable))
                consumers[-1].on_undecodable = self._undecodable
            self.owner.state = "idle"
            async with asyncio.TaskGroup() as tg:
                for consumer in consumers:
                    tg.create_task(self._pull(consumer, stopping))
        finally:
            for consumer in consumers:
                await consumer.close()
            # drain, not unsubscribe: a park under way finishes (unsubscribe would cancel it halfway)
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(advisories.drain(), self.bus.settings.publish_deadline_s)

    async def _check_ack_wait(self) -> None:
        """The consumer keeps the ack_wait it was created with (a continued run, another host's configuration):
        mark jobs in progress often enough for that one, not only for this process's configuration."""
        info = await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
        ack_wait = info.config.ack_wait or self.spec.ack_wait_s
        if self.work.in_progress_interval_s > ack_wait / 2:
            self._in_progress_interval_s = ack_wait / 3
            log.warning("%s: consumer %s has ack_wait %.1fs (this configuration: %.1fs); marking jobs in progress every "
                        "%.1fs", self.spec.role, self.spec.durable, ack_wait, self.spec.ack_wait_s,
                        self._in_progress_interval_s)  # fmt: skip

    async def _pull(self, consumer: PullConsumer[T], stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            for delivery in await consumer.fetch(1, self.work.fetch_timeout_s):
                await self.process(delivery, stopping)

    async def _undecodable(self, raw: Msg, reason: str) -> None:
        self.owner.counters["undecodable"] += 1
        if self.on_undecodable is not None:
            await self.on_undecodable(raw, reason)

    async def process(self, delivery: Delivery[T], stopping: asyncio.Event) -> None:
        """One message, settled exactly once: acked after its outcome is published, or released, or terminated."""
        key = id(delivery)
        self._busy[key] = time.monotonic()
        self.owner.state = self.busy_state
        job = asyncio.ensure_future(self.handle(delivery))
        stop_wait = asyncio.ensure_future(stopping.wait())
        try:
            while not job.done():
                await asyncio.wait({job, stop_wait}, timeout=self._in_progress_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if job.done():
                    break
                if stopping.is_set():
                    await self._release(delivery, job)
                    return
                await self._settle("in_progress", delivery.in_progress())
        except asyncio.CancelledError:
            job.cancel()  # never leave a job running with nobody to settle it (it returns after ack_wait)
            raise
        finally:
            stop_wait.cancel()
            self._last_job_s = time.monotonic() - self._busy.pop(key)
            self.owner.state = self.busy_state if self._busy else "idle"
        try:
            outcome = job.result()
        except Reject as exc:
            log.error("%s: %s %s rejected: %s; terminated", self.spec.role, type(delivery.msg).__name__,
                      m.message_id(delivery.msg), exc)  # fmt: skip
            self.owner.counters["rejected"] += 1
            await self._settle("term", delivery.term())
            return
        except Exception:
            log.exception("%s: %s %s failed; it comes back in %.1fs (delivery %d of at most %d)", self.spec.role,
                          type(delivery.msg).__name__, m.message_id(delivery.msg), self.work.retry_delay_s,
                          delivery.raw.metadata.num_delivered, self.spec.max_deliver)  # fmt: skip
            self.owner.counters["failed"] += 1
            await self._settle("nak", delivery.nak(self.work.retry_delay_s))
            return
        try:
            for subject, msg in outcome:
                await self.bus.publish_outcome(subject, msg)
        except (nats.errors.Error, TimeoutError) as exc:
            # Not acked: the job comes back and is done again; outcomes carry ids derived from the job, so a
            # reader (the logger, an eval inbox) keeps one copy of each.
            log.error("%s: the outcome of %s %s could not be published (%r); it comes back in %.1fs", self.spec.role,
                      type(delivery.msg).__name__, m.message_id(delivery.msg), exc, self.work.retry_delay_s)  # fmt: skip
            self.owner.counters["publish_failed"] += 1
            await self._settle("nak", delivery.nak(self.work.retry_delay_s))
            return
        await self._settle("ack", delivery.ack())
        self.owner.counters["done"] += 1

    async def _release(self, delivery: Delivery[T], job: asyncio.Future[Outcome]) -> None:
        """Shutdown mid-job: unblock and end the handler, then hand the message back for another instance."""
        if self.interrupt is not None:
            await self.interrupt()
        else:
            job.cancel()
        await asyncio.wait({job})  # its result or error does not matter now; our own cancellation still propagates
        await self._settle("nak", delivery.nak(self.work.release_delay_s))
        self.owner.counters["released"] += 1

    async def _settle(self, what: str, call: Awaitable[None]) -> None:
        """A failed ack/nak/in-progress is not fatal: the message comes back after ack_wait and the job is done
        again; its outcomes carry ids derived from the job, so readers (the logger, an eval inbox) keep one copy."""
        try:
            await call
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("%s: %s not sent (%r); the message returns after ack_wait", self.spec.role, what, exc)

    # ------------------------------------------------------------ parking

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        try:
            info = orjson.loads(advisory.data)
            seq, deliveries = int(info["stream_seq"]), int(info.get("deliveries", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("%s: max-deliveries advisory not understood: %r", self.spec.role, exc)
            return
        # The server says so once: retry until parked (each step is idempotent), or give up loudly.
        for attempt in range(1, PARK_ATTEMPTS + 1):
            try:
                await self.park(seq, deliveries)
                return
            except (nats.errors.Error, TimeoutError) as exc:
                log.error("%s: message %d of %s exhausted its deliveries; parking it failed (attempt %d of %d): %r",
                          self.spec.role, seq, self.spec.stream, attempt, PARK_ATTEMPTS, exc)  # fmt: skip
                await asyncio.sleep(min(2.0**attempt, 30.0))
        self.owner.counters["park_failed"] += 1

    async def park(self, seq: int, deliveries: int) -> None:
        """Copy stream message ``seq`` to the parked stream, announce it, publish the role's outcomes for it, and only
        then remove it from its queue (a failure on the way leaves it where it was)."""
        st = self.bus.subjects
        try:
            stored = await self.bus.js.get_msg(self.spec.stream, seq)
        except nats.js.errors.NotFoundError:
            return  # parked already, or settled meanwhile
        headers = dict(stored.headers or {})
        data = stored.data or b""
        msg_id = headers.get(MSG_ID_HEADER) or f"{self.spec.stream}-{seq}"
        try:
            msg: T | None = self.bus.decode(stored.subject or "", data, headers)  # type: ignore[assignment]
        except m.DecodeError:
            msg = None
        parked_subject = st.parked(self.spec.durable)
        parked_headers = {**headers, MSG_ID_HEADER: f"parked-{msg_id}", PARKED_FROM_HEADER: f"{self.spec.stream}:{seq}",
                          DELIVERIES_HEADER: str(deliveries)}  # fmt: skip
        await self.bus.publish_raw(parked_subject, data, parked_headers)
        event = m.WorkParked(
            event_id=f"parked-{self.spec.durable}-{msg_id}",
            timestamp=m.log_timestamp(),
            run_id=self.bus.settings.run,
            role=self.spec.role,
            consumer=self.spec.durable,
            stream=self.spec.stream,
            stream_seq=seq,
            deliveries=deliveries,
            message_type=headers.get(TYPE_HEADER, type(msg).__name__ if msg is not None else ""),
            message_id=msg_id,
            parked_subject=parked_subject,
            created_at=time.time(),
        )
        await self.bus.publish(st.event_parked, event)
        if msg is not None and self.on_exhausted is not None:
            for subject, out in await self.on_exhausted(msg, deliveries):
                await self.bus.publish_outcome(subject, out)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.bus.js.delete_msg(self.spec.stream, seq)
        self.owner.counters["parked"] += 1
        log.error("%s: %s %s gave up after %d deliveries; parked on %s", self.spec.role, event.message_type, msg_id,
                  deliveries, parked_subject)  # fmt: skip
