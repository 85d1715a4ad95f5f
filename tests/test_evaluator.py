"""The evaluator actor over a real nats-server: answers, survives hostile candidates, is never lost."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats.aio.msg
import orjson

from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings, Config, EvaluatorSettings, WorkSettings
from kernelrl.core.consumers import ConsumerSpec, consumer_table
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems

from helpers import wait_for

CANDIDATES = Path(__file__).parent / "candidates"
RELU = builtin_problems().get("level1/1_ReLU")
# the same kernel launched 30 times per call: ~0.4 s a call on the CPU interpreter, only allowed code
SLOW_RELU = (RELU.solution or "").replace(
    "        relu_kernel[grid](x, out, n_elements, BLOCK_SIZE=1024)\n",
    "        for _ in range(30):\n            relu_kernel[grid](x, out, n_elements, BLOCK_SIZE=1024)\n",
)


class Replies:
    """Results arriving on one generator's reply subject."""

    def __init__(self) -> None:
        self.results: list[m.EvalResult] = []

    async def on_msg(self, msg: nats.aio.msg.Msg) -> None:
        self.results.append(m.codec_for(m.EvalResult).decode(msg.data))


async def listen(bus: Bus, generator_id: str) -> tuple[Replies, str]:
    replies = Replies()
    subject = bus.subjects.eval_result(generator_id)
    await bus.nc.subscribe(subject, cb=replies.on_msg)
    return replies, subject


def eval_request(bus: Bus, reply_to: str, candidate: str, problem_id: str = "level1/1_ReLU") -> m.EvalRequest:
    return m.EvalRequest(
        eval_id=m.new_id(), run_id=bus.settings.run, problem_id=problem_id, candidate_source=candidate, reply_to=reply_to
    )


def consumers_with(bus: Bus, ack_wait_s: float, max_deliver: int) -> tuple[ConsumerSpec, ...]:
    """The run's consumer table with the evaluators' redelivery made short, for a test that kills evaluators."""
    work = WorkSettings(ack_wait_s=ack_wait_s, max_deliver=max_deliver, in_progress_interval_s=1.0)
    return consumer_table(Config(bus=bus.settings, evaluator=EvaluatorSettings(work=work)))


async def wait_until_empty(bus: Bus, stream: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if (await bus.js.stream_info(stream)).state.messages == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{stream} still holds messages")


async def job_in_flight(bus: Bus, timeout_s: float = 60) -> None:
    """Wait until an evaluator has taken the job and not yet acked it."""
    for _ in range(int(timeout_s / 0.1)):
        info = await bus.js.consumer_info(bus.subjects.eval_stream, s.EVALUATORS_CONSUMER)
        if info.num_ack_pending == 1:
            await asyncio.sleep(0.5)  # well inside the job
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no evaluator took the job")


def start_evaluator(spawn: Callable[..., subprocess.Popen[str]], url: str, run_id: str, *extra: str) -> subprocess.Popen[str]:
    return spawn(
        "evaluator", "--nats", url, "--run", run_id, "--time-limit", "4", "--memory-limit-gb", "6", *extra,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


async def eval_queue_left(bus: Bus, timeout_s: float = 10.0) -> int:
    """The eval queue's messages once it is empty, or after ``timeout_s``: a request is acked just after its result
    is published, so the queue empties a moment after the requester has the result."""
    deadline = time.monotonic() + timeout_s
    while (left := (await bus.js.stream_info(bus.subjects.eval_stream)).state.messages) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def test_evaluator_answers_the_requester_and_acks(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    replies, reply_to = await listen(bus, "gen-a")
    evaluator = start_evaluator(spawn, nats_server.url, run_id)
    good = eval_request(bus, reply_to, RELU.solution or "")
    bad = eval_request(bus, reply_to, (CANDIDATES / "wrong_values.py").read_text())
    await bus.publish_many([(bus.subjects.eval_request, good), (bus.subjects.eval_request, bad)])
    await wait_for(lambda: len(replies.results) == 2, 120, "two results")
    by_id = {r.eval_id: r for r in replies.results}
    assert by_id[good.eval_id].correctness and by_id[good.eval_id].evaluator_id.startswith("evaluator-")
    assert by_id[bad.eval_id].error_kind == "mismatch"
    assert await eval_queue_left(bus) == 0  # acked jobs leave the work queue
    evaluator.send_signal(signal.SIGTERM)
    assert evaluator.wait(timeout=30) == 0


async def test_fifty_hostile_candidates_in_a_row_never_kill_the_evaluator(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    replies, reply_to = await listen(bus, "gen-hostile")
    evaluator = start_evaluator(spawn, nats_server.url, run_id)
    hostile = sorted(CANDIDATES.glob("*.py"))
    expected: dict[str, str] = {}
    requests = []
    for path in itertools.islice(itertools.cycle(hostile), 50):
        text = path.read_text()
        kind = text.split("# expect: ", 1)[1].split()[0]
        problem = text.split("# problem: ", 1)[1].split()[0] if "# problem: " in text else "level1/1_ReLU"
        req = eval_request(bus, reply_to, text, problem)
        expected[req.eval_id] = kind
        requests.append((bus.subjects.eval_request, req))
    final = eval_request(bus, reply_to, RELU.solution or "")
    await bus.publish_many([*requests, (bus.subjects.eval_request, final)])
    await wait_for(lambda: len(replies.results) == 51, 400, "51 results")
    assert evaluator.poll() is None, "the evaluator died"
    got = {r.eval_id: r for r in replies.results}
    wrong = {eid: (kind, got[eid].error_kind) for eid, kind in expected.items() if got[eid].error_kind != kind}
    assert not wrong, wrong
    assert got[final.eval_id].correctness
    evaluator.send_signal(signal.SIGTERM)
    assert evaluator.wait(timeout=30) == 0


async def test_evaluator_killed_mid_job_the_job_is_redelivered_and_answered_once(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    run_id = "kill-mid-job"
    async with EmbeddedNatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusSettings(url=server.url, run=run_id), name="test")
        try:
            # the consumer now redelivers 4 s after a lost evaluator's last sign of life
            await bus.provision(consumers_with(bus, ack_wait_s=4.0, max_deliver=3))
            replies, reply_to = await listen(bus, "gen-k")
            first = start_evaluator(spawn, server.url, run_id)
            request = eval_request(bus, reply_to, SLOW_RELU)
            await bus.publish(bus.subjects.eval_request, request)
            await job_in_flight(bus)  # the first evaluator holds it: five trials of ~0.4 s each
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert replies.results == []
            second = start_evaluator(spawn, server.url, run_id)
            await wait_for(lambda: len(replies.results) >= 1, 60, "the redelivered job's result")
            await asyncio.sleep(3)
            assert len(replies.results) == 1
            assert replies.results[0].eval_id == request.eval_id and replies.results[0].correctness
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
        finally:
            await bus.close()


async def test_a_job_that_exhausts_its_deliveries_is_answered_as_evaluator_lost(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    run_id = "lost"
    async with EmbeddedNatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusSettings(url=server.url, run=run_id), name="test")
        try:
            await bus.provision(consumers_with(bus, ack_wait_s=3.0, max_deliver=1))
            replies, reply_to = await listen(bus, "gen-l")
            first = start_evaluator(spawn, server.url, run_id)
            request = eval_request(bus, reply_to, SLOW_RELU)
            await bus.publish(bus.subjects.eval_request, request)
            await job_in_flight(bus)
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = start_evaluator(spawn, server.url, run_id)
            await wait_for(lambda: len(replies.results) >= 1, 60, "the evaluator_lost answer")
            assert replies.results[0].eval_id == request.eval_id
            assert replies.results[0].error_kind == "evaluator_lost"
            await wait_until_empty(bus, bus.subjects.eval_stream)  # parked: out of the queue
            parked = await bus.js.get_last_msg(bus.subjects.parked_stream, bus.subjects.parked(s.EVALUATORS_CONSUMER))
            assert m.codec_for(m.EvalRequest).decode(parked.data or b"").eval_id == request.eval_id
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
        finally:
            await bus.close()


async def test_evaluator_survives_a_nats_server_restart_and_keeps_answering(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    run_id = "restart"
    async with EmbeddedNatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusSettings(url=server.url, run=run_id), name="test")
        try:
            await bus.provision()
            evaluator = start_evaluator(spawn, server.url, run_id)
            replies, reply_to = await listen(bus, "gen-r")
            await bus.publish(bus.subjects.eval_request, eval_request(bus, reply_to, RELU.solution or ""))
            await wait_for(lambda: len(replies.results) == 1, 60, "the first result")
            server.kill()
            await asyncio.sleep(1.0)
            await server.start()
            await asyncio.sleep(2.0)  # clients reconnect and resubscribe
            await bus.publish(bus.subjects.eval_request, eval_request(bus, reply_to, RELU.solution or ""))
            await wait_for(lambda: len(replies.results) == 2, 60, "a result after the restart")
            assert all(r.correctness for r in replies.results)
            assert evaluator.poll() is None
            evaluator.send_signal(signal.SIGTERM)
            assert evaluator.wait(timeout=30) == 0
        finally:
            await bus.close()


async def test_bad_requests_are_answered_or_terminated_and_the_evaluator_keeps_serving(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    replies, reply_to = await listen(bus, "gen-bad")
    evaluator = start_evaluator(spawn, nats_server.url, run_id)
    solution = RELU.solution or ""
    subject = bus.subjects.eval_request

    def raw(**fields: object) -> bytes:
        base = {"eval_id": m.new_id(), "run_id": run_id, "problem_id": "level1/1_ReLU", "candidate_source": solution,
                "reply_to": reply_to}  # fmt: skip
        return orjson.dumps({**base, **fields})

    missing_source = raw()
    missing_source = orjson.dumps({k: v for k, v in orjson.loads(missing_source).items() if k != "candidate_source"})
    not_utf8 = raw(eval_id="not-utf8", candidate_source="PLACEHOLDER").replace(b"PLACEHOLDER", b"bad \xff\xfe bytes")
    unknown = eval_request(bus, reply_to, solution, "level9/999_NoSuchProblem")
    oversized = eval_request(bus, reply_to, solution + "\n# " + "x" * 300_000)
    unanswerable = [
        raw(reply_to=""),
        raw(reply_to="two words"),
        raw(reply_to="krl.*.wildcard"),
        raw(reply_to="krl..empty"),
        b"this is not json",
        b'["a", "list"]',
    ]
    for payload in [*unanswerable, missing_source, not_utf8]:
        await bus.js.publish(subject, payload)
    await bus.publish_many([(subject, unknown), (subject, oversized)])
    final = eval_request(bus, reply_to, solution)
    await bus.publish(subject, final)
    await wait_for(lambda: any(r.eval_id == final.eval_id for r in replies.results), 120, "the good request's result")
    await wait_for(lambda: len(replies.results) == 5, 10, "answers to the answerable bad requests")
    by_id = {r.eval_id: r for r in replies.results}
    assert by_id[final.eval_id].correctness
    assert by_id[unknown.eval_id].error_kind == "bad_problem"
    assert "level9/999_NoSuchProblem" in by_id[unknown.eval_id].error_message
    assert by_id[oversized.eval_id].error_kind == "forbidden" and "limit" in by_id[oversized.eval_id].error_message
    assert by_id["not-utf8"].error_kind == "bad_request"
    bad = [r for r in replies.results if r.error_kind == "bad_request"]
    assert len(bad) == 2 and any("candidate_source" in r.error_message for r in bad)
    assert await eval_queue_left(bus) == 0  # nothing is left to be redelivered forever
    assert evaluator.poll() is None
    evaluator.send_signal(signal.SIGTERM)
    assert evaluator.wait(timeout=30) == 0
