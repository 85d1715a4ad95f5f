"""Generator actor: multi-turn kernel dialogues, one per rollout request, several at once.

Subscribes: ``krl.<run>.rollout.request`` (consumer ``generators``, through the shared work loop, with
``generator.concurrency`` dialogues in hand); its own ``krl.<run>.eval.result.<generator-id>`` (results
stream, ``EvalResultInbox``); the policy bucket's ``latest`` key (polled, and read before each dialogue).
Publishes: ``EvalRequest`` per turn that holds code; ``TurnEvent`` per turn; ``TrajectoryEvent`` per dialogue,
and only then acks the request.

Invariant: ids derive from the request — the trajectory event's id from the request id, a turn's and its
evaluation's from the request id, the delivery attempt and the turn — so a request finished twice (a lost
ack, a generator killed after publishing) yields one trajectory in the logs. A turn's prompt token ids are
exactly what the model saw; each turn records the policy version that sampled it, and a policy update is
applied between turns, never during one (``actors/gen_policy.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter

import msgspec

from kernelrl.actors.gen_backend import Backend, GenerateRequest, Generation
from kernelrl.actors.gen_policy import PolicyWatcher, TurnGate
from kernelrl.core import messages as m
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import Config, SamplingSettings
from kernelrl.core.consumers import consumer_for
from kernelrl.core.eval_inbox import EvalResultInbox
from kernelrl.core.extract import extract_code
from kernelrl.core.problems import Problem, ProblemSet
from kernelrl.core.prompts import turn_messages
from kernelrl.core.reward import dialogue_termination, discounted_returns, result_score
from kernelrl.core.work_loop import Outcome, Reject, WorkLoop

log = logging.getLogger(__name__)

NO_CODE_MESSAGE = "the answer held no ```python block, so there was nothing to evaluate"


def trajectory_event_id(request_id: str) -> str:
    return f"traj-{request_id}"


def turn_event_id(request_id: str, attempt: int, turn_idx: int) -> str:
    return f"turn-{request_id}-a{attempt}-t{turn_idx}"


def eval_id_for(request_id: str, attempt: int, turn_idx: int) -> str:
    return f"eval-{request_id}-a{attempt}-t{turn_idx}"


def turn_sampling(sampling: SamplingSettings, request_id: str, turn_idx: int) -> SamplingSettings:
    """With ``sampling.seed`` set, each turn of each request samples from its own seed derived from it: a run is
    reproducible, yet the members of a group differ."""
    if sampling.seed is None:
        return sampling
    digest = hashlib.sha256(f"{sampling.seed}:{request_id}:{turn_idx}".encode()).digest()
    return msgspec.structs.replace(sampling, seed=int.from_bytes(digest[:4], "little"))


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One finished turn of a dialogue, before its return is known."""

    idx: int
    messages: list[m.ChatMessage]
    generation: Generation
    code: str
    result: m.EvalResult
    score: float
    policy_version: int
    timings: dict[str, float]

    @property
    def response(self) -> str:
        return self.generation.completions[0].text


class GeneratorActor:
    role = "generator"

    def __init__(self, bus: Bus, config: Config, backend: Backend, problems: ProblemSet, actor_id: str | None = None) -> None:
        self.bus = bus
        self.config = config
        self.settings = config.generator
        self.backend = backend
        self.problems = problems
        self.actor_id = actor_id or default_actor_id(self.role)
        self.device = backend.name
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.gate = TurnGate()
        self.policy = PolicyWatcher(bus, backend, self.gate, self.counters)
        self.inbox = EvalResultInbox(bus, self.actor_id)
        self.loop: WorkLoop[m.RolloutRequest] = WorkLoop(
            bus, consumer_for(config, self.role), self.settings.work, self, self.dialogue, busy_state="generating"
        )

    def gauges(self) -> dict[str, float]:
        return {**self.loop.gauges(), "policy_version": float(self.backend.policy_version)}

    async def run(self, stopping: asyncio.Event) -> None:
        await self.inbox.start()
        started = asyncio.Event()

        async def start_backend() -> None:
            await self.backend.start()
            started.set()

        async def watch_once_started() -> None:  # an update is applied to a loaded model, never before
            while not started.is_set():
                if stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(started.wait(), 0.5)
            await self.policy.watch(stopping)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.loop.run(stopping, ready=start_backend, slots=self.settings.concurrency))
                tg.create_task(watch_once_started())
        finally:
            self.state = "stopping"
            await self.inbox.close()
            await self.backend.close()

    # ------------------------------------------------------------ one dialogue

    async def dialogue(self, delivery: Delivery[m.RolloutRequest]) -> Outcome:
        request = delivery.msg
        try:
            problem = self.problems.get(request.problem_id)
        except KeyError:
            raise Reject(f"problem {request.problem_id!r} is not in this generator's problem set") from None
        if request.max_turns < 1:
            raise Reject(f"max_turns {request.max_turns} < 1")
        reward = msgspec.structs.replace(self.config.reward, max_turns=request.max_turns, gamma=request.gamma)
        await self.policy.check()  # the newest policy, even one published a moment ago (a synchronous run waits on it)
        started = time.monotonic()
        turns: list[Turn] = []
        history: list[m.HistoryEntry] = []
        reason: str | None = None
        # Turn events are stored while the dialogue goes on (no round trip per turn), all before the request is acked.
        async with asyncio.TaskGroup() as publishing:
            while reason is None:
                turn = await self.turn(request, delivery.attempt, problem, history)
                turn = msgspec.structs.replace(turn, score=result_score(turn.result, reward))
                turns.append(turn)
                history.append(m.HistoryEntry(turn_idx=turn.idx, kernel_code=turn.code, eval_result=turn.result,
                                              reward=turn.score))  # fmt: skip
                event = self.turn_event(request, delivery.attempt, turn)
                publishing.create_task(self.bus.publish(self.bus.subjects.event_turn, event))
                self.counters["turns"] += 1
                reason = dialogue_termination([t.result for t in turns], [t.score for t in turns], reward)
        self.counters["dialogues"] += 1
        self.counters[f"ended_{reason}"] += 1
        trajectory = self.trajectory_event(request, turns, reason, time.monotonic() - started, reward.gamma)
        return [(self.bus.subjects.event_trajectory, trajectory)]

    async def turn(self, request: m.RolloutRequest, attempt: int, problem: Problem, history: list[m.HistoryEntry]) -> Turn:
        idx = len(history)
        messages = turn_messages(problem.source, history)
        sampling = turn_sampling(self.settings.sampling, request.request_id, idx)
        generate = GenerateRequest(messages=messages, n=1, sampling=sampling, problem_id=request.problem_id, turn_idx=idx,
                                   sample_idx=request.sample_idx)  # fmt: skip
        t0 = time.monotonic()
        async with self.gate.turn():
            version = self.backend.policy_version
            generation = await self.backend.generate(generate)
        t1 = time.monotonic()
        code = extract_code(generation.completions[0].text)
        if code is None:
            result = m.EvalResult(problem_id=request.problem_id, error_kind="no_code", error_message=NO_CODE_MESSAGE)
        else:
            result = await self.evaluate(request, attempt, idx, code, problem)
        timings = {"generate_s": round(t1 - t0, 4), "evaluate_s": round(time.monotonic() - t1, 4)}
        return Turn(idx=idx, messages=messages, generation=generation, code=code or "", result=result, score=0.0,
                    policy_version=version, timings=timings)  # fmt: skip

    async def evaluate(self, request: m.RolloutRequest, attempt: int, idx: int, code: str, problem: Problem) -> m.EvalResult:
        eval_id = eval_id_for(request.request_id, attempt, idx)
        ask = m.EvalRequest(
            eval_id=eval_id,
            run_id=self.bus.settings.run,
            problem_id=request.problem_id,
            candidate_source=code,
            reply_to=self.inbox.subject,
            problem_source=problem.source,
            generator_id=self.actor_id,
            trajectory_id=request.request_id,
            turn_idx=idx,
            settings=self.config.check,
            created_at=time.time(),
        )
        await self.bus.publish(self.bus.subjects.eval_request, ask)
        try:
            return await self.inbox.wait(eval_id, self.settings.eval_timeout_s)
        except TimeoutError:
            self.counters["eval_timeout"] += 1
            return m.EvalResult(eval_id=eval_id, problem_id=request.problem_id, error_kind="eval_timeout",
                                error_message=f"no evaluation result within {self.settings.eval_timeout_s:.0f}s")  # fmt: skip

    # ------------------------------------------------------------ events

    def turn_event(self, request: m.RolloutRequest, attempt: int, turn: Turn) -> m.TurnEvent:
        completion = turn.generation.completions[0]
        return m.TurnEvent(
            event_id=turn_event_id(request.request_id, attempt, turn.idx),
            timestamp=m.log_timestamp(),
            instance_id=request.problem_id,
            turn_idx=turn.idx,
            turn_data=m.TurnData(
                prompt=turn.messages,
                response=completion.text,
                kernel_code=turn.code,
                eval_result=turn.result,
                reward=turn.score,
                extra_info={"task_type": request.task_type, "attempt": attempt, "finish_reason": completion.finish_reason},
                prompt_token_ids=turn.generation.prompt_token_ids,
                response_token_ids=completion.token_ids,
                response_logprobs=completion.logprobs,
                timings=turn.timings,
            ),
            run_id=self.bus.settings.run,
            trajectory_id=request.request_id,
            group_id=request.group_id,
            sample_idx=request.sample_idx,
            policy_version=turn.policy_version,
            generator_id=self.actor_id,
        )

    def trajectory_event(self, request: m.RolloutRequest, turns: list[Turn], reason: str, elapsed_s: float,
                         gamma: float) -> m.TrajectoryEvent:  # fmt: skip
        scores = [t.score for t in turns]
        returns = discounted_returns(scores, gamma)
        last = turns[-1].result
        # The conversation once: the last turn's prompt already holds every earlier attempt; token ids per turn
        # are kept as the model saw them (the learner trains on them), text is not repeated.
        messages = [*turns[-1].messages, m.ChatMessage("assistant", turns[-1].response)]
        return m.TrajectoryEvent(
            event_id=trajectory_event_id(request.request_id),
            timestamp=m.log_timestamp(),
            instance_id=request.problem_id,
            final_reward=scores[-1],
            num_turns=len(turns),
            turn_rewards=scores,
            aggregated_return=returns[0],
            history=[m.HistoryEntry(turn_idx=t.idx, kernel_code=t.code, eval_result=t.result, reward=t.score) for t in turns],
            messages=messages,
            execution_details=m.ExecutionDetails(
                final_compiled=last.compiled,
                final_correctness=last.correctness,
                final_runtime=last.runtime,
                final_speedup=last.speedup,
            ),
            extra_info={"task_type": request.task_type, "step": request.step},
            run_id=self.bus.settings.run,
            trajectory_id=request.request_id,
            group_id=request.group_id,
            request_id=request.request_id,
            sample_idx=request.sample_idx,
            n_samples=request.n_samples,
            policy_version=min(t.policy_version for t in turns),
            turn_returns=returns,
            termination_reason=reason,
            prompt_token_ids=[t.generation.prompt_token_ids for t in turns],
            response_token_ids=[t.generation.completions[0].token_ids for t in turns],
            response_logprobs=[t.generation.completions[0].logprobs for t in turns],
            rollout_time_s=round(elapsed_s, 3),
            generator_id=self.actor_id,
        )
