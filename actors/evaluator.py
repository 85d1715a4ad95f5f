"""Evaluator actor: one GPU (or the CPU interpreter), one job at a time, an isolated worker per actor.

Subscribes: ``krl.<run>.eval.request`` through the shared durable consumer ``evaluators``; the
max-deliveries advisory of that consumer (queue group, so one evaluator answers it).
Publishes: ``EvalResult`` to the request's ``reply_to`` — through the run's results stream when it is
``krl.<run>.eval.result.<requester>`` (core NATS otherwise) — then acks the request.
Invariant: a job is acked only after its result is published; a long job is kept alive with
in-progress; on stop an unfinished job is released (nak) for another evaluator; a job that exhausts
its deliveries is answered with ``error_kind="evaluator_lost"`` so no requester waits forever. A bad
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

from kernelrl.actors.eval_sandbox import WorkerLimits
from kernelrl.actors.eval_worker import EvalWorker
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.problems import ProblemSet

log = logging.getLogger(__name__)


class EvaluatorSettings(msgspec.Struct, kw_only=True, frozen=True):
    device: str = "cpu"
    limits: WorkerLimits = msgspec.field(default_factory=WorkerLimits)
    in_progress_interval_s: float = 20.0
    fetch_timeout_s: float = 1.0


class EvaluatorActor:
    role = "evaluator"

    def __init__(self, bus: Bus, settings: EvaluatorSettings, problems: ProblemSet | None = None,
                 actor_id: str | None = None) -> None:  # fmt: skip
        self.bus = bus
        self.settings = settings
        self.problems = problems
        self.actor_id = actor_id or default_actor_id(self.role)
        self.worker = EvalWorker(settings.device, settings.limits)
        self.device = settings.device
        self.state = "starting"
        self.counters: Counter[str] = Counter()

    async def run(self, stopping: asyncio.Event) -> None:
        st = self.bus.subjects
        # listen for lost jobs before the (slow) worker start-up, so no advisory passes unheard
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{st.eval_stream}.{s.EVALUATORS_CONSUMER}"
        lost_sub = await self.bus.nc.subscribe(advisory, queue="evaluators-lost", cb=self._on_max_deliveries)
        ready = await asyncio.to_thread(self.worker.start)
        self.device = f"{self.settings.device} ({ready.device_name})"
        log.info("evaluator %s: worker ready on %s; network isolation: %s; runners: %s", self.actor_id, ready.device_name,
                 ready.network, ready.confinement)  # fmt: skip
        consumer = await self.bus.pull(st.eval_stream, s.EVALUATORS_CONSUMER)
        consumer.on_undecodable = self._answer_undecodable
        self.state = "idle"
        try:
            while not stopping.is_set():
                for delivery in await consumer.fetch(1, self.settings.fetch_timeout_s):
                    await self._handle(delivery, stopping)
        finally:
            self.state = "stopping"
            with contextlib.suppress(nats.errors.Error):
                await lost_sub.unsubscribe()
            await consumer.close()
            await asyncio.to_thread(self.worker.stop)

    async def _handle(self, delivery: Delivery[m.EvalRequest], stopping: asyncio.Event) -> None:
        request = delivery.msg
        if not s.publishable_subject(request.reply_to):
            log.error("eval request %s has reply_to %r, which cannot be published to; terminated", request.eval_id,
                      request.reply_to)  # fmt: skip
            self.counters["bad_request"] += 1
            await delivery.term()
            return
        self.state = "evaluating"
        request = self._with_problem_source(request)
        job = asyncio.ensure_future(asyncio.to_thread(self.worker.evaluate, request))
        stop_wait = asyncio.ensure_future(stopping.wait())
        try:
            while not job.done():
                await asyncio.wait({job, stop_wait}, timeout=self.settings.in_progress_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if job.done():
                    break
                if stopping.is_set():
                    # release the job for another evaluator; killing the worker unblocks the thread
                    await asyncio.to_thread(self.worker.stop)
                    with contextlib.suppress(BaseException):
                        await job
                    await delivery.nak()
                    self.counters["released"] += 1
                    return
                await delivery.in_progress()
        finally:
            stop_wait.cancel()
            self.state = "idle"
        result = msgspec.structs.replace(job.result(), evaluator_id=self.actor_id)
        await self.bus.reply(request.reply_to, result)
        await delivery.ack()
        self.counters["jobs"] += 1
        self.counters["correct" if result.correctness else f"error_{result.error_kind}"] += 1
        self.counters["worker_restarts"] = self.worker.restarts

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
            await self.bus.reply(fields["reply_to"], result)

    def _with_problem_source(self, request: m.EvalRequest) -> m.EvalRequest:
        if request.problem_source or self.problems is None:
            return request
        try:
            problem = self.problems.get(request.problem_id)
        except KeyError:
            return request
        return msgspec.structs.replace(request, problem_source=problem.source)

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        """A job every delivery of which was lost: answer it as ``evaluator_lost`` and drop it."""
        try:
            info = orjson.loads(advisory.data)
            seq, deliveries = int(info["stream_seq"]), int(info.get("deliveries", 0))
            stored = await self.bus.js.get_msg(self.bus.subjects.eval_stream, seq)
            request = m.codec_for(m.EvalRequest).decode(stored.data or b"")
        except (orjson.JSONDecodeError, KeyError, ValueError, nats.js.errors.Error) as exc:
            log.error("max-deliveries advisory not handled: %s", exc)
            return
        if not s.publishable_subject(request.reply_to):
            return
        result = m.EvalResult(
            eval_id=request.eval_id,
            problem_id=request.problem_id,
            error_kind="evaluator_lost",
            error_message=f"no evaluator finished this job in {deliveries} deliveries (killed or restarted mid-job)",
            evaluator_id=self.actor_id,
        )
        await self.bus.reply(request.reply_to, result)
        with contextlib.suppress(nats.js.errors.Error):
            await self.bus.js.delete_msg(self.bus.subjects.eval_stream, seq)
        self.counters["evaluator_lost"] += 1
        log.warning("job %s (%s) answered as evaluator_lost after %d deliveries", request.eval_id, request.problem_id, deliveries)
