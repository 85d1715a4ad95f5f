"""Weights & Biases logging, optional: the seed notes' step and eval metrics and the ``full_trajectories`` table.

``wandb`` is not a dependency (extra ``kernelrl[wandb]``); it is imported only when a sink is made, and asking for
W&B without it raises ``WandbMissing`` with a one-line message naming ``pip install wandb``. Offline mode
(``WANDB_MODE=offline``, ``WANDB_DIR``) needs no network: the run lands in ``$WANDB_DIR/wandb/offline-run-*``.

Metrics: ``train/*`` from each ``StepSummary`` against ``train/step`` (``train/loss``, ``train/groups_kept``,
``train/groups_filtered``, ``train/num_early_exit``, ``train/reward_mean`` ...), ``eval/*`` from each
``EvalSummary`` against ``eval/step`` (``eval/accuracy``, ``eval/fast_1.0``, ``eval/pass@1``, ``eval/beat_rate``
...), so an evaluation filed under an earlier step never collides with W&B's own step counter. The
``full_trajectories`` table: one row per trajectory — step, sample, problem, the whole conversation formatted as
in the seed note, every turn's prompt, response, kernel, eval result and reward (``turn_<t>_*`` columns up to
``max_turns``), the reward breakdown and the totals.

The row and metric builders are pure (tested without wandb); ``WandbSink`` is the only part that touches wandb.
``WandbSink.observe`` is what the logger calls with every event it writes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig
from kernelrl.core.subjects import EVAL_GROUP_PREFIX

INSTALL_HINT = "W&B logging needs the wandb package, which is not installed: pip install wandb (or pip install 'kernelrl[wandb]')"
TABLE = "full_trajectories"
ROLE_ICONS = {"system": "⚙️ SYSTEM", "user": "👤 USER", "assistant": "🤖 ASSISTANT"}
TURN_FIELDS = ("prompt", "response", "kernel", "eval", "reward")


class WandbMissing(RuntimeError):
    """W&B was asked for and ``wandb`` cannot be imported."""


def import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise WandbMissing(INSTALL_HINT) from None


# ---------------------------------------------------------------- metrics


def step_metrics(ev: m.StepSummary) -> dict[str, float]:
    g = ev.groups
    return {
        "train/step": ev.step,
        "train/policy_version": ev.policy_version,
        "train/loss": ev.loss,
        "train/grad_norm": ev.grad_norm,
        "train/learning_rate": ev.learning_rate,
        "train/tokens_trained": ev.tokens_trained,
        "train/clip_fraction": ev.clip_fraction,
        "train/kl": ev.kl,
        "train/total_groups": g.total_groups,
        "train/groups_kept": g.groups_kept,
        "train/groups_filtered": g.groups_filtered,
        "train/num_early_exit": g.num_early_exit,
        "train/num_rollouts": g.num_rollouts,
        "train/reward_mean": g.reward_mean,
        "train/rollout_time_s": g.rollout_time_s,
        "train/training_time_s": g.training_time_s,
        "train/total_tokens": g.total_tokens,
        "train/trainable_tokens": g.trainable_tokens,
        "train/stale_dropped": g.stale_dropped,
        "train/policy_lag_mean": g.policy_lag_mean,
    }


def eval_metrics(ev: m.EvalSummary) -> dict[str, float]:
    out: dict[str, float] = {
        "eval/step": ev.step,
        "eval/policy_version": ev.policy_version,
        "eval/accuracy": ev.accuracy,
        "eval/correct_answers": ev.correct_answers,
        "eval/total_samples": ev.total_samples,
        "eval/attempted_answer": ev.compiled,
        "eval/avg_reward": ev.avg_reward,
        "eval/median_reward": ev.median_reward,
        "eval/std_reward": ev.std_reward,
        "eval/min_reward": ev.min_reward,
        "eval/max_reward": ev.max_reward,
        "eval/avg_turns_correct": ev.avg_turns_correct,
        "eval/avg_speedup_correct": ev.avg_speedup_correct,
        "eval/eval_time": ev.eval_time,
    }
    out |= {f"eval/fast_{p}": v for p, v in ev.fast_p.items()}
    out |= {f"eval/pass@{k}": v for k, v in ev.pass_at_k.items()}
    out["eval/beat_rate"] = ev.beat_rate
    return out


# ---------------------------------------------------------------- the table


def format_conversation(messages: Sequence[m.ChatMessage]) -> str:
    """The seed note's rendering: a header per message, its content below."""
    return "\n\n".join(f"{ROLE_ICONS.get(c.role, c.role.upper())}:\n{c.content}" for c in messages)


def turn_prompts(messages: Sequence[m.ChatMessage]) -> list[list[m.ChatMessage]]:
    """What each turn added to the prompt: everything before its assistant message, since the previous one."""
    prompts, pending = [], []
    for c in messages:
        if c.role == "assistant":
            prompts.append(pending)
            pending = []
        else:
            pending.append(c)
    return prompts


def turn_responses(messages: Sequence[m.ChatMessage]) -> list[str]:
    return [c.content for c in messages if c.role == "assistant"]


def format_eval_result(r: m.EvalResult) -> str:
    mark = {True: "✓", False: "✗"}
    text = f"compiled {mark[r.compiled]} correct {mark[r.correctness]} speedup {r.speedup:.2f}x"
    if r.runtime >= 0:
        text += f" runtime {r.runtime:.3f}ms (baseline {r.baseline_runtime:.3f}ms)"
    if r.interpreter:
        text += " [interpreter timings]"
    if r.error_kind or r.error_message:
        text += f"\nerror[{r.error_kind or 'unknown'}]: {r.error_message.strip()}"
    return text


def reward_components(r: m.EvalResult, config: RewardConfig) -> dict[str, float]:
    """The score's terms (``core.reward``): compile, correct, speed."""
    speedup = r.speedup if (config.reward_interpreter_speedup or not r.interpreter) else 0.0
    speed = min(max(speedup - 1.0, 0.0), config.speedup_cap) if r.correctness else 0.0
    return {"compile": config.compile_weight * r.compiled, "correct": config.correct_weight * r.correctness, "speed": speed}


def format_rewards(ev: m.TrajectoryEvent, config: RewardConfig) -> str:
    lines = []
    for h in ev.history:
        c = reward_components(h.eval_result, config)
        lines.append(f"turn {h.turn_idx + 1}: {h.reward:.3f} (compile {c['compile']:.2f} + correct {c['correct']:.2f} + "
                     f"speed {c['speed']:.2f})")  # fmt: skip
    returns = ", ".join(f"{x:.3f}" for x in ev.turn_returns)
    lines.append(f"returns: [{returns}]  aggregated: {ev.aggregated_return:.3f}")
    return "\n".join(lines)


def table_columns(max_turns: int) -> list[str]:
    per_turn = [f"turn_{t + 1}_{name}" for t in range(max_turns) for name in TURN_FIELDS]
    return ["step", "sample", "problem", "trajectory_id", "policy_version", "full_trajectory", *per_turn, "rewards",
            "total_reward", "final_reward", "num_turns", "final_correct", "final_speedup", "termination"]  # fmt: skip


def trajectory_row(step: int, sample: int, ev: m.TrajectoryEvent, max_turns: int, config: RewardConfig | None = None
                   ) -> list[Any]:  # fmt: skip
    """One row of ``full_trajectories``, in ``table_columns(max_turns)`` order (turns past ``max_turns`` are in
    ``full_trajectory`` only; missing turns are empty)."""
    config = config or RewardConfig()
    prompts, responses = turn_prompts(ev.messages), turn_responses(ev.messages)
    cells: list[Any] = []
    for t in range(max_turns):
        h = ev.history[t] if t < len(ev.history) else None
        cells += [
            format_conversation(prompts[t]) if t < len(prompts) else "",
            responses[t] if t < len(responses) else "",
            h.kernel_code if h else "",
            format_eval_result(h.eval_result) if h else "",
            h.reward if h else None,
        ]
    d = ev.execution_details
    return [step, sample, ev.instance_id, ev.trajectory_id, ev.policy_version, format_conversation(ev.messages), *cells,
            format_rewards(ev, config), ev.aggregated_return, ev.final_reward, ev.num_turns, d.final_correctness,
            d.final_speedup, ev.termination_reason]  # fmt: skip


# ---------------------------------------------------------------- the sink


class WandbSink:
    """One W&B run. ``observe`` takes the run's events: trajectories are kept (at most ``samples_per_step`` per
    step) until their step's ``StepSummary``, which logs the ``train/*`` metrics and those trajectories as a
    ``full_trajectories`` table; an ``EvalSummary`` logs the ``eval/*`` metrics."""

    def __init__(
        self,
        project: str = "kernelrl",
        run_name: str = "",
        config: Mapping[str, Any] | None = None,
        max_turns: int = 3,
        samples_per_step: int = 8,
        reward: RewardConfig | None = None,
        directory: str | None = None,
        mode: str | None = None,
    ) -> None:
        self.wandb = import_wandb()
        self.max_turns = max_turns
        self.samples_per_step = samples_per_step
        self.reward = reward or RewardConfig()
        self._pending: list[m.TrajectoryEvent] = []
        self.run = self.wandb.init(project=project, name=run_name or None, config=dict(config or {}), dir=directory, mode=mode)
        for kind in ("train", "eval"):
            self.run.define_metric(f"{kind}/step")
            self.run.define_metric(f"{kind}/*", step_metric=f"{kind}/step")

    def table(self, rows: Sequence[tuple[int, m.TrajectoryEvent]]) -> Any:
        columns = table_columns(self.max_turns)
        data = [trajectory_row(step, i, ev, self.max_turns, self.reward) for i, (step, ev) in enumerate(rows)]
        return self.wandb.Table(columns=columns, data=data)

    def log_step(self, ev: m.StepSummary, trajectories: Sequence[m.TrajectoryEvent] = ()) -> None:
        data: dict[str, Any] = dict(step_metrics(ev))
        if trajectories:
            data[TABLE] = self.table([(ev.step, t) for t in trajectories])
        self.run.log(data)

    def log_eval(self, ev: m.EvalSummary, trajectories: Sequence[m.TrajectoryEvent] = ()) -> None:
        data: dict[str, Any] = dict(eval_metrics(ev))
        if trajectories:
            data[TABLE] = self.table([(ev.step, t) for t in trajectories])
        self.run.log(data)

    def observe(self, msg: m.Message) -> None:
        match msg:
            case m.TrajectoryEvent() if not msg.group_id.startswith(EVAL_GROUP_PREFIX):
                if len(self._pending) < self.samples_per_step:
                    self._pending.append(msg)
            case m.StepSummary():
                pending, self._pending = self._pending, []
                self.log_step(msg, pending)
            case m.EvalSummary():
                self.log_eval(msg)

    def finish(self) -> None:
        self.run.finish()
