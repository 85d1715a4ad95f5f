"""The terminal report of ``kernelrl analyze``: an ``Analysis`` as a few concise blocks of text.

Invariant: pure formatting; every number printed is a field of the ``--output`` JSON (``actors/analysis.py``).
"""

from __future__ import annotations

from typing import TypeVar

from kernelrl.actors.analysis import Analysis, Outcome, RunSummary

T = TypeVar("T")

RULE = "─" * 100
MAX_PROBLEMS = 15
MAX_STEPS = 12


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _speed(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _outcome_row(o: Outcome, width: int) -> str:
    fast = "  ".join(f"{100 * o.fast_p.get(k, 0.0):5.1f}" for k in ("1.0", "2.0"))
    return (
        f"  {o.name[:width]:<{width}} {o.trajectories:>7,} {_num(o.avg_turns, '.2f'):>6} {_num(o.avg_return):>7} "
        f"{_pct(o.final_correct_rate):>7} {_speed(o.avg_speedup):>8} {_speed(o.geomean_speedup):>8}  {fast}"
    )


def _outcome_table(title: str, rows: list[Outcome], limit: int | None = None) -> list[str]:
    width = max([len(title), *(len(o.name) for o in rows)])
    width = min(width, 40)
    lines = [
        f"  {title:<{width}} {'traj':>7} {'turns':>6} {'return':>7} {'correct':>7} {'speedup':>8} {'geomean':>8}  fast_1 fast_2"
    ]
    shown = sorted(rows, key=lambda o: -o.trajectories)[:limit] if limit else rows
    lines += [_outcome_row(o, width) for o in shown]
    if limit and len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more problems in the --output JSON")
    return lines


def _steps_shown(steps: list[T]) -> list[T]:
    if len(steps) <= MAX_STEPS:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (MAX_STEPS - 1)) for i in range(MAX_STEPS)})
    return [steps[i] for i in idx]


def run_report(s: RunSummary, several_runs: bool = False) -> str:
    o = s.overall
    rec = s.records
    skipped = ", ".join(f"{n} in {f}" for f, n in sorted(rec.skipped.items())) or "none"
    lines = [
        RULE,
        f"{s.name}: {rec.trajectories:,} trajectories, {rec.turns:,} turns, {rec.steps:,} steps  (lines skipped: {skipped})",
    ]
    if rec.eval_trajectories or rec.eval_turns:
        lines.append(
            f"Held-out evaluation records left out: {rec.eval_trajectories:,} trajectories, {rec.eval_turns:,} turns "
            "(their summaries: eval_logs/)"
        )
    lines += [
        RULE,
        f"Trajectories: {o.trajectories:,}   avg turns {_num(o.avg_turns, '.2f')}   avg return {_num(o.avg_return)}   "
        f"final correct {o.correct:,}/{o.trajectories:,} ({_pct(o.final_correct_rate)})",
        f"Improved (last turn beat the first): {s.improved:,} ({_pct(s.improvement_rate)}; "
        f"{_pct(s.improvement_rate_multi_turn)} of {s.multi_turn:,} multi-turn)",
        f"Speedup of correct final kernels ({o.timed_correct:,} timed): mean {_speed(o.avg_speedup)}   "
        f"geomean {_speed(o.geomean_speedup)}   "
        + "  ".join(f"fast_{k.removesuffix('.0')} {_pct(v)}" for k, v in o.fast_p.items()),
    ]
    if s.per_turn:
        lines += ["", "By turn:  turn   reached  reward  (compile correct  speed)  compiled  correct  speedup  errors"]
        for t in s.per_turn:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(t.error_kinds.items(), key=lambda kv: -kv[1]) if k != "none") or "—"
            lines.append(
                f"          {t.turn_idx:>4} {t.trajectories:>9,}  {t.reward_mean:6.3f}  ({t.compile_reward:6.3f} "
                f"{t.correct_reward:6.3f} {t.speed_reward:6.3f})  {_pct(t.compile_rate):>8} {_pct(t.correct_rate):>8} "
                f"{_speed(t.speedup_mean):>8}  {errors}"
            )
    if s.per_level:
        lines += ["", *_outcome_table("level", s.per_level)]
    if s.per_problem:
        lines += ["", *_outcome_table("problem", s.per_problem, MAX_PROBLEMS)]
    if s.top:
        lines += ["", f"Top {len(s.top)} by return:"]
        for t in s.top:
            run = f"{t.run}  " if several_runs else ""
            lines.append(
                f"  {t.aggregated_return:7.3f}  {t.progression or '?':<4} {_speed(t.final_speedup):>7}  {run}{t.problem}  "
                f"{t.trajectory_id}  (policy v{t.policy_version})"
            )
    if s.steps:
        lines += ["", "Steps:  step  policy  groups kept/total  filtered  early exit  reward_mean      loss"]
        for st in _steps_shown(s.steps):
            run = f"  {st.run}" if several_runs else ""
            lines.append(
                f"        {st.step:>4}  {st.policy_version:>6}  {st.groups_kept:>10}/{st.total_groups:<6} "
                f"{st.groups_filtered:>8}  "
                f"{st.num_early_exit:>4}/{st.num_rollouts:<5}  {st.reward_mean:>11.3f}  {st.loss:>8.4f}{run}"
            )
        if len(s.steps) > MAX_STEPS:
            lines.append(f"        ({MAX_STEPS} of {len(s.steps)} steps shown, evenly spaced; all in the --output JSON)")
    if s.per_step:
        lines += ["", "Trajectories by the step that sampled them:  step  trajectories  final correct  avg return"]
        for o in _steps_shown(s.per_step):
            run = f"  {o.run}" if several_runs else ""
            lines.append(
                f"{'':>44}{o.step:>6}  {o.trajectories:>12,}  {o.correct:>6,} ({_pct(o.final_correct_rate):>6})  "
                f"{o.avg_return:>10.3f}{run}"
            )
        if len(s.per_step) > MAX_STEPS:
            lines.append(f"{'':>44}({MAX_STEPS} of {len(s.per_step)} steps shown, evenly spaced; all in the --output JSON)")
    return "\n".join(lines)


def report(analysis: Analysis) -> str:
    """The combined summary, then one per run when there are several."""
    if len(analysis.runs) <= 1:
        return run_report(analysis.combined)
    parts = [run_report(analysis.combined, several_runs=True)]
    parts += [run_report(r) for r in analysis.runs]
    return "\n\n".join(parts)
