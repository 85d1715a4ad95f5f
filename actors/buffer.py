"""Buffer actor: schedules rollouts, groups their trajectories, publishes train batches (logic: ``buffer_state``).

Reads: the run's event stream, trajectories only (an ephemeral ordered pull consumer from the sequence after the
last one its saved state consumed); the policy bucket's ``latest`` key (the learner's version; absent: 0); its own
state from the buffer bucket (key ``state``) on start.
Publishes: ``RolloutRequest``s (one GRPO group per prompt, a round at a time) and ``TrainBatch``es; its state to the
buffer bucket at most every ``state_interval_s`` while it changes, and always before it publishes.

Invariant: state first, then the messages it names. What is about to be published sits in the saved state's
outbox and carries an id derived from the state (``r00003-p1-s2``, ``batch-000002``), so a buffer killed at any
point and restarted republishes the same messages (stored once, by ``Nats-Msg-Id``) and replays the stream from the
saved sequence: no trajectory is lost or counted twice, and no batch differs from the one first decided.
Once ``num_rollout`` rounds are issued, every group is closed and the last batch published, the state says
``finished`` and the buffer idles until stopped; ``kernelrl run`` reads that state (``read_buffer_state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from kernelrl.actors.buffer_state import BufferCore, BufferState, decode_state, encode_state
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus
from kernelrl.core.config import Config
from kernelrl.core.problems import ProblemSet

log = logging.getLogger(__name__)

POLL_S = 0.5  # the longest a fetch waits: how often timeouts, the policy version and issuing are looked at
FETCH_BATCH = 64
POLICY_POLL_S = 0.25  # the policy bucket is read at most this often


async def read_buffer_state(bus: Bus) -> BufferState | None:
    """The buffer's saved state, or None when no buffer has saved one in this run yet."""
    kv = await bus.kv(bus.subjects.buffer_bucket)
    try:
        entry = await kv.get(s.BUFFER_STATE_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    return decode_state(entry.value or b"")


class TrajectoryFeed:
    """The run's trajectory events in stream order from a given sequence: an ephemeral pull consumer (no acks),
    made again from the next sequence after any error (server restart, consumer gone)."""

    def __init__(self, bus: Bus, after_seq: int) -> None:
        self.bus = bus
        self.next_seq = after_seq + 1
        self._psub: JetStreamContext.PullSubscription | None = None

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        st = self.bus.subjects
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        return await self.bus.js.pull_subscribe(st.event_trajectory, stream=st.event_stream, config=config)

    async def fetch(self, timeout_s: float) -> list[Msg]:
        """Messages after the last one returned (possibly none within ``timeout_s``)."""
        try:
            if self._psub is None:
                self._psub = await self._subscribe()
            raws = await self._psub.fetch(FETCH_BATCH, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
            return []
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("trajectory feed from sequence %d: %r; subscribing again", self.next_seq, exc)
            await self.close()
            await asyncio.sleep(min(timeout_s, 0.5))
            return []
        out = [raw for raw in raws if raw.metadata.sequence.stream >= self.next_seq]
        if out:
            self.next_seq = out[-1].metadata.sequence.stream + 1
        return out

    async def close(self) -> None:
        if self._psub is not None:
            psub, self._psub = self._psub, None
            with contextlib.suppress(nats.errors.Error, ValueError):
                await psub.unsubscribe()


class BufferActor:
    role = "buffer"

    def __init__(self, bus: Bus, config: Config, problems: ProblemSet, actor_id: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.bus = bus
        self.config = config
        self.settings = config.buffer
        self.actor_id = actor_id or default_actor_id(self.role)
        self.device = "cpu"
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.clock = clock
        self.core = BufferCore(self.settings, config.reward, [p.id for p in problems.problems], bus.settings.run)
        self.policy_version = 0
        self._saved_at = 0.0

    def gauges(self) -> dict[str, float]:
        st = self.core.state
        return {
            "groups_open": float(len(st.open_groups)),
            "samples_pending": float(self.core.pending_samples),
            "rounds_issued": float(st.rounds_issued),
            "batches": float(st.batches_published),
            "policy_version": float(self.policy_version),
        }

    async def run(self, stopping: asyncio.Event) -> None:
        state_kv = await self.bus.kv(self.bus.subjects.buffer_bucket)
        saved = await read_buffer_state(self.bus)
        if saved is not None:
            self.core.state = saved
            log.info("buffer resumes: %d rounds issued, %d batches, %d groups open, stream sequence %d", saved.rounds_issued,
                     saved.batches_published, len(saved.open_groups), saved.last_seq)  # fmt: skip
        self._sync_counters()
        await self._publish_outbox(state_kv)  # what a killed buffer was about to publish
        feed = TrajectoryFeed(self.bus, self.core.state.last_seq)
        dirty = await self._catch_up(feed)
        policy_read_at = -POLICY_POLL_S
        try:
            while not stopping.is_set():
                for raw in await feed.fetch(POLL_S):
                    self._take(raw)
                    dirty = True
                if time.monotonic() - policy_read_at >= POLICY_POLL_S:
                    policy_read_at = time.monotonic()
                    with contextlib.suppress(nats.errors.Error, TimeoutError, m.DecodeError):
                        latest = await self.bus.latest_policy()
                        self.policy_version = max(self.policy_version, latest.version if latest else 0)
                before = self._progress()
                self.core.advance(self.clock(), self.policy_version)
                dirty |= before != self._progress()
                self._sync_counters()
                self.state = "finished" if self.core.state.finished else "running"
                if self._has_outbox():
                    await self._publish_outbox(state_kv)
                    dirty = True
                if dirty and time.monotonic() - self._saved_at >= self.settings.state_interval_s:
                    await self._save(state_kv)
                    dirty = False
            if dirty:
                await self._save(state_kv)
        finally:
            await feed.close()

    async def _catch_up(self, feed: TrajectoryFeed) -> bool:
        """Read what the stream already holds before any group time-out is judged: members that arrived while the
        buffer was down are members, not lost. Returns whether anything was read."""
        taken = False
        while True:
            raws = await feed.fetch(POLL_S)
            for raw in raws:
                self._take(raw)
            taken |= bool(raws)
            if len(raws) < FETCH_BATCH:
                return taken

    def _take(self, raw: Msg) -> None:
        seq = raw.metadata.sequence.stream
        try:
            event = self.bus.decode(raw.subject, raw.data, raw.headers)
        except m.DecodeError as exc:
            log.error("trajectory at stream sequence %d not readable: %s", seq, exc)
            self.core.skip(seq)
            return
        if not isinstance(event, m.TrajectoryEvent):
            self.core.skip(seq)
            return
        outcome = self.core.add_trajectory(event, seq)
        if outcome not in ("member", "replayed") and not s.is_eval_group(event.group_id):
            log.warning("trajectory %s (group %s, sequence %d) ignored: %s", event.trajectory_id, event.group_id, seq, outcome)

    def _progress(self) -> tuple[int, int, int, bool]:
        st = self.core.state
        return st.rounds_issued, len(st.open_groups), st.batches_published, st.finished

    def _has_outbox(self) -> bool:
        return bool(self.core.state.outbox_requests or self.core.state.outbox_batches)

    async def _publish_outbox(self, kv: KeyValue) -> None:
        """Save the state that names them, then publish the outbox's requests and batches; then clear it."""
        if not self._has_outbox():
            return
        await self._save(kv)
        st = self.core.state
        if st.outbox_requests:
            await self.bus.publish_many((self.bus.subjects.rollout_request, r) for r in st.outbox_requests)
            log.info("round %d: %d rollout requests", st.outbox_requests[-1].step, len(st.outbox_requests))
        for batch in st.outbox_batches:
            await self.bus.publish(self.bus.subjects.batch, batch)
            g = batch.groups
            log.info("batch %d: %d samples from %d/%d groups kept (%d filtered, %d dropped), reward %.3f", batch.step,
                     len(batch.samples), g.groups_kept, g.total_groups, g.groups_filtered, g.groups_dropped,
                     g.reward_mean)  # fmt: skip
        self.core.clear_outbox()

    async def _save(self, kv: KeyValue) -> None:
        """Write the state, retried until ``publish_deadline_s`` (a server restarting answers late for a while)."""
        deadline = time.monotonic() + self.bus.settings.publish_deadline_s
        data = encode_state(self.core.state)
        while True:
            try:
                await kv.put(s.BUFFER_STATE_KEY, data)
                break
            except (nats.errors.Error, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("buffer state not saved (%r); retrying", exc)
                await asyncio.sleep(0.5)
        self._saved_at = time.monotonic()

    def _sync_counters(self) -> None:
        self.counters.clear()
        self.counters.update(self.core.state.totals)
