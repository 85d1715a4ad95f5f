"""Eval results travel over JetStream: a requester that was away still gets its answer, once."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings
from kernelrl.core.eval_inbox import EvalResultInbox
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems

RELU = builtin_problems().get("level1/1_ReLU")


async def test_a_requester_that_was_away_gets_its_result_from_the_stream_once(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    reply_to = bus.subjects.eval_result("gen-away")

    def relu_request() -> m.EvalRequest:
        return m.EvalRequest(eval_id=m.new_id(), run_id=run_id, problem_id=RELU.id, candidate_source=RELU.solution or "",
                             reply_to=reply_to)  # fmt: skip

    requests = [relu_request() for _ in range(2)]
    await bus.publish_many([(bus.subjects.eval_request, r) for r in requests])
    evaluator = spawn("evaluator", "--nats", nats_server.url, "--run", run_id, stdout=subprocess.DEVNULL)
    # nobody listens on reply_to while the evaluator answers: the requester is away
    stream = bus.subjects.results_stream
    for _ in range(600):
        if (await bus.js.stream_info(stream)).state.messages >= 2:
            break
        await asyncio.sleep(0.2)
    requester = await Bus.connect(BusSettings(url=nats_server.url, run=run_id), name="requester-back")
    inbox = EvalResultInbox(requester, "gen-away")
    try:
        await inbox.start()
        results = [await inbox.wait(r.eval_id, 60) for r in requests]
        assert all(r.correctness for r in results)
        await requester.publish_core(reply_to, results[0])  # the same result again, as after a redelivery
        late = relu_request()
        await requester.publish(requester.subjects.eval_request, late)
        assert (await inbox.wait(late.eval_id, 120)).correctness  # and a live one arrives too
        assert inbox.duplicates == 1 and len(inbox.results) == 3
    finally:
        await inbox.close()
        await requester.close()
        evaluator.terminate()
        evaluator.wait(timeout=30)
