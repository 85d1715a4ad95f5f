"""What ``kernelrl analyze`` computes: streaming accumulators over a run's log records, and the summary they give.

The readers (``actors/analysis_read.py``, or any other) pass each record's few numbers to ``RunStats.add_turn``,
``add_trajectory`` and ``add_step``; ``RunStats.summary()`` turns the sums into an ``RunSummary`` Struct, the
``--output`` JSON. Invariant: memory does not grow with the number of records: counters and sums keyed by turn
index and by problem, the speedup distribution in fixed log-scale bins, the geometric mean as a sum of logs, the
top trajectories in a bounded heap; only the step trend (one row per training step) is kept whole.

Definitions: a trajectory's outcome is its final kernel (``execution_details``); a speedup counts only for a
correct kernel and only when measured (> 0); ``fast_p`` (KernelBench) is the share of trajectories whose final
kernel is correct with speedup > p, so a correct kernel that was not timed (the CPU interpreter reports speedup 0)
counts as correct but in no ``fast_p``: on the CPU ``fast_0`` is 0 whatever the correct rate; a trajectory
improved when its last turn's reward beats its first's. Held-out evaluation records (group ids ``eval-…``) are
counted in ``Records`` and left out of every other number. Per turn
index the reward components are ``compile = w_compile·compiled``, ``correct = w_correct·correct``, ``speed =
correct·min(max(speedup − 1, 0), cap)`` (a CPU-interpreter timing earns no speed reward, as in ``core.reward``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import msgspec

from kernelrl.core.config import RewardConfig

FAST_P = (0.0, 1.0, 1.5, 2.0)
# speedup histogram: bins of a quarter octave from 1/16× to 16×; values outside fall in the end bins
HIST_EDGES = tuple(2.0 ** (k / 4) for k in range(-16, 17))
_HIST_BINS = len(HIST_EDGES) - 1
CORRECT, WRONG = "✓", "✗"


# ---------------------------------------------------------------- the summary (the --output JSON)


class Outcome(msgspec.Struct, kw_only=True):
    """Final-kernel outcomes of a set of trajectories (a run, a level, a problem)."""

    name: str = ""
    trajectories: int = 0
    avg_turns: float | None = None
    avg_return: float | None = None
    correct: int = 0
    final_correct_rate: float | None = None
    timed_correct: int = 0  # correct final kernels with a measured speedup (> 0)
    avg_speedup: float | None = None
    geomean_speedup: float | None = None
    fast_p: dict[str, float] = {}


class TurnSummary(msgspec.Struct, kw_only=True):
    turn_idx: int
    trajectories: int  # turn records at this index: the trajectories that reached it
    reward_mean: float
    compile_reward: float
    correct_reward: float
    speed_reward: float
    compile_rate: float
    correct_rate: float
    speedup_mean: float | None  # over correct turns with a measured speedup
    timed_correct: int
    error_kinds: dict[str, int]  # eval_result.error_kind -> turns; "none" for ""


class TopTrajectory(msgspec.Struct, kw_only=True):
    run: str
    trajectory_id: str
    problem: str
    aggregated_return: float
    num_turns: int
    progression: str  # one mark per turn: ✓ correct, ✗ not
    final_speedup: float
    policy_version: int


class StepTrend(msgspec.Struct, kw_only=True):
    run: str
    step: int
    policy_version: int
    total_groups: int
    groups_kept: int
    groups_filtered: int
    num_early_exit: int
    num_rollouts: int
    reward_mean: float
    loss: float


class SpeedupHistogram(msgspec.Struct, kw_only=True):
    """Correct final kernels with a measured speedup, by bin ``[edges[i], edges[i+1])``."""

    edges: list[float]
    counts: list[int]


class StepOutcome(msgspec.Struct, kw_only=True):
    """Final-kernel outcomes of the trajectories sampled for one step: the rollout round that requested them
    (``extra_info.step``), else the policy version that sampled them."""

    run: str
    step: int
    trajectories: int
    correct: int
    final_correct_rate: float
    avg_return: float


class Records(msgspec.Struct, kw_only=True):
    turns: int = 0
    trajectories: int = 0
    steps: int = 0
    skipped: dict[str, int] = {}  # file name -> lines that were not a valid record (torn, malformed)
    # held-out evaluation records (group ids eval-…: `kernelrl eval`, the learner's eval_steps), not in the summary;
    # their own summaries are in eval_logs/
    eval_turns: int = 0
    eval_trajectories: int = 0


class RunSummary(msgspec.Struct, kw_only=True):
    name: str
    log_dirs: list[str]
    reward: RewardConfig | None  # None in a combined summary of runs with different weights
    records: Records
    overall: Outcome
    multi_turn: int
    improved: int
    improvement_rate: float | None
    improvement_rate_multi_turn: float | None
    per_turn: list[TurnSummary]
    per_level: list[Outcome]
    per_problem: list[Outcome]
    top: list[TopTrajectory]
    steps: list[StepTrend]
    per_step: list[StepOutcome] = []  # absent from an analysis.json of an earlier version
    speedup_histogram: SpeedupHistogram


class Analysis(msgspec.Struct, kw_only=True):
    combined: RunSummary
    runs: list[RunSummary]


# ---------------------------------------------------------------- accumulators


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


class _TurnAcc:
    __slots__ = ("compile_r", "compiled", "correct", "correct_r", "errors", "n", "reward", "speed", "speedup", "timed")

    def __init__(self) -> None:
        self.n = self.compiled = self.correct = self.timed = 0
        self.reward = self.compile_r = self.correct_r = self.speed = self.speedup = 0.0
        self.errors: dict[str, int] = {}

    def merge(self, o: _TurnAcc) -> None:
        self.n += o.n
        self.compiled += o.compiled
        self.correct += o.correct
        self.timed += o.timed
        self.reward += o.reward
        self.compile_r += o.compile_r
        self.correct_r += o.correct_r
        self.speed += o.speed
        self.speedup += o.speedup
        for k, v in o.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v


class _OutcomeAcc:
    __slots__ = ("correct", "fast", "log_speedup", "n", "ret", "speedup", "timed", "turns")

    def __init__(self) -> None:
        self.n = self.turns = self.correct = self.timed = 0
        self.ret = self.speedup = self.log_speedup = 0.0
        self.fast = [0] * len(FAST_P)

    def merge(self, o: _OutcomeAcc) -> None:
        self.n += o.n
        self.turns += o.turns
        self.correct += o.correct
        self.timed += o.timed
        self.ret += o.ret
        self.speedup += o.speedup
        self.log_speedup += o.log_speedup
        self.fast = [a + b for a, b in zip(self.fast, o.fast, strict=True)]

    def outcome(self, name: str) -> Outcome:
        return Outcome(
            name=name,
            trajectories=self.n,
            avg_turns=_ratio(self.turns, self.n),
            avg_return=_ratio(self.ret, self.n),
            correct=self.correct,
            final_correct_rate=_ratio(self.correct, self.n),
            timed_correct=self.timed,
            avg_speedup=_ratio(self.speedup, self.timed),
            geomean_speedup=math.exp(self.log_speedup / self.timed) if self.timed else None,
            fast_p={str(p): f / self.n for p, f in zip(FAST_P, self.fast, strict=True)} if self.n else {},
        )


def sampled_at_step(extra_info: object, policy_version: int) -> int:
    """The step whose rollout round asked for the trajectory (``extra_info["step"]``), else its policy version."""
    step = extra_info.get("step") if isinstance(extra_info, dict) else None
    return step if type(step) is int else policy_version


def progression_marks(correct: Iterable[bool]) -> str:
    """One mark per turn: ``✗✗✓``."""
    return "".join(CORRECT if c else WRONG for c in correct)


def level_of(problem: str) -> str:
    """``level1/19_ReLU`` -> ``level1``; a problem id without a level is ``other``."""
    head, sep, _ = problem.partition("/")
    return head if sep else "other"


class RunStats:
    """The running sums of one run (or, merged, of several)."""

    def __init__(self, name: str, log_dirs: Iterable[str] = (), reward: RewardConfig | None = None, top_n: int = 5) -> None:
        self.name = name
        self.log_dirs = list(log_dirs)
        self.reward: RewardConfig | None = reward if reward is not None else RewardConfig()
        r = self.reward
        self._w_compile, self._w_correct, self._cap = r.compile_weight, r.correct_weight, r.speedup_cap
        self._interp_speed = r.reward_interpreter_speedup
        self.top_n = top_n
        self.records = Records()
        self.turns: dict[int, _TurnAcc] = {}
        self.problems: dict[str, _OutcomeAcc] = {}
        self.multi_turn = self.improved = 0
        self.hist = [0] * _HIST_BINS
        self._top: list[tuple[float, int, TopTrajectory]] = []  # min-heap; ties: the earlier record stays
        self._seq = 0
        self.top_floor = -math.inf  # a trajectory enters the top only with a return above this
        self.steps: list[StepTrend] = []
        self.by_step: dict[tuple[str, int], list[float]] = {}  # (run, step) -> [trajectories, correct, return sum]

    def skipped(self, file_name: str, lines: int) -> None:
        if lines:
            self.records.skipped[file_name] = self.records.skipped.get(file_name, 0) + lines

    def add_turn(
        self, turn_idx: int, reward: float, compiled: bool, correct: bool, speedup: float, interpreter: bool, error_kind: str
    ) -> None:
        acc = self.turns.get(turn_idx)
        if acc is None:
            acc = self.turns[turn_idx] = _TurnAcc()
        acc.n += 1
        acc.reward += reward
        if compiled:
            acc.compiled += 1
            acc.compile_r += self._w_compile
        if correct:
            acc.correct += 1
            acc.correct_r += self._w_correct
            if speedup > 0.0 and speedup < math.inf:
                acc.timed += 1
                acc.speedup += speedup
                if speedup > 1.0 and (self._interp_speed or not interpreter):
                    acc.speed += min(speedup - 1.0, self._cap)
        errors = acc.errors
        errors[error_kind] = errors.get(error_kind, 0) + 1
        self.records.turns += 1

    def add_trajectory(
        self,
        run: str,
        trajectory_id: str,
        problem: str,
        num_turns: int,
        aggregated_return: float,
        first_reward: float,
        last_reward: float,
        final_correct: bool,
        final_speedup: float,
        progression: str,
        policy_version: int,
        step: int,
    ) -> None:
        """``progression`` may be "" when ``aggregated_return <= top_floor`` (the trajectory cannot enter the top)."""
        at_step = self.by_step.get((run, step))
        if at_step is None:
            at_step = self.by_step[(run, step)] = [0, 0, 0.0]
        at_step[0] += 1
        at_step[1] += final_correct
        at_step[2] += aggregated_return
        acc = self.problems.get(problem)
        if acc is None:
            acc = self.problems[problem] = _OutcomeAcc()
        acc.n += 1
        acc.turns += num_turns
        acc.ret += aggregated_return
        if num_turns > 1:
            self.multi_turn += 1
        if last_reward > first_reward:
            self.improved += 1
        if final_correct:
            acc.correct += 1
            if final_speedup > 0.0 and final_speedup < math.inf:
                acc.timed += 1
                acc.speedup += final_speedup
                acc.log_speedup += math.log(final_speedup)
                self.hist[min(max(math.floor(math.log2(final_speedup) * 4) + 16, 0), _HIST_BINS - 1)] += 1
            fast = acc.fast
            for i, p in enumerate(FAST_P):
                if final_speedup > p:
                    fast[i] += 1
        self.records.trajectories += 1
        self._seq += 1
        if aggregated_return > self.top_floor:
            entry = TopTrajectory(
                run=run,
                trajectory_id=trajectory_id,
                problem=problem,
                aggregated_return=aggregated_return,
                num_turns=num_turns,
                progression=progression,
                final_speedup=final_speedup,
                policy_version=policy_version,
            )
            self._offer((aggregated_return, -self._seq, entry))

    def _offer(self, item: tuple[float, int, TopTrajectory]) -> None:
        if self.top_n <= 0:
            self.top_floor = math.inf
            return
        if len(self._top) < self.top_n:
            heapq.heappush(self._top, item)
        else:
            heapq.heappushpop(self._top, item)
        if len(self._top) == self.top_n:
            self.top_floor = self._top[0][0]

    def add_step(self, row: StepTrend) -> None:
        self.steps.append(row)
        self.records.steps += 1

    def merge(self, other: RunStats) -> None:
        """Add another run's sums (a combined summary); the other run's top entries keep their run name."""
        if self.reward != other.reward:
            self.reward = None
        for name in ("turns", "trajectories", "steps", "eval_turns", "eval_trajectories"):
            setattr(self.records, name, getattr(self.records, name) + getattr(other.records, name))
        for file_name, lines in other.records.skipped.items():
            self.skipped(file_name, lines)
        for idx, acc in other.turns.items():
            self.turns.setdefault(idx, _TurnAcc()).merge(acc)
        for problem, oacc in other.problems.items():
            self.problems.setdefault(problem, _OutcomeAcc()).merge(oacc)
        self.multi_turn += other.multi_turn
        self.improved += other.improved
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        for ret, _, entry in sorted(other._top, key=lambda t: (-t[0], -t[1])):
            self._seq += 1
            if ret > self.top_floor:
                self._offer((ret, -self._seq, entry))
        self.steps.extend(other.steps)
        for key, (n, correct, ret) in other.by_step.items():
            mine = self.by_step.setdefault(key, [0, 0, 0.0])
            mine[0] += n
            mine[1] += correct
            mine[2] += ret
        self.log_dirs.extend(other.log_dirs)

    def summary(self) -> RunSummary:
        total = _OutcomeAcc()
        levels: dict[str, _OutcomeAcc] = {}
        for problem, acc in self.problems.items():
            total.merge(acc)
            levels.setdefault(level_of(problem), _OutcomeAcc()).merge(acc)
        n = total.n
        return RunSummary(
            name=self.name,
            log_dirs=self.log_dirs,
            reward=self.reward,
            records=self.records,
            overall=total.outcome("all"),
            multi_turn=self.multi_turn,
            improved=self.improved,
            improvement_rate=_ratio(self.improved, n),
            improvement_rate_multi_turn=_ratio(self.improved, self.multi_turn),
            per_turn=[self._turn_summary(idx, self.turns[idx]) for idx in sorted(self.turns)],
            per_level=[levels[k].outcome(k) for k in sorted(levels)],
            per_problem=[self.problems[k].outcome(k) for k in sorted(self.problems)],
            top=[entry for _, _, entry in sorted(self._top, key=lambda t: (-t[0], -t[1]))],
            steps=self.steps,
            per_step=self._per_step(),
            speedup_histogram=SpeedupHistogram(edges=list(HIST_EDGES), counts=list(self.hist)),
        )

    def _per_step(self) -> list[StepOutcome]:
        """By run (in the order first seen), then by step."""
        runs = {run: i for i, run in enumerate(dict.fromkeys(run for run, _ in self.by_step))}
        return [
            StepOutcome(run=run, step=step, trajectories=int(n), correct=int(c), final_correct_rate=c / n, avg_return=r / n)
            for (run, step), (n, c, r) in sorted(self.by_step.items(), key=lambda kv: (runs[kv[0][0]], kv[0][1]))
        ]

    def _turn_summary(self, idx: int, acc: _TurnAcc) -> TurnSummary:
        n = acc.n
        return TurnSummary(
            turn_idx=idx,
            trajectories=n,
            reward_mean=acc.reward / n,
            compile_reward=acc.compile_r / n,
            correct_reward=acc.correct_r / n,
            speed_reward=acc.speed / n,
            compile_rate=acc.compiled / n,
            correct_rate=acc.correct / n,
            speedup_mean=_ratio(acc.speedup, acc.timed),
            timed_correct=acc.timed,
            error_kinds={k or "none": v for k, v in sorted(acc.errors.items())},
        )
