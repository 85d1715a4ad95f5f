"""Typed NATS access for actors: connect, provision a run, publish and pull messages.

Invariants: a JetStream publish carries ``Nats-Msg-Id`` = the message's own id and is retried on
time-outs until ``publish_deadline_s`` (so it is stored once, even across a server restart); a message
that does not decode is counted, logged with its subject and reason, and terminated, never redelivered;
``close()`` unsubscribes pull subscriptions before draining (nats-py 2.16 otherwise hangs in drain()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.config import BusSettings, Config
from kernelrl.core.consumers import ConsumerSpec, consumer_table

log = logging.getLogger(__name__)

TYPE_HEADER = "Krl-Type"
MSG_ID_HEADER = "Nats-Msg-Id"

T = TypeVar("T", bound=m.Message)

_RETRYABLE_PUBLISH = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
)
_FETCH_EMPTY = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.js.errors.FetchTimeoutError)
# JetStream briefly unavailable (server restarting, reconnecting): wait and try again, never crash the actor
_FETCH_UNAVAILABLE = (
    nats.js.errors.ServiceUnavailableError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)


UNAVAILABLE_REMINDER_S = 30.0


class Delivery(Generic[T]):
    """A decoded JetStream message and the handles to settle it."""

    __slots__ = ("msg", "raw")

    def __init__(self, msg: T, raw: Msg) -> None:
        self.msg = msg
        self.raw = raw

    @property
    def subject(self) -> str:
        return self.raw.subject

    @property
    def data(self) -> bytes:
        return self.raw.data

    @property
    def stream_seq(self) -> int:
        return self.raw.metadata.sequence.stream

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first redelivery ..."""
        return self.raw.metadata.num_delivered

    async def ack(self) -> None:
        await self.raw.ack()

    async def nak(self, delay_s: float | None = None) -> None:
        await self.raw.nak(delay=delay_s)

    async def in_progress(self) -> None:
        await self.raw.in_progress()

    async def term(self) -> None:
        await self.raw.term()


class PullConsumer(Generic[T]):
    """A pull subscription bound to a durable consumer; ``fetch`` yields only decoded messages.

    ``on_undecodable`` (if set) sees each message that does not decode, with the reason, before it is
    terminated: a role can still answer a request it cannot read.
    """

    def __init__(self, bus: Bus, psub: JetStreamContext.PullSubscription, name: str) -> None:
        self._bus = bus
        self._psub = psub
        self.name = name
        self.on_undecodable: Callable[[Msg, str], Awaitable[None]] | None = None
        self._unavailable_logged_at = -UNAVAILABLE_REMINDER_S

    async def fetch(self, batch: int, timeout_s: float) -> list[Delivery[T]]:
        """Up to ``batch`` messages; an empty list when none arrived within ``timeout_s``."""
        try:
            raws = await self._psub.fetch(batch, timeout=timeout_s)
        except _FETCH_EMPTY:
            return []
        except _FETCH_UNAVAILABLE as exc:
            now = time.monotonic()
            if now - self._unavailable_logged_at >= UNAVAILABLE_REMINDER_S:  # one line, then a reminder now and then
                self._unavailable_logged_at = now
                log.warning("fetch from %s: JetStream unavailable (%r); retrying", self.name, exc)
            await asyncio.sleep(max(min(timeout_s, 0.5), 0.1))
            return []
        out: list[Delivery[T]] = []
        for raw in raws:
            try:
                msg = self._bus.decode(raw.subject, raw.data, raw.headers)
            except m.DecodeError as exc:
                if self.on_undecodable is not None:
                    await self.on_undecodable(raw, str(exc))
                await self._bus.reject(raw, str(exc))
                continue
            out.append(Delivery(msg, raw))  # type: ignore[arg-type]
        return out

    async def close(self) -> None:
        try:
            await self._psub.unsubscribe()
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError, ValueError):
            pass


class ConnectionReporter:
    """Connection state for the log: one line per change, then a reminder at most every ``reminder_s``.

    nats-py reports every failed reconnect attempt (several a second); while the server is away those
    become one line saying so, and a reminder now and then, not a flood.
    """

    def __init__(self, name: str, url: str, reminder_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.url = url
        self.reminder_s = reminder_s
        self.clock = clock
        self.connected = True
        self.first_connect = True  # errors before the first connection are the caller's to report, once
        self._down_since = 0.0
        self._last_line = 0.0

    def disconnected(self) -> None:
        self.first_connect = False  # it was connected, so what follows are reconnect attempts
        if self.connected:
            self.connected = False
            self._down_since = self._last_line = self.clock()
            log.warning("nats %s: disconnected from %s; reconnecting", self.name, self.url)

    def reconnected(self) -> None:
        if not self.connected:
            log.info("nats %s: reconnected to %s after %.1fs", self.name, self.url, self.clock() - self._down_since)
        self.connected = True

    def error(self, exc: Exception) -> None:
        now = self.clock()
        if self.first_connect:
            return
        if self.connected:
            log.warning("nats %s: %r", self.name, exc)
        elif now - self._last_line >= self.reminder_s:
            self._last_line = now
            log.warning("nats %s: still disconnected from %s after %.0fs (%r)", self.name, self.url, now - self._down_since, exc)


class Bus:
    """One NATS connection, its JetStream context and the subjects of one run."""

    def __init__(self, nc: NatsClient, settings: BusSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=settings.publish_timeout_s)
        self.settings = settings
        self.subjects = s.RunSubjects(settings.run)
        self.decode_failures: Counter[str] = Counter()
        self.publish_retries = 0
        self._consumers: list[PullConsumer[Any]] = []

    @classmethod
    async def connect(cls, settings: BusSettings, name: str) -> Bus:
        nc = NatsClient()

        reporter = ConnectionReporter(name, settings.url)

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):
                reporter.disconnected()

        async def on_reconnect() -> None:
            reporter.reconnected()

        async def on_error(exc: Exception) -> None:
            reporter.error(exc)

        # nats-py retries an unreachable server forever when reconnects are unlimited: bound the first try.
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[url.strip() for url in settings.url.split(",") if url.strip()],
                    name=name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=settings.reconnect_wait_s,
                    connect_timeout=max(1, int(settings.connect_timeout_s)),
                    ping_interval=int(settings.ping_interval_s),
                    max_outstanding_pings=3,
                    drain_timeout=int(settings.drain_timeout_s),
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                settings.connect_timeout_s,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            with contextlib.suppress(nats.errors.Error):
                await nc.close()
            raise ConnectionError(f"cannot reach NATS at {settings.url}: {exc!r}") from exc
        reporter.first_connect = False
        return cls(nc, settings)

    # ------------------------------------------------------------ provisioning

    async def provision(self, consumers: Sequence[ConsumerSpec] | None = None) -> None:
        """Create the run's streams, the durable consumers of ``consumers`` (by default the table of a run with
        default settings: ``core.consumers``) and KV buckets; idempotent.

        A stream whose configuration changed is updated; an existing consumer keeps its configuration.
        """
        st, cfg = self.subjects, self.settings
        storage = api.StorageType.MEMORY if cfg.storage_in_memory else api.StorageType.FILE
        common = {
            "storage": storage,
            "duplicate_window": cfg.duplicate_window_s,
            "max_msg_size": cfg.max_msg_size,
            "num_replicas": cfg.replicas,
        }
        await self._ensure_stream(
            api.StreamConfig(
                name=st.rollout_stream,
                subjects=[st.rollout_request],
                retention=api.RetentionPolicy.WORK_QUEUE,
                **common,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=st.eval_stream,
                subjects=[st.eval_request],
                retention=api.RetentionPolicy.WORK_QUEUE,
                **common,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=st.event_stream,
                subjects=[st.events],
                retention=api.RetentionPolicy.LIMITS,
                max_age=cfg.event_max_age_s or None,
                max_bytes=cfg.event_max_bytes,
                **common,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=st.results_stream,
                subjects=[st.eval_results],
                retention=api.RetentionPolicy.LIMITS,
                max_age=cfg.results_max_age_s,
                **common,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=st.batch_stream,
                subjects=[st.batch],
                retention=api.RetentionPolicy.WORK_QUEUE,
                **common,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=st.parked_stream,
                subjects=[st.parked_all],
                retention=api.RetentionPolicy.LIMITS,
                max_age=cfg.parked_max_age_s or None,
                **common,
            )
        )
        for spec in consumer_table(Config(bus=cfg)) if consumers is None else consumers:
            await self.ensure_consumer(spec.stream, spec.consumer_config())
        await self._ensure_kv(api.KeyValueConfig(bucket=st.policy_bucket, history=8, storage=storage, replicas=cfg.replicas))
        await self._ensure_kv(api.KeyValueConfig(bucket=st.buffer_bucket, history=4, storage=storage, replicas=cfg.replicas))
        await self._ensure_kv(api.KeyValueConfig(bucket=st.actors_bucket, history=1, ttl=cfg.heartbeat_ttl_s, storage=storage,
                                                 replicas=cfg.replicas))  # fmt: skip

    async def _patiently(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """A JetStream API call retried on time-outs and 503s until ``publish_deadline_s``: a cluster electing
        leaders, or a server restarting, answers late for a while. Creating what exists is idempotent here."""
        deadline = time.monotonic() + self.settings.publish_deadline_s
        while True:
            try:
                return await call()
            except (*_RETRYABLE_PUBLISH, *_FETCH_UNAVAILABLE) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: JetStream did not answer (%r); retrying", what, exc)
                await asyncio.sleep(0.5)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        await self._patiently(f"stream {config.name}", lambda: self._create_or_update_stream(config))

    async def _create_or_update_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different configuration
                raise
            await self.js.update_stream(config)

    async def ensure_consumer(self, stream: str, config: api.ConsumerConfig) -> None:
        """Create the durable consumer if it does not exist; an existing one keeps its configuration.

        (``add_consumer`` would silently update an existing consumer's ``ack_wait`` and friends to this
        actor's defaults, undoing what the run was provisioned with.)
        """
        await self._patiently(f"consumer {config.durable_name}", lambda: self._create_consumer(stream, config))

    async def _create_consumer(self, stream: str, config: api.ConsumerConfig) -> None:
        durable = config.durable_name or ""
        try:
            await self.js.consumer_info(stream, durable)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await self.js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10148:  # created meanwhile by another actor with another configuration
                raise

    async def _ensure_kv(self, config: api.KeyValueConfig) -> None:
        await self._patiently(f"bucket {config.bucket}", lambda: self._create_kv(config))

    async def _create_kv(self, config: api.KeyValueConfig) -> None:
        try:
            await self.js.key_value(config.bucket)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(config)

    async def kv(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    # ------------------------------------------------------------ publishing

    async def publish(self, subject: str, msg: m.Message) -> api.PubAck:
        """Publish to JetStream, stored once however often it is retried."""
        codec = m.CODECS[type(msg).__name__]
        headers = {TYPE_HEADER: codec.type_name, MSG_ID_HEADER: m.message_id(msg)}
        return await self.publish_raw(subject, codec.encode(msg), headers)

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str]) -> api.PubAck:
        """Publish bytes to JetStream, retried until ``publish_deadline_s``; ``headers`` must carry the
        ``Nats-Msg-Id`` that makes the retries store it once."""
        deadline = time.monotonic() + self.settings.publish_deadline_s
        delay = 0.05
        while True:
            try:
                return await self.js.publish(subject, payload, timeout=self.settings.publish_timeout_s, headers=dict(headers))
            except _RETRYABLE_PUBLISH as exc:
                if time.monotonic() + delay > deadline:
                    raise TimeoutError(
                        f"publish of {headers.get(TYPE_HEADER, 'a message')} to {subject} not acknowledged within "
                        f"{self.settings.publish_deadline_s:.0f}s: {exc!r}"
                    ) from exc
                self.publish_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def publish_many(self, items: Iterable[tuple[str, m.Message]], window: int = 1024) -> list[api.PubAck]:
        """Publish many messages with up to ``window`` acknowledgements outstanding, in order.

        Pipelined through nats-py's ``publish_async``; a message whose acknowledgement does not come
        (time-out, server restart) is re-published through ``publish`` with the same ``Nats-Msg-Id``.
        """
        acks: list[api.PubAck] = []
        chunk: list[tuple[str, m.Message]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= window:
                acks += await self._publish_pipelined(chunk)
                chunk = []
        if chunk:
            acks += await self._publish_pipelined(chunk)
        return acks

    async def _publish_pipelined(self, chunk: list[tuple[str, m.Message]]) -> list[api.PubAck]:
        futures: list[asyncio.Future[api.PubAck] | None] = []
        for subject, msg in chunk:
            codec = m.CODECS[type(msg).__name__]
            headers = {TYPE_HEADER: codec.type_name, MSG_ID_HEADER: m.message_id(msg)}
            try:
                futures.append(await self.js.publish_async(subject, codec.encode(msg), headers=headers))
            except _RETRYABLE_PUBLISH:
                futures.append(None)
        pending = [f for f in futures if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.publish_timeout_s)
        acks: list[api.PubAck] = []
        for (subject, msg), fut in zip(chunk, futures, strict=True):
            if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                acks.append(fut.result())
                continue
            if fut is not None and not fut.done():
                fut.cancel()
            acks.append(await self.publish(subject, msg))
        return acks

    async def publish_outcome(self, subject: str, msg: m.Message) -> None:
        """The outcome of a job: through JetStream when ``subject`` is one of this run's stored subjects (an eval
        result to its requester, an event, a batch: stored once, there for a reader that was reconnecting), else
        on core NATS (a reply to a tool outside the run)."""
        if self.subjects.type_for(subject) is not None:
            await self.publish(subject, msg)
        else:
            await self.publish_core(subject, msg)

    async def publish_core(self, subject: str, msg: m.Message) -> None:
        """Publish on core NATS (no storage): replies and other at-most-once traffic."""
        codec = m.CODECS[type(msg).__name__]
        await self.nc.publish(subject, codec.encode(msg), headers={TYPE_HEADER: codec.type_name})

    # ------------------------------------------------------------ consuming

    async def pull(self, stream: str, durable: str) -> PullConsumer[Any]:
        psub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        consumer: PullConsumer[Any] = PullConsumer(self, psub, durable)
        self._consumers.append(consumer)
        return consumer

    def decode(self, subject: str, data: bytes, headers: dict[str, str] | None) -> m.Message:
        """Decode by the subject's type; a ``Krl-Type`` header that disagrees is an error."""
        expected = self.subjects.type_for(subject)
        if expected is None:
            raise m.DecodeError(f"no message type is defined for subject {subject}")
        declared = (headers or {}).get(TYPE_HEADER)
        if declared is not None and declared != expected.__name__:
            raise m.DecodeError(f"header {TYPE_HEADER}={declared!r} but {subject} carries {expected.__name__}")
        return m.CODECS[expected.__name__].decode(data)

    async def reject(self, raw: Msg, reason: str) -> None:
        """Count, report and terminate a message that cannot be decoded."""
        self.decode_failures[raw.subject] += 1
        log.error("terminated undecodable message on %s: %s", raw.subject, reason)
        try:
            await raw.term()
        except nats.errors.Error as exc:
            log.warning("could not terminate message on %s: %s", raw.subject, exc)

    async def stored(self, stream: str, seq: int) -> m.Message | None:
        """The message stored at ``seq`` in ``stream``, decoded by its subject; None when it is gone (retention
        limits, deletion) or was never there."""
        try:
            raw = await self._patiently(f"{stream} #{seq}", lambda: self.js.get_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            return None
        if raw.subject is None or raw.data is None:
            return None
        return self.decode(raw.subject, raw.data, raw.headers)

    async def put_policy(self, update: m.PolicyUpdate) -> None:
        """Make ``update`` the run's latest policy (the policy bucket's ``latest`` key generators watch)."""
        kv = await self.kv(self.subjects.policy_bucket)
        await self._patiently("policy bucket", lambda: kv.put(s.POLICY_LATEST_KEY, m.codec_for(m.PolicyUpdate).encode(update)))

    async def latest_policy(self) -> m.PolicyUpdate | None:
        kv = await self.kv(self.subjects.policy_bucket)
        try:
            entry = await self._patiently("policy bucket", lambda: kv.get(s.POLICY_LATEST_KEY))
        except nats.js.errors.KeyNotFoundError:
            return None
        return m.codec_for(m.PolicyUpdate).decode(entry.value or b"")

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Unsubscribe pull subscriptions, then drain (flushes pending acks and publishes) and close."""
        for consumer in self._consumers:
            await consumer.close()
        self._consumers.clear()
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
            await self.nc.close()


def decode_any(subject: str, data: bytes, headers: dict[str, str] | None) -> m.Message:
    """Decode a message seen by a tool on any run: by its ``Krl-Type`` header, else by its subject."""
    type_name = (headers or {}).get(TYPE_HEADER)
    if type_name in m.CODECS:
        return m.CODECS[type_name].decode(data)
    parts = subject.split(".")
    if len(parts) > 2 and parts[0] == "krl":
        t = s.RunSubjects(parts[1]).type_for(subject)
        if t is not None:
            return m.CODECS[t.__name__].decode(data)
    raise m.DecodeError(f"no message type is known for subject {subject}")
