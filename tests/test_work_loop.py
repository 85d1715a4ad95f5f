"""The shared work loop over a real nats-server: parking, releasing, rejecting, and heartbeats through blocking work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import decode_heartbeat, run_actor
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus, Delivery
from kernelrl.core.config import BusSettings, Config, LearnerSettings, WorkSettings
from kernelrl.core.consumers import consumer_for, consumer_table
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.work_loop import DELIVERIES_HEADER, Outcome, Reject, WorkLoop

from helpers import wait_for

FAST_RETRY = WorkSettings(ack_wait_s=5.0, max_deliver=3, in_progress_interval_s=1.0, fetch_timeout_s=0.2,
                          retry_delay_s=0.1, release_delay_s=0.1)  # fmt: skip


class Learnerish:
    """A work owner that trains nothing: it records what it was handed."""

    role = "learner"

    def __init__(self) -> None:
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.seen: list[str] = []


def batch(run_id: str, batch_id: str, step: int = 1) -> m.TrainBatch:
    sample = m.BatchSample(stream_seq=1, trajectory_id="t", turn_advantages=[0.5])
    return m.TrainBatch(batch_id=batch_id, run_id=run_id, step=step, samples=[sample])


@pytest.fixture
async def bus(nats_server: EmbeddedNatsServer, run_id: str) -> AsyncIterator[Bus]:
    """Not provisioned: each test provisions the learner's consumer with its own work settings."""
    b = await Bus.connect(BusSettings(url=nats_server.url, run=run_id, publish_deadline_s=30), name="test")
    yield b
    await b.close()


def config_for(bus: Bus, work: WorkSettings) -> Config:
    return Config(bus=bus.settings, learner=LearnerSettings(work=work))


async def provisioned(bus: Bus, work: WorkSettings) -> Config:
    config = config_for(bus, work)
    await bus.provision(consumer_table(config))
    return config


async def events_of(bus: Bus, kind: type[m.Message]) -> list[m.Message]:
    info = await bus.js.stream_info(bus.subjects.event_stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await bus.js.get_msg(bus.subjects.event_stream, seq)
        msg = bus.decode(raw.subject or "", raw.data or b"", raw.headers)
        if isinstance(msg, kind):
            out.append(msg)
    return out


async def assert_parked(bus: Bus, poisoned: m.TrainBatch, deliveries: int) -> None:
    """Out of its queue, kept on the parked subject with its headers, and announced in the run's log."""
    assert (await bus.js.stream_info(bus.subjects.batch_stream)).state.messages == 0
    parked = await bus.js.get_last_msg(bus.subjects.parked_stream, bus.subjects.parked(s.LEARNER_CONSUMER))
    assert m.codec_for(m.TrainBatch).decode(parked.data or b"") == poisoned
    headers = parked.headers or {}
    assert headers[TYPE_HEADER] == "TrainBatch" and headers[MSG_ID_HEADER] == f"parked-{poisoned.batch_id}"
    assert headers[DELIVERIES_HEADER] == str(deliveries)
    (event,) = await events_of(bus, m.WorkParked)
    assert isinstance(event, m.WorkParked)
    assert (event.message_id, event.message_type, event.deliveries) == (poisoned.batch_id, "TrainBatch", deliveries)
    assert (event.role, event.consumer) == ("learner", s.LEARNER_CONSUMER)


async def test_a_batch_that_fails_every_time_is_parked_after_max_deliver_and_the_next_one_trains(bus: Bus, run_id: str) -> None:
    config = await provisioned(bus, FAST_RETRY)
    owner = Learnerish()
    attempts = Counter[str]()

    async def train(d: Delivery[m.TrainBatch]) -> Outcome:
        b = d.msg
        attempts[b.batch_id] += 1
        if b.batch_id == "poisoned":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        owner.seen.append(b.batch_id)
        return []

    loop: WorkLoop[m.TrainBatch] = WorkLoop(bus, consumer_for(config, "learner"), FAST_RETRY, owner, train)
    poisoned = batch(run_id, "poisoned")
    await bus.publish(bus.subjects.batch, poisoned)
    await bus.publish(bus.subjects.batch, batch(run_id, "good", step=2))
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(loop.run(stopping))
        await wait_for(lambda: owner.counters["parked"] == 1 and owner.seen == ["good"], 30, "the poisoned batch parked")
        stopping.set()
    assert attempts["poisoned"] == FAST_RETRY.max_deliver  # tried exactly max_deliver times, then never again
    assert owner.counters["failed"] == FAST_RETRY.max_deliver
    await assert_parked(bus, poisoned, FAST_RETRY.max_deliver)


CRASHING_LEARNER = """
import asyncio, os, sys
from collections import Counter
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings, Config, LearnerSettings, WorkSettings
from kernelrl.core.consumers import consumer_for
from kernelrl.core.work_loop import WorkLoop

class Owner:
    state = "starting"
    counters = Counter()

async def main(url, run, work_json, mode):
    work = __import__("msgspec").json.decode(work_json, type=WorkSettings)
    bus = await Bus.connect(BusSettings(url=url, run=run), name="learner")
    spec = consumer_for(Config(bus=bus.settings, learner=LearnerSettings(work=work)), "learner")
    owner, stopping = Owner(), asyncio.Event()

    async def train(b):
        if mode == "crash":
            os._exit(9)  # the learner process dies mid-batch
        return []

    async def watch():
        while owner.counters["parked"] == 0:
            await asyncio.sleep(0.1)
        stopping.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(WorkLoop(bus, spec, work, owner, train).run(stopping))
        tg.create_task(watch())
    await bus.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_batch_that_crashes_the_learner_process_is_parked_after_max_deliver(
    nats_server: EmbeddedNatsServer, bus: Bus, run_id: str, tmp_path: Path
) -> None:
    work = msgspec.structs.replace(FAST_RETRY, ack_wait_s=2.0, max_deliver=3)
    await provisioned(bus, work)
    poisoned = batch(run_id, "crashes-the-learner")
    await bus.publish(bus.subjects.batch, poisoned)
    script = tmp_path / "learner.py"
    script.write_text(CRASHING_LEARNER)

    def learner(mode: str, timeout_s: float) -> int:
        argv = [sys.executable, str(script), nats_server.url, run_id, msgspec.json.encode(work).decode(), mode]
        return subprocess.run(argv, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode

    for _ in range(work.max_deliver):  # each delivery kills a learner; the next one gets it after ack_wait
        assert await asyncio.to_thread(learner, "crash", 60) == 9
    assert await asyncio.to_thread(learner, "healthy", 60) == 0  # this one parks it, and is never handed it
    await assert_parked(bus, poisoned, work.max_deliver)


async def test_shutdown_mid_job_releases_it_to_another_instance_which_publishes_the_outcome_once(bus: Bus, run_id: str) -> None:
    config = await provisioned(bus, FAST_RETRY)
    spec = consumer_for(config, "learner")
    first, second = Learnerish(), Learnerish()
    started = asyncio.Event()

    async def stuck(d: Delivery[m.TrainBatch]) -> Outcome:
        b = d.msg
        first.seen.append(b.batch_id)
        started.set()
        await asyncio.Event().wait()  # never finishes by itself
        return []

    async def train(d: Delivery[m.TrainBatch]) -> Outcome:
        b = d.msg
        second.seen.append(b.batch_id)
        summary = m.StepSummary(event_id=f"step-{b.batch_id}", step=b.step, run_id=run_id)
        return [(bus.subjects.event_step, summary)]

    await bus.publish(bus.subjects.batch, batch(run_id, "b1"))
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(WorkLoop(bus, spec, FAST_RETRY, first, stuck).run(stop_first))
        await asyncio.wait_for(started.wait(), 30)
        stop_first.set()
        await wait_for(lambda: first.counters["released"] == 1, 30, "the job released")
        tg.create_task(WorkLoop(bus, spec, FAST_RETRY, second, train).run(stop_second))
        await wait_for(lambda: second.counters["done"] == 1, 30, "the job done by the second instance")
        stop_second.set()
    assert first.seen == second.seen == ["b1"]
    steps = await events_of(bus, m.StepSummary)
    assert [e.event_id for e in steps] == ["step-b1"]  # type: ignore[attr-defined]
    assert (await bus.js.stream_info(bus.subjects.batch_stream)).state.messages == 0


async def test_rejected_and_undecodable_work_is_terminated_not_retried(bus: Bus, run_id: str) -> None:
    config = await provisioned(bus, FAST_RETRY)
    owner = Learnerish()
    calls = Counter[str]()

    async def train(d: Delivery[m.TrainBatch]) -> Outcome:
        b = d.msg
        calls[b.batch_id] += 1
        if not b.samples:
            raise Reject("a batch with no samples")
        return []

    await bus.publish(bus.subjects.batch, m.TrainBatch(batch_id="empty", run_id=run_id, step=1, samples=[]))
    await bus.js.publish(bus.subjects.batch, b'{"batch_id": 7}', headers={MSG_ID_HEADER: "garbage"})
    await bus.publish(bus.subjects.batch, batch(run_id, "fine"))
    stopping = asyncio.Event()
    loop: WorkLoop[m.TrainBatch] = WorkLoop(bus, consumer_for(config, "learner"), FAST_RETRY, owner, train)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(loop.run(stopping))
        await wait_for(lambda: calls["fine"] == 1, 30, "the good batch")
        await asyncio.sleep(1.0)  # room for a wrong redelivery (retry_delay_s is 0.1 s)
        stopping.set()
    assert calls == Counter({"empty": 1, "fine": 1})
    assert (owner.counters["rejected"], owner.counters["undecodable"], owner.counters["done"]) == (1, 1, 1)
    assert (await bus.js.stream_info(bus.subjects.batch_stream)).state.messages == 0


class BlockingTrainer:
    """An actor whose one job is 10 s of blocking work (a training step), run off the event loop."""

    role = "learner"
    actor_id = "learner-blocking"
    device = "cpu"

    def __init__(self, bus: Bus, config: Config) -> None:
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.loop: WorkLoop[m.TrainBatch] = WorkLoop(bus, consumer_for(config, self.role), config.learner.work, self,
                                                     self.train, busy_state="training")  # fmt: skip

    def gauges(self) -> dict[str, float]:
        return self.loop.gauges()

    async def train(self, d: Delivery[m.TrainBatch]) -> Outcome:
        self.counters["batches"] += 1
        await asyncio.to_thread(time.sleep, 10.0)
        return []

    async def run(self, stopping: asyncio.Event) -> None:
        await self.loop.run(stopping)


async def test_heartbeats_continue_through_a_blocking_10s_task_and_the_job_is_not_redelivered(
    nats_server: EmbeddedNatsServer, run_id: str
) -> None:
    work = WorkSettings(ack_wait_s=3.0, max_deliver=3, in_progress_interval_s=1.0, fetch_timeout_s=0.2)
    bus_settings = BusSettings(url=nats_server.url, run=run_id, heartbeat_interval_s=0.5)
    config = Config(bus=bus_settings, learner=LearnerSettings(work=work))
    probe = await Bus.connect(bus_settings, name="probe")
    stopping = asyncio.Event()
    actors: list[BlockingTrainer] = []

    def make(bus: Bus) -> BlockingTrainer:
        actors.append(BlockingTrainer(bus, config))
        return actors[0]

    beats: list[m.Heartbeat] = []
    try:
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(run_actor(make, config, stopping))
            await wait_for(lambda: bool(actors) and actors[0].state == "idle", 30, "the actor pulling")
            await probe.publish(probe.subjects.batch, batch(run_id, "slow"))
            kv = await probe.kv(probe.subjects.actors_bucket)
            while not (actors[0].counters["done"] == 1):
                entry = await kv.get("learner.learner-blocking")
                beat = decode_heartbeat(entry.value or b"")
                if beat is not None and (not beats or beat.updated_at != beats[-1].updated_at):
                    beats.append(beat)
                await asyncio.sleep(0.1)
            stopping.set()
        assert runner.result() == 0
        info = await probe.js.consumer_info(probe.subjects.batch_stream, s.LEARNER_CONSUMER)
    finally:
        await probe.close()
    during = [b for b in beats if b.state == "training"]
    # 10 s of blocking work at one beat per 0.5 s: a stalled loop would write none until the job ended
    assert len(during) >= 10, [(b.state, b.gauges) for b in beats]
    job_s = [b.gauges["job_s"] for b in during]
    assert job_s == sorted(job_s) and job_s[-1] >= 8.0  # a float gauge that moves while the job runs
    assert actors[0].counters["batches"] == 1  # kept in progress past ack_wait (3 s): never redelivered
    assert info.num_redelivered == 0 and info.num_ack_pending == 0 and info.num_pending == 0


async def test_an_outcome_that_cannot_be_published_is_not_acked_and_the_job_comes_back(
    nats_server: EmbeddedNatsServer, run_id: str
) -> None:
    """The outcome is larger than the run's streams accept: JetStream refuses it, so the job must not be acked."""
    bus = await Bus.connect(BusSettings(url=nats_server.url, run=run_id, max_msg_size=4096), name="test")
    try:
        config = await provisioned(bus, FAST_RETRY)
        owner = Learnerish()
        attempts: list[int] = []

        async def train(d: Delivery[m.TrainBatch]) -> Outcome:
            attempts.append(d.attempt)
            notes = "x" * (8192 if d.attempt == 1 else 16)  # too big on the first try only
            turn = m.TurnEvent(event_id=f"turn-{d.msg.batch_id}", timestamp="t", instance_id="p", turn_idx=0,
                               turn_data=m.TurnData(response=notes))  # fmt: skip
            return [(bus.subjects.event_turn, turn)]

        await bus.publish(bus.subjects.batch, batch(run_id, "big"))
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(WorkLoop(bus, consumer_for(config, "learner"), FAST_RETRY, owner, train).run(stopping))
            await wait_for(lambda: owner.counters["done"] == 1, 30, "the job done on its second delivery")
            stopping.set()
        assert attempts == [1, 2] and owner.counters["publish_failed"] == 1
        turns = await events_of(bus, m.TurnEvent)
        assert [e.event_id for e in turns] == ["turn-big"]  # type: ignore[attr-defined]
        assert (await bus.js.stream_info(bus.subjects.batch_stream)).state.messages == 0
    finally:
        await bus.close()
