"""Evaluator actor: one GPU (or the CPU interpreter), one job at a time, an isolated worker per actor.

Subscribes: ``krl.<run>.eval.request`` through the shared durable consumer ``evaluators``, with the shared
work loop (``core.work_loop``), which also handles that consumer's max-deliveries advisory.
Publishes: ``EvalResult`` to the request's ``reply_to`` — through the run's results stream when it is
``krl.<run>.eval.result.<requester>`` (core NATS otherwise) — then acks the request.
Invariant: a job is acked only after its result is published; a long job is kept alive with
in-progress; on stop an unfinished job is released (nak) for another evaluator; a job that exhausts
its deliveries is answered with ``error_kind="evaluator_lost"`` so no requester waits forever, and parked. A bad
request (undecodable, missing fields, a ``reply_to`` that cannot be published to, an oversized source)
never stops the evaluator: it is answered with ``bad_request`` where a reply subject can be read from
it, else terminated, and counted either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import msgspec
import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg

from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import Config, EvaluatorSettings
from kernelrl.core.consumers import consumer_for
from kernelrl.core.problems import ProblemSet
from kernelrl.core.work_loop import Outcome, Reject, WorkLoop

log = logging.getLogger(__name__)


class EvaluatorActor:
    role = "evaluator"

    def __init__(self, bus: Bus, settings: EvaluatorSettings, device: str = "cpu", problems: ProblemSet | None = None,
                 actor_id: str | None = None) -> None:  # fmt: skip
        self.bus = bus
        self.settings = settings
        self.problems = problems
        self.actor_id = actor_id or default_actor_id(self.role)
        self.worker = EvalWorker(device, settings.limits)
        self.device = device
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.loop: WorkLoop[m.EvalRequest] = WorkLoop(
            bus,
            consumer_for(Config(bus=bus.settings, evaluator=settings), self.role),
            settings.work,
            self,
            self._evaluate,
            busy_state="evaluating",
            interrupt=self._interrupt,
            on_undecodable=self._answer_undecodable,
            on_exhausted=self._answer_lost,
        )

    def gauges(self) -> dict[str, float]:
        return self.loop.gauges()

    async def run(self, stopping: asyncio.Event) -> None:
        # the loop listens for lost jobs before the (slow) worker start-up, so no advisory passes unheard
        try:
            await self.loop.run(stopping, ready=self._start_worker)
        finally:
            self.state = "stopping"
            await asyncio.to_thread(self.worker.stop)

    async def _start_worker(self) -> None:
        ready = await asyncio.to_thread(self.worker.start)
        self.device = f"{self.device} ({ready.device_name})"
        log.info("evaluator %s: worker ready on %s; network isolation: %s; runners: %s", self.actor_id, ready.device_name,
                 ready.network, ready.confinement)  # fmt: skip

    async def _interrupt(self) -> None:
        """Shutdown mid-job: killing the worker unblocks the evaluation thread; the job goes to another evaluator."""
        await asyncio.to_thread(self.worker.stop)

    async def _evaluate(self, delivery: Delivery[m.EvalRequest]) -> Outcome:
        request = delivery.msg
        if not s.publishable_subject(request.reply_to):
            self.counters["bad_request"] += 1
            raise Reject(f"eval request {request.eval_id} has reply_to {request.reply_to!r}, which cannot be published to")
        if self.bus.subjects.type_for(request.reply_to) not in (None, m.EvalResult):
            self.counters["bad_request"] += 1
            raise Reject(f"eval request {request.eval_id} has reply_to {request.reply_to!r}, a subject of this run that "
                         "does not carry eval results")  # fmt: skip
        request = self._with_problem_source(request)
        result = await asyncio.to_thread(self.worker.evaluate, request)
        result = msgspec.structs.replace(result, evaluator_id=self.actor_id)
        self.counters["jobs"] += 1
        self.counters["correct" if result.correctness else f"error_{result.error_kind}"] += 1
        self.counters["worker_restarts"] = self.worker.restarts
        return [(request.reply_to, result)]

    async def _answer_undecodable(self, raw: Msg, reason: str) -> None:
        """Answer a request that does not decode, if a reply subject can be read from it (it is terminated after)."""
        self.counters["bad_request"] += 1
        try:
            fields = orjson.loads(raw.data.decode("utf-8", errors="replace"))
        except orjson.JSONDecodeError:
            return
        if not isinstance(fields, dict) or not s.publishable_subject(fields.get("reply_to")):
            return

        def text(key: str) -> str:
            value = fields.get(key)
            return value if isinstance(value, str) else ""

        result = m.EvalResult(
            eval_id=text("eval_id"),
            problem_id=text("problem_id"),
            error_kind="bad_request",
            error_message=f"the evaluation request could not be read: {reason}"[:2000],
            evaluator_id=self.actor_id,
        )
        with contextlib.suppress(nats.errors.Error):
            await self.bus.publish_outcome(fields["reply_to"], result)

    def _with_problem_source(self, request: m.EvalRequest) -> m.EvalRequest:
        if request.problem_source or self.problems is None:
            return request
        try:
            problem = self.problems.get(request.problem_id)
        except KeyError:
            return request
        return msgspec.structs.replace(request, problem_source=problem.source)

    async def _answer_lost(self, request: m.EvalRequest, deliveries: int) -> Outcome:
        """A job every delivery of which was lost (evaluators killed mid-job): answered as ``evaluator_lost``, so no
        requester waits forever; the work loop parks the request."""
        self.counters["evaluator_lost"] += 1
        if not s.publishable_subject(request.reply_to):
            return []
        result = m.EvalResult(
            eval_id=request.eval_id,
            problem_id=request.problem_id,
            error_kind="evaluator_lost",
            error_message=f"no evaluator finished this job in {deliveries} deliveries (killed or restarted mid-job)",
            evaluator_id=self.actor_id,
        )
        return [(request.reply_to, result)]
