"""Policy evaluation: K samples per problem through the real multi-turn loop, summarised as an ``EvalSummary``.

Two halves. The maths (pure functions of the trajectories, tested against hand counts) and the driver (publish
rollout requests for fixed problems on a run's bus, collect their trajectories, publish the summary on
``krl.<run>.event.eval`` so the logger writes ``eval_logs/eval_step_XXXX.json``, write the samples beside it).

Definitions, all over the trajectories that arrived (a request parked or timed out is reported as missing, never
scored), and all about a trajectory's *final* turn (the kernel the dialogue ended with):

- ``accuracy`` = correct / total; ``compiled`` = final kernels that compiled, also as ``attempted_answer`` (the
  seed's name; a summary of an earlier version has only ``compiled``: read ``EvalSummary.attempted``);
- ``avg_turns_correct``, ``avg_speedup_correct``: means over the correct trajectories (0 if none);
- reward = the trajectory's ``aggregated_return`` (``R_0``, what training maximises); ``std_reward`` is the
  population standard deviation;
- ``fast_p[p]`` for p in ``FAST_P``: share of trajectories correct with speedup > p (KernelBench's fast_p);
  keys are ``str(p)`` ("0.0", "1.0", "1.5", "2.0", as in ``kernelrl analyze``). A correct kernel that was not
  timed (the CPU interpreter reports speedup 0) is in ``accuracy`` but in no ``fast_p``;
- ``beat_rate``: share correct and faster than the baseline (speedup > 1, i.e. ``fast_p["1.0"]``);
- ``pass_at_k[k]``: the unbiased estimator 1 − C(n−c, k)/C(n, k) per problem (n samples, c correct), averaged over
  the problems with n ≥ k, for k in 1, 2, 4, … ≤ K and K itself; keys are ``str(k)``.

Fields ``EvalSummary`` does not have (per-problem counts, the samples file ...) go into its
``extra``; a field added to ``EvalSummary`` later is filled at the top level instead, with no change here.

Eval requests are ordinary ``RolloutRequest``s whose group ids start with ``eval-`` (a training run's buffer
ignores them as groups it never issued; ``kernelrl analyze``, ``view`` and the W&B table tell them from training
rollouts by that prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson
from nats.js import api

from kernelrl.actors.run_log import write_json_atomically
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import RewardConfig
from kernelrl.core.subjects import EVAL_GROUP_PREFIX

FAST_P: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0)

# ---------------------------------------------------------------- maths


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What the summary needs of one trajectory."""

    problem_id: str
    correct: bool
    compiled: bool
    speedup: float
    num_turns: int
    reward: float
    interpreter: bool = False


def outcome_of(ev: m.TrajectoryEvent) -> Outcome:
    d = ev.execution_details
    last = ev.history[-1].eval_result if ev.history else None
    return Outcome(problem_id=ev.instance_id, correct=d.final_correctness, compiled=d.final_compiled,
                   speedup=d.final_speedup, num_turns=ev.num_turns, reward=ev.aggregated_return,
                   interpreter=bool(last and last.interpreter))  # fmt: skip


def p_key(p: float) -> str:
    return str(float(p))  # "0.0", "1.0", "1.5", "2.0": the keys of the sample stream and of ``kernelrl analyze``


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(samples: int) -> list[int]:
    """1, 2, 4, … up to ``samples``, and ``samples`` itself."""
    ks = [1 << i for i in range(max(samples, 1).bit_length()) if 1 << i <= samples]
    return sorted({*ks, samples}) if samples >= 1 else []


def mean_pass_at_k(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """``counts``: problem → (n, c). Per k, the mean over the problems with at least k samples (k absent if none)."""
    out = {}
    for k in ks:
        values = [pass_at_k(n, c, k) for n, c in counts.values() if n >= k]
        if values:
            out[str(k)] = sum(values) / len(values)
    return out


def fast_p(outcomes: Sequence[Outcome], ps: Iterable[float] = FAST_P) -> dict[str, float]:
    n = len(outcomes)
    return {p_key(p): (sum(o.correct and o.speedup > p for o in outcomes) / n if n else 0.0) for p in ps}


def beat_rate(outcomes: Sequence[Outcome]) -> float:
    """Share of trajectories whose final kernel is correct and faster than the baseline."""
    return sum(o.correct and o.speedup > 1.0 for o in outcomes) / len(outcomes) if outcomes else 0.0


class RewardStats(msgspec.Struct, frozen=True):
    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0


def reward_stats(rewards: Sequence[float]) -> RewardStats:
    if not rewards:
        return RewardStats()
    return RewardStats(statistics.fmean(rewards), statistics.median(rewards), statistics.pstdev(rewards), min(rewards),
                       max(rewards))  # fmt: skip


def mean_or_zero(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def problem_counts(outcomes: Sequence[Outcome]) -> dict[str, tuple[int, int]]:
    """problem → (samples, correct)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for o in outcomes:
        counts[o.problem_id][0] += 1
        counts[o.problem_id][1] += o.correct
    return {p: (n, c) for p, (n, c) in counts.items()}


def summary_fields(outcomes: Sequence[Outcome], samples_per_problem: int) -> dict[str, Any]:
    """Every number of the evaluation, by its ``EvalSummary`` / eval JSON name."""
    correct = [o for o in outcomes if o.correct]
    stats = reward_stats([o.reward for o in outcomes])
    counts = problem_counts(outcomes)
    n = len(outcomes)
    return {
        "accuracy": len(correct) / n if n else 0.0,
        "correct_answers": len(correct),
        "total_samples": n,
        "compiled": sum(o.compiled for o in outcomes),
        "attempted_answer": sum(o.compiled for o in outcomes),  # the seed's name for it
        "avg_reward": stats.mean,
        "median_reward": stats.median,
        "std_reward": stats.std,
        "min_reward": stats.min,
        "max_reward": stats.max,
        "fast_p": fast_p(outcomes),
        "pass_at_k": mean_pass_at_k(counts, k_values(samples_per_problem)),
        "avg_turns_correct": mean_or_zero([o.num_turns for o in correct]),
        "avg_speedup_correct": mean_or_zero([o.speedup for o in correct]),
        "beat_rate": beat_rate(outcomes),
        "samples_per_problem": samples_per_problem,
        "n_problems": len(counts),
        "interpreter_timings": sum(o.interpreter for o in outcomes),
        "per_problem": {p: {"samples": pn, "correct": pc} for p, (pn, pc) in sorted(counts.items())},
    }


_SUMMARY_FIELDS = frozenset(m.EvalSummary.__struct_fields__)


def summarize(
    trajectories: Sequence[m.TrajectoryEvent],
    *,
    step: int,
    samples_per_problem: int,
    eval_time: float = 0.0,
    run_id: str = "",
    policy_version: int | None = None,
    event_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> m.EvalSummary:
    """The ``EvalSummary`` of these trajectories; ``policy_version`` defaults to the newest that sampled them."""
    fields = summary_fields([outcome_of(t) for t in trajectories], samples_per_problem)
    fields |= dict(extra or {})
    fields["eval_time"] = eval_time
    top = {k: v for k, v in fields.items() if k in _SUMMARY_FIELDS}
    rest = {k: v for k, v in fields.items() if k not in _SUMMARY_FIELDS}
    version = policy_version if policy_version is not None else max((t.policy_version for t in trajectories), default=0)
    return m.EvalSummary(event_id=event_id or f"eval-{m.new_id()}", step=step, timestamp=m.log_timestamp(), run_id=run_id,
                         policy_version=version, extra=rest, **top)  # fmt: skip


# ---------------------------------------------------------------- files


def eval_json_path(log_dir: Path, step: int, event_id: str) -> Path:
    """Where the logger writes this summary (its rule: a second summary for a step goes beside the first)."""
    base = log_dir / "eval_logs" / f"eval_step_{step:04d}.json"
    try:
        existing = orjson.loads(base.read_bytes()).get("event_id")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return base
    return base if existing == event_id else base.with_name(f"eval_step_{step:04d}.{event_id[:16]}.json")


def samples_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name.removesuffix(".json") + ".samples.jsonl")


def write_samples(path: Path, trajectories: Sequence[m.TrajectoryEvent]) -> None:
    """The trajectories, one ``TrajectoryEvent`` per line, by problem and sample; written atomically."""
    codec = m.codec_for(m.TrajectoryEvent)
    ordered = sorted(trajectories, key=lambda t: (t.instance_id, t.sample_idx, t.request_id))
    write_json_atomically(path, b"".join(codec.encode(t) + b"\n" for t in ordered))


# ---------------------------------------------------------------- driver


def eval_requests(run_id: str, problem_ids: Sequence[str], samples: int, reward: RewardConfig, step: int = 0
                  ) -> list[m.RolloutRequest]:  # fmt: skip
    """K requests per problem, one group per problem; ids are fresh per call (``eval-<step>-<tag>-p<i>-s<j>``)."""
    tag, now = m.new_id()[:8], time.time()
    task_type = "kernelbench" if reward.max_turns == 1 else "kernelbench_multiturn"
    requests = []
    for i, problem_id in enumerate(problem_ids):
        group_id = f"{EVAL_GROUP_PREFIX}{step:04d}-{tag}-p{i}"
        for j in range(samples):
            requests.append(m.RolloutRequest(request_id=f"{group_id}-s{j}", run_id=run_id, problem_id=problem_id,
                                             group_id=group_id, sample_idx=j, n_samples=samples, max_turns=reward.max_turns,
                                             gamma=reward.gamma, task_type=task_type, step=step, created_at=now))  # fmt: skip
    return requests


class Collected(msgspec.Struct, kw_only=True):
    trajectories: list[m.TrajectoryEvent]
    turns: list[m.TurnEvent]  # of those trajectories, without token ids (only when asked for)
    parked: list[str]  # request ids that exhausted their deliveries
    missing: list[str]  # request ids with neither a trajectory nor a parking before the time-out
    eval_time: float


def without_tokens(ev: m.TurnEvent) -> m.TurnEvent:
    """The turn as text: its token ids and logprobs dropped."""
    data = msgspec.structs.replace(ev.turn_data, prompt_token_ids=[], response_token_ids=[], response_logprobs=[])
    return msgspec.structs.replace(ev, turn_data=data)


async def collect_trajectories(
    bus: Bus,
    requests: Sequence[m.RolloutRequest],
    timeout_s: float,
    stopping: asyncio.Event | None = None,
    with_turns: bool = False,
) -> Collected:
    """Publish ``requests`` and wait for each one's trajectory (or its parking) on the run's event stream.

    Ordered consumers from "now" are made before publishing, so no trajectory can slip past. Stops early when
    ``stopping`` is set (what has arrived is returned, the rest counted missing). ``with_turns``: the trajectories'
    turn events too, read through one consumer of every event subject, where a dialogue's turns come before its
    trajectory (the generator stores them first), so they are all in once the trajectories are."""
    wanted = {r.request_id for r in requests}
    found: dict[str, m.TrajectoryEvent] = {}
    turns: list[m.TurnEvent] = []
    parked: set[str] = set()
    settled = asyncio.Event()
    read = {bus.subjects.event_trajectory, bus.subjects.event_parked} | ({bus.subjects.event_turn} if with_turns else set())

    async def on_message(msg: Any) -> None:
        if msg.subject not in read:
            return
        try:
            event = bus.decode(msg.subject, msg.data, msg.headers)
        except m.DecodeError:
            return
        if isinstance(event, m.TrajectoryEvent) and event.request_id in wanted:
            found.setdefault(event.request_id, event)
        elif isinstance(event, m.TurnEvent) and event.trajectory_id in wanted:
            turns.append(without_tokens(event))
        elif isinstance(event, m.WorkParked) and event.message_id in wanted:
            parked.add(event.message_id)
        if len(found.keys() | parked) == len(wanted):
            settled.set()

    subs = []
    subjects = [bus.subjects.events] if with_turns else [bus.subjects.event_trajectory, bus.subjects.event_parked]
    for subject in subjects:
        subs.append(await bus.js.subscribe(subject, stream=bus.subjects.event_stream, cb=on_message, ordered_consumer=True,
                                           deliver_policy=api.DeliverPolicy.NEW, idle_heartbeat=5.0))  # fmt: skip
    started = time.monotonic()
    try:
        await bus.publish_many((bus.subjects.rollout_request, r) for r in requests)
        waits = [asyncio.ensure_future(settled.wait())]
        if stopping is not None:
            waits.append(asyncio.ensure_future(stopping.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        eval_time = time.monotonic() - started
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    order = {r.request_id: i for i, r in enumerate(requests)}
    trajectories = sorted(found.values(), key=lambda t: order[t.request_id])
    missing = sorted(wanted - found.keys() - parked, key=order.__getitem__)
    turns = sorted((t for t in turns if t.trajectory_id in found), key=lambda t: (order[t.trajectory_id], t.turn_idx))
    return Collected(trajectories=trajectories, turns=turns, parked=sorted(parked - found.keys(), key=order.__getitem__),
                     missing=missing, eval_time=eval_time)  # fmt: skip


class EvalReport(msgspec.Struct, kw_only=True):
    summary: m.EvalSummary
    trajectories: list[m.TrajectoryEvent]
    turns: list[m.TurnEvent]  # the trajectories' turns, as text (``with_turns`` only)
    samples_file: str  # "" when no samples directory was given
    json_file: str  # where the logger writes (or will write) the summary, if it logs to ``log_dir``


async def evaluate_policy(
    bus: Bus,
    problem_ids: Sequence[str],
    samples: int,
    reward: RewardConfig,
    *,
    step: int = 0,
    timeout_s: float = 3600.0,
    log_dir: Path | None = None,
    stopping: asyncio.Event | None = None,
    with_turns: bool = False,
) -> EvalReport:
    """One evaluation on a running system (generators, evaluators, and a logger somewhere): requests, trajectories,
    the samples written to ``log_dir/eval_logs`` (if given), the ``EvalSummary`` published for the logger.

    What the learner calls every ``eval_steps`` steps (as a background task: it waits for whole dialogues).
    ``with_turns``: keep the turn events too (for W&B's per-turn columns; it reads every event of the run meanwhile)."""
    requests = eval_requests(bus.settings.run, problem_ids, samples, reward, step)
    got = await collect_trajectories(bus, requests, timeout_s, stopping, with_turns)
    event_id = requests[0].group_id.rsplit("-p", 1)[0] if requests else f"{EVAL_GROUP_PREFIX}{m.new_id()}"  # eval-<step>-<tag>
    json_file = samples_file = ""
    if log_dir is not None:
        json_path = eval_json_path(log_dir, step, event_id)
        json_file, samples_file = str(json_path), str(samples_path(json_path))
    extra = {"missing": len(got.missing) + len(got.parked), "problems": list(problem_ids),
             "samples_file": Path(samples_file).name if samples_file else ""}  # fmt: skip
    summary = summarize(got.trajectories, step=step, samples_per_problem=samples, eval_time=round(got.eval_time, 3),
                        run_id=bus.settings.run, event_id=event_id, extra=extra)  # fmt: skip
    if samples_file:
        await asyncio.to_thread(write_samples, Path(samples_file), got.trajectories)
    await bus.publish(bus.subjects.event_eval, summary)
    return EvalReport(summary=summary, trajectories=got.trajectories, turns=got.turns, samples_file=samples_file,
                      json_file=json_file)  # fmt: skip
