"""The bus against a real nats-server: provisioning, typed publish, strict consumption."""

from __future__ import annotations

import asyncio

import nats
import orjson
import pytest
from nats.js import api

from kernelrl.core import messages as m
from kernelrl.core.bus import TYPE_HEADER, Bus
from kernelrl.core.config import BusSettings

from test_messages import EXAMPLES


def example_for(type_: type[m.Message]) -> m.Message:
    return next(e for e in EXAMPLES if isinstance(e, type_))


async def test_provisioning_twice_is_harmless_and_keeps_messages(bus: Bus) -> None:
    await bus.publish(bus.subjects.rollout_request, example_for(m.RolloutRequest))
    before = await bus.js.stream_info(bus.subjects.rollout_stream)
    await bus.provision()
    await bus.provision()
    after = await bus.js.stream_info(bus.subjects.rollout_stream)
    assert after.state.messages == before.state.messages == 1
    assert after.config.retention == api.RetentionPolicy.WORK_QUEUE
    streams = {s.config.name for s in await bus.js.streams_info()}
    assert {
        bus.subjects.rollout_stream,
        bus.subjects.eval_stream,
        bus.subjects.event_stream,
        bus.subjects.batch_stream,
    } <= streams


async def test_a_retried_publish_is_stored_once(bus: Bus) -> None:
    msg = example_for(m.TurnEvent)
    first = await bus.publish(bus.subjects.event_turn, msg)
    second = await bus.publish(bus.subjects.event_turn, msg)
    assert not first.duplicate and second.duplicate
    info = await bus.js.stream_info(bus.subjects.event_stream)
    assert info.state.messages == 1


async def test_published_message_carries_type_and_id_headers(bus: Bus) -> None:
    msg = example_for(m.EvalRequest)
    await bus.publish(bus.subjects.eval_request, msg)
    stored = await bus.js.get_msg(bus.subjects.eval_stream, seq=1)
    assert stored.headers[TYPE_HEADER] == "EvalRequest"
    assert stored.headers["Nats-Msg-Id"] == m.message_id(msg)
    assert orjson.loads(stored.data)["eval_id"] == "e1"


async def _consumer_for(bus: Bus, subject: str) -> tuple[str, str]:
    st = bus.subjects
    if subject == st.rollout_request:
        return st.rollout_stream, "generators"
    if subject == st.eval_request:
        return st.eval_stream, "evaluators"
    if subject == st.batch:
        return st.batch_stream, "learner"
    durable = "probe-" + subject.rsplit(".", 1)[-1]
    await bus.ensure_consumer(st.event_stream, api.ConsumerConfig(durable_name=durable, filter_subject=subject, ack_wait=1.0))
    return st.event_stream, durable


@pytest.mark.parametrize(
    ("noun", "type_"),
    [
        ("rollout_request", m.RolloutRequest),
        ("eval_request", m.EvalRequest),
        ("event_turn", m.TurnEvent),
        ("event_trajectory", m.TrajectoryEvent),
        ("event_step", m.StepSummary),
        ("event_eval", m.EvalSummary),
        ("batch", m.TrainBatch),
    ],
)
async def test_malformed_message_is_counted_and_terminated_while_good_ones_flow(
    bus: Bus, noun: str, type_: type[m.Message]
) -> None:
    subject = getattr(bus.subjects, noun)
    stream, durable = await _consumer_for(bus, subject)
    terminated: list[str] = []

    async def on_advisory(msg: nats.aio.msg.Msg) -> None:
        terminated.append(msg.subject)

    await bus.nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.{durable}", cb=on_advisory)
    await bus.js.publish(subject, b'{"this is": "not a ' + type_.__name__.encode() + b'"}')
    await bus.js.publish(subject, b"\xff\xfe garbage")
    await bus.js.publish(subject, m.CODECS[type_.__name__].encode(example_for(type_)), headers={TYPE_HEADER: "PolicyUpdate"})
    await bus.publish(subject, example_for(type_))

    consumer = await bus.pull(stream, durable)
    got = await consumer.fetch(10, 2.0)
    assert [type(d.msg) for d in got] == [type_]
    assert got[0].msg == example_for(type_)
    await got[0].ack()
    assert bus.decode_failures[subject] == 3
    for _ in range(40):
        if len(terminated) == 3:
            break
        await asyncio.sleep(0.05)
    assert len(terminated) == 3
    await asyncio.sleep(1.2)  # past a 1 s ack_wait: nothing comes back
    assert await consumer.fetch(10, 0.3) == []


async def test_publish_to_a_run_that_was_never_provisioned_fails_clearly(nats_server) -> None:  # type: ignore[no-untyped-def]
    b = await Bus.connect(BusSettings(url=nats_server.url, run="never-provisioned", publish_deadline_s=0.5), name="t")
    try:
        with pytest.raises(TimeoutError, match=r"TurnEvent to krl\.never-provisioned\.event\.turn"):
            await b.publish(b.subjects.event_turn, example_for(m.TurnEvent))
    finally:
        await b.close()


async def test_connecting_to_nothing_names_the_url() -> None:
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9"):
        await Bus.connect(BusSettings(url="nats://127.0.0.1:9", connect_timeout_s=0.5), name="t")


def test_reconnect_noise_is_one_line_per_state_change_and_a_reminder_every_30s(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from kernelrl.core.bus import ConnectionReporter

    now = [0.0]
    reporter = ConnectionReporter("t", "nats://127.0.0.1:4222", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="kernelrl.core.bus"):
        reporter.disconnected()
        for _ in range(600):  # a failed reconnect attempt every 0.1 s for a minute
            now[0] += 0.1
            reporter.error(ConnectionRefusedError("connection refused"))
        reporter.reconnected()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # disconnected, two reminders (30 s, 60 s), reconnected
    assert "disconnected" in lines[0] and "reconnected" in lines[-1]
    assert all("still disconnected" in line for line in lines[1:3])
