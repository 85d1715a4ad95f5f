"""Console text in the seed formats: turn lines, trajectory summaries, step summaries and the eval block.

Pure functions from messages to strings; concise by default, more with ``verbose``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kernelrl.core import messages as m

RULE = "─" * 80


def _mark(flag: bool) -> str:
    return "✓" if flag else "✗"


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def format_turn_line(ev: m.TurnEvent, verbose: bool = False) -> str:
    r = ev.turn_data.eval_result
    runtime = f"{r.runtime:.2f}ms" if r.runtime >= 0 else "n/a"
    line = (
        f"[Turn {ev.turn_idx + 1}] {ev.instance_id}: Compile:{_mark(r.compiled)} "
        f"Correct:{_mark(r.correctness)} Runtime:{runtime} Speedup:{r.speedup:.2f}x "
        f"Reward:{ev.turn_data.reward:.3f}"
    )
    if not verbose:
        return line
    details = [
        f"    trajectory={ev.trajectory_id} group={ev.group_id} sample={ev.sample_idx} "
        f"policy=v{ev.policy_version} return={ev.turn_data.turn_return:.3f}"
    ]
    if r.interpreter:
        details.append("    timings are Triton-interpreter timings (no speedup reward)")
    if r.error_kind or r.error_message:
        details.append(f"    error[{r.error_kind or 'unknown'}]:")
        details.extend("      " + ln for ln in _tail(r.error_message).splitlines())
    return "\n".join([line, *details])


def format_trajectory_summary(ev: m.TrajectoryEvent, verbose: bool = False) -> str:
    d = ev.execution_details
    rewards = "[" + ", ".join(f"{x:.3g}" for x in ev.turn_rewards) + "]"
    lines = [
        f"=== Final Trajectory Summary for {ev.instance_id} ===",
        f"Total turns: {ev.num_turns}",
        f"Turn rewards: {rewards}",
        f"Aggregated return: {ev.aggregated_return:.4f}",
        f"Final correctness: {d.final_correctness}",
        f"Final speedup: {d.final_speedup:.2f}x",
    ]
    if verbose:
        returns = "[" + ", ".join(f"{x:.4f}" for x in ev.turn_returns) + "]"
        lines += [
            f"Termination: {ev.termination_reason or 'n/a'}",
            f"Turn returns: {returns}",
            f"Policy version: {ev.policy_version}  Trajectory: {ev.trajectory_id}  Group: {ev.group_id}",
            f"Rollout time: {ev.rollout_time_s:.1f}s",
        ]
    return "\n".join(lines)


def format_advantage_table(rows: Sequence[Sequence[float]]) -> str:
    n_turns = max((len(r) for r in rows), default=0)
    header = "Rollout |" + "".join(f" Turn {t + 1:2d} |" for t in range(n_turns))
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f" {a:+.3f} |" for a in row) + "        |" * (n_turns - len(row))
        body.append(f"  {i + 1:5d} |{cells}")
    return "\n".join([RULE, "Turn-by-Turn Advantage Table:", RULE, header, RULE, *body, RULE])


def format_step_line(ev: m.StepSummary) -> str:
    """The concise step line: ``Step 10/200 · Groups: 6/8 kept (2 filtered), 18/48 finished early · reward 0.41 (+0.07)``."""
    g = ev.groups
    total = f"/{ev.total_steps}" if ev.total_steps else ""
    change = f" ({g.reward_change:+.2f})" if g.reward_change is not None else ""
    return (
        f"Step {ev.step}{total} · Groups: {g.groups_kept}/{g.total_groups} kept ({g.groups_filtered} filtered), "
        f"{g.num_early_exit}/{g.num_rollouts} finished early · reward {g.reward_mean:.2f}{change}"
    )


def format_step_summary(ev: m.StepSummary, verbose: bool = False) -> str:
    g = ev.groups
    line = format_step_line(ev)
    if not verbose:
        return line
    share = 100.0 * g.trainable_tokens / g.total_tokens if g.total_tokens else 0.0
    lines = [
        line,
        RULE,
        f"STEP {ev.step}: BACKPROPAGATION & OPTIMIZATION (policy v{ev.policy_version})",
        RULE,
        f"✓ Grad norm (clipped): {ev.grad_norm:.4f}",
        f"✓ Tokens trained: {ev.tokens_trained:,}",
        f"✓ Total loss: {ev.loss:.4f}",
        f"✓ Clip fraction: {ev.clip_fraction:.3f}  Importance ratio: mean {ev.ratio_mean:.3f}, max {ev.ratio_max:.3f}"
        + (f"  KL: {ev.kl:.4f}" if ev.kl else ""),
        f"✓ Learning rate: {ev.learning_rate:.2e}  Trainable parameters: {ev.trainable_params:,}",
        "",
        "Group Summary:",
        f"  - Total groups: {g.total_groups}",
        f"  - Groups kept for training: {g.groups_kept}",
        f"  - Groups filtered (low variance): {g.groups_filtered}",
        f"  - Rollouts that finished early (didn't exhaust turns): {g.num_early_exit}/{g.num_rollouts}",
        f"  - Total rollout time: {g.rollout_time_s:.1f}s",
        f"  - Total training time: {g.training_time_s:.1f}s",
        f"  - Total tokens: {g.total_tokens:,}",
        f"  - Trainable tokens: {g.trainable_tokens:,} ({share:.1f}%)",
    ]
    dropped = [(g.stale_dropped, "stale trajectories dropped"), (g.short_groups, "groups closed short by the time-out"),
               (g.lost_rollouts, "rollouts lost"), (g.groups_dropped, "groups dropped (too few members)"),
               (ev.missing_samples, "trajectories missing from the event stream")]  # fmt: skip
    lines += [f"  - {text}: {n}" for n, text in dropped if n]
    lines.append(RULE)
    if g.turn_advantages:
        lines.append(format_advantage_table(g.turn_advantages))
    return "\n".join(lines)


def format_parked(ev: m.WorkParked) -> str:
    return (
        f"⚠ Parked {ev.message_type} {ev.message_id} from {ev.consumer} after {ev.deliveries} deliveries "
        f"(kept on {ev.parked_subject})"
    )


_SUMMARY_FIELDS = frozenset(m.EvalSummary.__struct_fields__)


def summary_value(ev: m.EvalSummary, name: str, default: Any = 0.0) -> Any:
    """A number of the summary, wherever it lives (a field, or ``extra``)."""
    return getattr(ev, name) if name in _SUMMARY_FIELDS else ev.extra.get(name, default)


def format_eval_block(ev: m.EvalSummary, saved_to: str = "", samples_to: str = "") -> str:
    """The seed note's block after an evaluation (``Detailed Rubric Statistics:``, then where it was saved), with our
    numbers added: what ``kernelrl eval`` and the logger print."""
    n = ev.total_samples
    pct = (lambda x: 100.0 * x / n) if n else (lambda x: 0.0)
    k = summary_value(ev, "samples_per_problem", 0)
    problems = summary_value(ev, "n_problems", 0)
    lines = [
        f"Eval at step {ev.step} (policy v{ev.policy_version}): {problems} problems × {k} samples, {ev.eval_time:.1f}s",
        "Detailed Rubric Statistics:",
        f"   Accuracy: {ev.correct_answers}/{n} ({pct(ev.correct_answers):.1f}%)",
        f"   Attempted answers: {ev.attempted}/{n} ({pct(ev.attempted):.1f}%)",
        f"   Avg turns (correct): {ev.avg_turns_correct:.2f} turns",
        f"   Reward: avg {ev.avg_reward:.3f}  median {ev.median_reward:.3f}  std {ev.std_reward:.3f}  "
        f"min {ev.min_reward:.3f}  max {ev.max_reward:.3f}",
    ]
    fast = "  ".join(f"fast_{p}: {v:.3f}" for p, v in ev.fast_p.items())
    passes = "  ".join(f"pass@{kk}: {v:.3f}" for kk, v in ev.pass_at_k.items())
    lines += [f"   {rates}" for rates in (fast, passes) if rates]
    lines.append(f"   Beat rate (correct and faster than baseline): {100.0 * summary_value(ev, 'beat_rate'):.1f}%")
    missing = summary_value(ev, "missing", 0)
    if missing:
        lines.append(f"   Missing (parked or timed out, not scored): {missing}")
    if saved_to or samples_to:
        lines.append("")
    if saved_to:
        lines.append(f"Eval stats saved to: {saved_to}")
    if samples_to:
        lines.append(f"Eval samples saved to: {samples_to}")
    return "\n".join(lines)


def summary_line(subject: str, msg: m.Message) -> str:
    """One line for ``kernelrl tap``."""
    name = type(msg).__name__
    match msg:
        case m.TurnEvent():
            body = format_turn_line(msg)
        case m.TrajectoryEvent():
            body = (
                f"{msg.instance_id} turns={msg.num_turns} return={msg.aggregated_return:.3f} "
                f"final_correct={msg.execution_details.final_correctness} reason={msg.termination_reason}"
            )
        case m.EvalRequest():
            size = len(msg.candidate_source)
            body = f"{msg.eval_id} {msg.problem_id} turn={msg.turn_idx} from={msg.generator_id} ({size} B)"
        case m.EvalResult():
            body = (
                f"{msg.eval_id} {msg.problem_id} compiled={msg.compiled} correct={msg.correctness} "
                f"speedup={msg.speedup:.2f} error={msg.error_kind or '-'}"
            )
        case m.RolloutRequest():
            body = f"{msg.problem_id} group={msg.group_id} sample={msg.sample_idx}/{msg.n_samples}"
        case m.StepSummary():
            body = f"step={msg.step} loss={msg.loss:.4f} policy=v{msg.policy_version}"
        case m.EvalSummary():
            body = f"step={msg.step} accuracy={msg.accuracy:.3f} ({msg.correct_answers}/{msg.total_samples})"
        case m.TrainBatch():
            body = f"step={msg.step} samples={len(msg.samples)}"
        case m.PolicyUpdate():
            body = f"v{msg.version} {msg.path}"
        case m.Heartbeat():
            body = f"{msg.role} {msg.actor_id} {msg.state}"
        case m.WorkParked():
            body = f"{msg.message_type} {msg.message_id} from {msg.consumer} after {msg.deliveries} deliveries"
        case _:
            body = ""
    return f"{subject} {name} {body}"
