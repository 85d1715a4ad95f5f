"""Replay a run's log: re-evaluate every logged kernel with today's evaluator, or feed logged trajectories to a buffer.

To eval. Each logged turn that holds code (``turns.jsonl``, a non-empty ``kernel_code``) becomes an ``EvalRequest``
on the run's eval queue, exactly as a generator would send it: ``eval_id = replay-<replay id>-<turn event id>``,
``reply_to`` = this replay's ``EvalResultInbox`` (``krl.<run>.eval.result.replay-<replay id>``), the problem's source
from the problem set (matched by ``instance_id``; a problem not in the set is counted, never fatal) and the run's
``CheckSettings``. At most ``max_in_flight`` requests are outstanding. Each new verdict is compared with the logged one
(``compare_verdicts``); a turn whose verdict changed is one ``VerdictChange`` line, the run one ``ReplaySummary``.

What counts as a change: correctness flipped (``correct_to_wrong``, ``wrong_to_correct``), ``compiled`` flipped,
``error_kind`` changed, or — both verdicts correct, timed on a device (not the Triton interpreter) — the speedup moved
by more than the noise: ``|new − old| / old > max(10 %, 3·cv_old, 3·cv_new)``, ``cv = std / mean`` of a verdict's
``runtime_stats`` where it has them. Error messages alone never count (they hold addresses and numbers). A request
answered by the infrastructure (``evaluator_lost``, ``bad_request``) or not at all within the time-out is an error, not
a change, and a logged turn whose verdict was such an answer is not replayed (``old_no_verdict``); with ``device``
set, a verdict from an evaluator whose device does not name it is not compared (``other_device``): the eval queue is
shared, so a job cannot be routed to a device.

To buffer. Each logged ``TrajectoryEvent`` is published unchanged (ids, group, stream subject) to the run's
``event.trajectory`` subject with ``Nats-Msg-Id`` = its event id: a second replay within the stream's duplicate window
is stored once; after it, the buffer finds the trajectory id among its groups' members and counts a duplicate. A
trajectory from another run (its ``run_id``) joins an *adopted* group in the buffer (``BufferCore``); one whose
``run_id`` is this run's is the buffer's own and is not taken twice. A record without ``run_id`` gets ``source_run``.

Invariant: the log is read one line at a time (constant memory in its size); a torn or malformed line is skipped and
counted; nothing here decides a verdict — the evaluator does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec

from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import CheckSettings
from kernelrl.core.eval_inbox import EvalResultInbox
from kernelrl.core.problems import ProblemSet

log = logging.getLogger(__name__)

T = TypeVar("T", bound=m.Message)

SPEEDUP_NOISE_FLOOR = 0.10  # a relative speedup change at most this large is noise, whatever the stats say
NOISE_SIGMAS = 3.0
INFRA_ERRORS = frozenset({"evaluator_lost", "bad_request", "eval_timeout"})  # no verdict on the kernel
TABLE_ROWS = 200  # changes kept for the terminal table (first by problem, trajectory, turn); every one is in the JSONL


class LogReader:
    """The records of one JSONL log, decoded as ``type_``; lines that do not decode are counted in ``malformed``."""

    def __init__(self, path: Path, type_: type[T]) -> None:
        self.path = path
        self.codec = m.codec_for(type_)
        self.malformed = 0

    def __iter__(self) -> Iterator[T]:  # type: ignore[type-var]
        with self.path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield self.codec.decode(line)
                except (m.DecodeError, msgspec.ValidationError):
                    self.malformed += 1


# ---------------------------------------------------------------- verdicts


class Verdict(msgspec.Struct, kw_only=True, frozen=True):
    compiled: bool
    correctness: bool
    error_kind: str
    speedup: float
    runtime: float
    device: str
    interpreter: bool
    error_message: str = ""

    @classmethod
    def of(cls, r: m.EvalResult) -> Verdict:
        return cls(compiled=r.compiled, correctness=r.correctness, error_kind=r.error_kind, speedup=r.speedup, runtime=r.runtime,
                   device=r.device, interpreter=r.interpreter, error_message=r.error_message[:500])  # fmt: skip


class VerdictChange(msgspec.Struct, kw_only=True, frozen=True):
    """One logged turn whose verdict is different today (a line of the replay's JSONL)."""

    record: str = "change"
    event_id: str
    problem_id: str
    turn_idx: int
    trajectory_id: str
    eval_id: str
    changes: list[str]
    old: Verdict
    new: Verdict


class ReplaySummary(msgspec.Struct, kw_only=True):
    """The replay's last JSONL line and its terminal summary."""

    record: str = "summary"
    replay_id: str = ""
    run_id: str = ""
    turns_read: int = 0
    no_code: int = 0  # logged turns without a kernel: nothing to replay
    old_no_verdict: int = 0  # logged turns whose verdict was an infrastructure answer (eval_timeout, …): nothing to compare
    replayed: int = 0  # verdicts compared
    unchanged: int = 0
    changed: int = 0
    changed_by_kind: dict[str, int] = {}
    missing_problems: int = 0
    missing_problem_ids: list[str] = []
    errors: int = 0  # no verdict: time-outs and infrastructure answers
    errors_by_kind: dict[str, int] = {}
    other_device: int = 0
    malformed_lines: int = 0
    elapsed_s: float = 0.0


def runtime_cv(r: m.EvalResult) -> float:
    """``std / mean`` of the verdict's timed runs; 0 where it has none."""
    mean, std = r.runtime_stats.get("mean", 0.0), r.runtime_stats.get("std", 0.0)
    return std / mean if mean > 0 and std >= 0 else 0.0


def speedup_noise(old: m.EvalResult, new: m.EvalResult) -> float:
    """The relative speedup change that is still noise: ``max(10 %, 3·cv_old, 3·cv_new)``."""
    return max(SPEEDUP_NOISE_FLOOR, NOISE_SIGMAS * runtime_cv(old), NOISE_SIGMAS * runtime_cv(new))


def compare_verdicts(old: m.EvalResult, new: m.EvalResult) -> list[str]:
    """How ``new`` differs from the logged ``old``, as change kinds; [] when the verdict stands."""
    changes = []
    if old.correctness != new.correctness:
        changes.append("wrong_to_correct" if new.correctness else "correct_to_wrong")
    if old.compiled != new.compiled:
        changes.append("now_compiles" if new.compiled else "no_longer_compiles")
    if old.error_kind != new.error_kind:
        changes.append("error_kind")
    timed = old.correctness and new.correctness and not (old.interpreter or new.interpreter)
    if timed and old.speedup > 0 and new.speedup > 0 and abs(new.speedup - old.speedup) / old.speedup > speedup_noise(old, new):
        changes.append("faster" if new.speedup > old.speedup else "slower")
    return changes


def change_order(c: VerdictChange) -> tuple[str, str, int, str]:
    return (c.problem_id, c.trajectory_id, c.turn_idx, c.event_id)


def device_matches(result: m.EvalResult, device: str) -> bool:
    return not device or device.lower() in result.device.lower()


# ---------------------------------------------------------------- to eval


def replay_eval_id(replay_id: str, event_id: str) -> str:
    return f"replay-{replay_id}-{event_id}"


def requester_id(replay_id: str) -> str:
    return f"replay-{replay_id}"


class EvalReplay:
    """Re-evaluates the code turns of one ``turns.jsonl`` through the run's evaluators."""

    def __init__(self, bus: Bus, problems: ProblemSet, check: CheckSettings, replay_id: str, *, max_in_flight: int = 16,
                 eval_timeout_s: float = 900.0, device: str = "") -> None:  # fmt: skip
        self.bus = bus
        self.problems = {p.id: p for p in problems.problems}
        self.check = check
        self.replay_id = replay_id
        self.max_in_flight = max(1, max_in_flight)
        self.eval_timeout_s = eval_timeout_s
        self.device = device
        self.inbox = EvalResultInbox(bus, requester_id(replay_id))
        self.summary = ReplaySummary(replay_id=replay_id, run_id=bus.settings.run)
        self.changes: list[VerdictChange] = []  # the first TABLE_ROWS by change_order (all go to on_change)
        self._missing: Counter[str] = Counter()
        self._by_kind: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    def table(self) -> list[VerdictChange]:
        """The first ``TABLE_ROWS`` changes, in ``change_order``."""
        return sorted(self.changes, key=change_order)[:TABLE_ROWS]

    async def run(self, turns: Path, on_change: Callable[[VerdictChange], None] | None = None) -> ReplaySummary:
        started = time.monotonic()
        reader = LogReader(turns, m.TurnEvent)
        slots = asyncio.Semaphore(self.max_in_flight)
        await self.inbox.start()
        try:
            async with asyncio.TaskGroup() as tg:
                for event in reader:
                    self.summary.turns_read += 1
                    if not event.turn_data.kernel_code:
                        self.summary.no_code += 1
                        continue
                    if event.turn_data.eval_result.error_kind in INFRA_ERRORS:
                        self.summary.old_no_verdict += 1
                        continue
                    problem = self.problems.get(event.instance_id)
                    if problem is None:
                        self._missing[event.instance_id] += 1
                        continue
                    await slots.acquire()
                    tg.create_task(self._one(event, problem.source, slots, on_change))
        finally:
            await self.inbox.close()
        s = self.summary
        s.missing_problems = sum(self._missing.values())
        s.missing_problem_ids = sorted(self._missing)
        s.changed_by_kind = dict(sorted(self._by_kind.items()))
        s.errors_by_kind = dict(sorted(self._errors.items()))
        s.malformed_lines = reader.malformed
        s.elapsed_s = round(time.monotonic() - started, 3)
        return s

    async def _one(self, event: m.TurnEvent, source: str, slots: asyncio.Semaphore,
                   on_change: Callable[[VerdictChange], None] | None) -> None:  # fmt: skip
        try:
            new = await self._evaluate(event, source)
        finally:
            slots.release()
        if new is None:
            return
        old = event.turn_data.eval_result
        kinds = compare_verdicts(old, new)
        self.summary.replayed += 1
        if not kinds:
            self.summary.unchanged += 1
            return
        self.summary.changed += 1
        self._by_kind.update(kinds)
        change = VerdictChange(event_id=event.event_id, problem_id=event.instance_id, turn_idx=event.turn_idx,
                               trajectory_id=event.trajectory_id, eval_id=new.eval_id, changes=kinds, old=Verdict.of(old),
                               new=Verdict.of(new))  # fmt: skip
        self.changes.append(change)
        if len(self.changes) >= 2 * TABLE_ROWS:  # bounded memory, whatever the number of changes
            self.changes = sorted(self.changes, key=change_order)[:TABLE_ROWS]
        if on_change is not None:
            on_change(change)

    async def _evaluate(self, event: m.TurnEvent, source: str) -> m.EvalResult | None:
        """Today's verdict on the turn's kernel; None (counted) when there is none to compare."""
        eval_id = replay_eval_id(self.replay_id, event.event_id)
        request = m.EvalRequest(eval_id=eval_id, run_id=self.bus.settings.run, problem_id=event.instance_id,
                                candidate_source=event.turn_data.kernel_code, reply_to=self.inbox.subject,
                                problem_source=source, generator_id=requester_id(self.replay_id),
                                trajectory_id=event.trajectory_id, turn_idx=event.turn_idx, settings=self.check,
                                created_at=time.time())  # fmt: skip
        await self.bus.publish(self.bus.subjects.eval_request, request)
        try:
            result = await self.inbox.wait(eval_id, self.eval_timeout_s)
        except TimeoutError:
            self._errors["eval_timeout"] += 1
            self.summary.errors += 1
            return None
        finally:
            self.inbox.results.pop(eval_id, None)  # constant memory in the log's size
        if result.error_kind in INFRA_ERRORS:
            self._errors[result.error_kind] += 1
            self.summary.errors += 1
            return None
        if not device_matches(result, self.device):
            self.summary.other_device += 1
            return None
        return result


# ---------------------------------------------------------------- to buffer


class BufferReplaySummary(msgspec.Struct, kw_only=True):
    record: str = "summary"
    run_id: str = ""
    trajectories: int = 0  # read from the log
    stored: int = 0  # new in the run's event stream
    deduplicated: int = 0  # already in the stream within its duplicate window: stored once
    own_run: int = 0  # the run's own trajectories (the buffer has them already; it counts a duplicate)
    filled_run_id: int = 0  # records without run_id, given the source run's
    malformed_lines: int = 0


async def replay_trajectories(bus: Bus, trajectories: Path, source_run: str, window: int = 256) -> BufferReplaySummary:
    """Publish every logged trajectory, unchanged, to the run's ``event.trajectory`` subject."""
    summary = BufferReplaySummary(run_id=bus.settings.run)
    reader = LogReader(trajectories, m.TrajectoryEvent)
    chunk: list[tuple[str, m.Message]] = []
    subject = bus.subjects.event_trajectory

    async def flush() -> None:
        for ack in await bus.publish_many(chunk, window=window):
            if ack.duplicate:
                summary.deduplicated += 1
            else:
                summary.stored += 1
        chunk.clear()

    for event in reader:
        summary.trajectories += 1
        if not event.run_id:
            event = msgspec.structs.replace(event, run_id=source_run)
            summary.filled_run_id += 1
        if event.run_id == bus.settings.run:
            summary.own_run += 1
        chunk.append((subject, event))
        if len(chunk) >= window:
            await flush()
    if chunk:
        await flush()
    summary.malformed_lines = reader.malformed
    return summary
