"""Weights & Biases logging, optional: the seed notes' step and eval metrics and the ``full_trajectories`` table.

``wandb`` is not a dependency (extra ``kernelrl[wandb]``); it is imported only when a sink is made, and asking for
W&B without it raises ``WandbMissing`` with a one-line message naming ``pip install wandb``. Offline mode
(``WANDB_MODE=offline``, ``WANDB_DIR``) needs no network: the run lands in ``$WANDB_DIR/wandb/offline-run-*``.

Metrics: ``train/*`` from each ``StepSummary`` against ``train/step`` (``train/loss``, ``train/groups_kept``,
``train/groups_filtered``, ``train/num_early_exit``, ``train/reward_mean`` ...), ``eval/*`` from each
``EvalSummary`` against ``eval/step`` (``eval/accuracy``, ``eval/fast_1.0``, ``eval/pass@1``, ``eval/beat_rate``
...), so an evaluation filed under an earlier step never collides with W&B's own step counter.

The ``full_trajectories`` table: one row per trajectory — ``step``, sample, problem, the whole conversation
formatted as in the seed note, every turn's prompt, response, kernel, eval result, reward and reward components
(``turn_<t>_*`` columns up to ``max_turns``: ``_reward_compile``, ``_reward_correct``, ``_reward_speed``), the
reward breakdown and the totals.

- ``step`` is the training step whose policy sampled the trajectory: its ``policy_version`` (version v is the
  weights after step v; 0 is the initial model), not the step of the summary the row is logged with.
  ``request_step`` beside it is the step its rollout request was issued for (the buffer's round, an eval's step).
- A turn's prompt and response come from its ``TurnEvent``: a trajectory's ``messages`` hold only its last turn
  (that turn's prompt already quotes every earlier attempt). Where a turn's record is missing the cells fall back
  to those messages and say so.

The row and metric builders are pure (tested without wandb); ``WandbSink`` is the only part that touches wandb.
``WandbSink.observe`` is what the logger calls with every event it writes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig
from kernelrl.core.subjects import is_eval_group

INSTALL_HINT = "W&B logging needs the wandb package, which is not installed: pip install wandb (or pip install 'kernelrl[wandb]')"
TABLE = "full_trajectories"
ROLE_ICONS = {"system": "⚙️ SYSTEM", "user": "👤 USER", "assistant": "🤖 ASSISTANT"}
TURN_FIELDS = ("prompt", "response", "kernel", "eval", "reward", "reward_compile", "reward_correct", "reward_speed")
CHOSEN_CAPACITY = 256  # chosen dialogues not finished yet (a killed generator's never finish); the oldest dropped
FROM_MESSAGES = "(no turn record: from the trajectory's messages)"
NO_TURN_RECORD = "(no turn record reached the logger; the trajectory's messages hold only its last turn)"


class WandbMissing(RuntimeError):
    """W&B was asked for and ``wandb`` cannot be imported."""


def import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise WandbMissing(INSTALL_HINT) from None


WANDB_ID_FILE = "wandb_run_id"  # in the log directory: the W&B run of these logs


def wandb_run_id(run_id: str, log_dir: Path) -> str:
    """The W&B run id of the run whose logs are in ``log_dir``: made once (the run id, made safe for W&B, and a
    random suffix, so a new run reusing an old run's name gets a W&B run of its own) and kept in
    ``log_dir/wandb_run_id``, so a restarted logger resumes the same W&B run."""
    path = log_dir / WANDB_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        if kept := path.read_text().strip():
            return kept
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", run_id)[:48]
    made = f"kernelrl-{safe}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{WANDB_ID_FILE}.{os.getpid()}")
    tmp.write_text(made + "\n")
    os.replace(tmp, path)
    return made


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
        "eval/attempted_answer": ev.attempted,
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


class TurnText(msgspec.Struct, frozen=True):
    """What the table shows of one turn's ``TurnEvent`` (its kernel tells it from another attempt's turn)."""

    prompt: list[m.ChatMessage]
    response: str
    kernel_code: str


def turn_text(ev: m.TurnEvent) -> TurnText:
    return TurnText(ev.turn_data.prompt, ev.turn_data.response, ev.turn_data.kernel_code)


def turns_by_trajectory(turns: Iterable[m.TurnEvent]) -> dict[str, dict[int, TurnText]]:
    out: dict[str, dict[int, TurnText]] = {}
    for ev in turns:
        out.setdefault(ev.trajectory_id, {})[ev.turn_idx] = turn_text(ev)
    return out


class TableSample:
    """The dialogues the table shows: the first ``per_step`` whose first turn arrives after a step's summary, chosen
    then so that only their turns are kept. Memory is a few dialogues' text however many are in flight (keeping
    every unfinished dialogue's turns would hold thousands on a cluster, and dropping some would drop the ones the
    table needs). At most ``capacity`` chosen dialogues wait for their trajectory; past it the oldest is dropped."""

    def __init__(self, per_step: int, capacity: int = CHOSEN_CAPACITY) -> None:
        self.per_step = per_step
        self.capacity = capacity
        self._chosen_this_step = 0
        self._turns: OrderedDict[str, dict[int, TurnText]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._turns)

    def turn(self, ev: m.TurnEvent) -> None:
        if not ev.trajectory_id:
            return
        turns = self._turns.get(ev.trajectory_id)
        if ev.turn_idx == 0:  # a dialogue starts (or starts over: a retried request keeps its id)
            if turns is None:
                if self._chosen_this_step >= self.per_step:
                    return
                self._chosen_this_step += 1
                while len(self._turns) >= self.capacity:
                    self._turns.popitem(last=False)
            turns = self._turns[ev.trajectory_id] = {}
        elif turns is None:  # a dialogue that started before it could be chosen
            return
        turns[ev.turn_idx] = turn_text(ev)

    def finished(self, trajectory_id: str) -> dict[int, TurnText] | None:
        """A chosen dialogue's turns, forgotten here (its ``TrajectoryEvent`` has come); None if it was not chosen."""
        return self._turns.pop(trajectory_id, None)

    def next_step(self) -> None:
        self._chosen_this_step = 0


def turn_prompts(messages: Sequence[m.ChatMessage]) -> list[list[m.ChatMessage]]:
    """What each assistant message answered: everything before it, since the previous one."""
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


def message_turns(ev: m.TrajectoryEvent) -> dict[int, tuple[list[m.ChatMessage], str]]:
    """turn → (prompt, response) as far as ``messages`` tell, aligned on the last turn: the generator's messages are
    the last turn's prompt and response; a chat of alternating turns is split at its assistant messages."""
    prompts, responses = turn_prompts(ev.messages), turn_responses(ev.messages)
    first = ev.num_turns - len(responses)
    return {first + i: pr for i, pr in enumerate(zip(prompts, responses, strict=True)) if first + i >= 0}


def turn_prompt_response(ev: m.TrajectoryEvent, t: int, turns: Mapping[int, TurnText]) -> tuple[str, str]:
    """The prompt and response cells of turn ``t``: from its turn record, else from the trajectory's messages."""
    if t >= ev.num_turns:
        return "", ""
    record = turns.get(t)
    kernel = ev.history[t].kernel_code if t < len(ev.history) else None
    if record is not None and kernel in (None, record.kernel_code):
        return format_conversation(record.prompt), record.response
    prompt_response = message_turns(ev).get(t)
    if prompt_response is None:
        return NO_TURN_RECORD, NO_TURN_RECORD
    prompt, response = prompt_response
    return f"{FROM_MESSAGES}\n\n{format_conversation(prompt)}", response


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
    return ["step", "sample", "problem", "trajectory_id", "policy_version", "request_step", "full_trajectory", *per_turn,
            "rewards", "total_reward", "final_reward", "num_turns", "final_correct", "final_speedup", "termination"]  # fmt: skip


def turn_cells(ev: m.TrajectoryEvent, t: int, turns: Mapping[int, TurnText], config: RewardConfig) -> list[Any]:
    prompt, response = turn_prompt_response(ev, t, turns)
    h = ev.history[t] if t < len(ev.history) else None
    if h is None:
        return [prompt, response, "", "", None, None, None, None]
    c = reward_components(h.eval_result, config)
    return [prompt, response, h.kernel_code, format_eval_result(h.eval_result), h.reward, c["compile"], c["correct"],
            c["speed"]]  # fmt: skip


def trajectory_row(sample: int, ev: m.TrajectoryEvent, max_turns: int, config: RewardConfig | None = None,
                   turns: Mapping[int, TurnText] | None = None) -> list[Any]:  # fmt: skip
    """One row of ``full_trajectories``, in ``table_columns(max_turns)`` order (turns past ``max_turns`` are in
    ``full_trajectory`` only; missing turns are empty). ``step`` is the policy version that sampled the trajectory,
    ``sample`` its index in the table; ``turns``: its turn records, by turn index."""
    config = config or RewardConfig()
    cells = [cell for t in range(max_turns) for cell in turn_cells(ev, t, turns or {}, config)]
    d = ev.execution_details
    return [ev.policy_version, sample, ev.instance_id, ev.trajectory_id, ev.policy_version, ev.extra_info.get("step"),
            format_conversation(ev.messages), *cells, format_rewards(ev, config), ev.aggregated_return, ev.final_reward,
            ev.num_turns, d.final_correctness, d.final_speedup, ev.termination_reason]  # fmt: skip


# ---------------------------------------------------------------- the sink


class WandbSink:
    """One W&B run. ``observe`` takes the run's events: the turns of the dialogues chosen for the table
    (``TableSample``: ``samples_per_step`` a step) are kept until their trajectory comes, and those trajectories until
    the next ``StepSummary``, which logs the ``train/*`` metrics and them as a ``full_trajectories`` table; an
    ``EvalSummary`` logs the ``eval/*`` metrics. Evaluation rollouts are not tabled here (``kernelrl eval --wandb``
    tables its own). ``run_id`` with ``resume="allow"``: a restart continues the same W&B run."""

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
        run_id: str | None = None,
        resume: str | None = None,
        chosen_capacity: int = CHOSEN_CAPACITY,
    ) -> None:
        self.wandb = import_wandb()
        self.max_turns = max_turns
        self.samples_per_step = samples_per_step
        self.reward = reward or RewardConfig()
        self.sample = TableSample(samples_per_step, chosen_capacity)
        self._pending: list[tuple[m.TrajectoryEvent, dict[int, TurnText]]] = []
        self._finished = False
        self.run = self.wandb.init(project=project, name=run_name or None, config=dict(config or {}), dir=directory, mode=mode,
                                   id=run_id, resume=resume)  # fmt: skip
        for kind in ("train", "eval"):
            self.run.define_metric(f"{kind}/step")
            self.run.define_metric(f"{kind}/*", step_metric=f"{kind}/step")

    def table(self, rows: Sequence[tuple[m.TrajectoryEvent, Mapping[int, TurnText]]]) -> Any:
        """A ``full_trajectories`` table of these trajectories, each with its turn records."""
        data = [trajectory_row(i, ev, self.max_turns, self.reward, turns) for i, (ev, turns) in enumerate(rows)]
        return self.wandb.Table(columns=table_columns(self.max_turns), data=data)

    def log_step(self, ev: m.StepSummary, rows: Sequence[tuple[m.TrajectoryEvent, Mapping[int, TurnText]]] = ()) -> None:
        data: dict[str, Any] = dict(step_metrics(ev))
        if rows:
            data[TABLE] = self.table(rows)
        self.run.log(data)

    def log_eval(self, ev: m.EvalSummary, trajectories: Sequence[m.TrajectoryEvent] = (),
                 turns: Iterable[m.TurnEvent] = ()) -> None:  # fmt: skip
        data: dict[str, Any] = dict(eval_metrics(ev))
        if trajectories:
            by_id = turns_by_trajectory(turns)
            data[TABLE] = self.table([(t, by_id.get(t.trajectory_id, {})) for t in trajectories])
        self.run.log(data)

    def observe(self, msg: m.Message) -> None:
        match msg:
            case m.TurnEvent() if not is_eval_group(msg.group_id):
                self.sample.turn(msg)
            case m.TrajectoryEvent() if not is_eval_group(msg.group_id):
                turns = self.sample.finished(msg.trajectory_id)
                if not msg.trajectory_id:  # another producer's record: no turns to match, its messages only
                    turns = {}
                if turns is not None and len(self._pending) < self.samples_per_step:
                    self._pending.append((msg, turns))
            case m.StepSummary():
                pending, self._pending = self._pending, []
                self.sample.next_step()
                self.log_step(msg, pending)
            case m.EvalSummary():
                self.log_eval(msg)

    def finish(self) -> None:
        """End the run (again: nothing)."""
        if not self._finished:
            self._finished = True
            self.run.finish()
