"""W&B logging: metric names and table rows (no wandb needed), the missing-wandb message, and offline mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from kernelrl.actors.wandb_log import INSTALL_HINT, eval_metrics, step_metrics, table_columns, trajectory_row, turn_prompts
from kernelrl.core import messages as m

from helpers import command_env


def verdict(compiled: bool, correct: bool, speedup: float = 0.0, error: str = "") -> m.EvalResult:
    return m.EvalResult(compiled=compiled, correctness=correct, speedup=speedup, error_kind=error, error_message=error)


TRAJECTORY = m.TrajectoryEvent(
    event_id="t1", timestamp="20250101_000000_000000", instance_id="level1/1_ReLU", final_reward=1.9, num_turns=2,
    turn_rewards=[0.1, 1.9], aggregated_return=0.1 + 0.4 * 1.9, turn_returns=[0.1 + 0.4 * 1.9, 1.9],
    history=[m.HistoryEntry(turn_idx=0, kernel_code="K1", eval_result=verdict(True, False, error="mismatch"), reward=0.1),
             m.HistoryEntry(turn_idx=1, kernel_code="K2", eval_result=verdict(True, True, 2.5), reward=1.9)],
    messages=[m.ChatMessage("system", "S"), m.ChatMessage("user", "P"), m.ChatMessage("assistant", "R1"),
              m.ChatMessage("user", "F1"), m.ChatMessage("assistant", "R2")],
    execution_details=m.ExecutionDetails(final_compiled=True, final_correctness=True, final_speedup=2.5),
    termination_reason="success", trajectory_id="traj-1", policy_version=2,
)  # fmt: skip


def test_step_and_eval_metrics_carry_the_seed_names() -> None:
    step = m.StepSummary(event_id="s", step=4, loss=0.25, groups=m.GroupSummary(total_groups=8, groups_kept=6,
                         groups_filtered=2, num_early_exit=18, reward_mean=0.41))  # fmt: skip
    got = step_metrics(step)
    assert {k: got[k] for k in ("train/step", "train/groups_kept", "train/groups_filtered", "train/num_early_exit",
                                "train/loss", "train/reward_mean")} == {"train/step": 4, "train/groups_kept": 6,
            "train/groups_filtered": 2, "train/num_early_exit": 18, "train/loss": 0.25, "train/reward_mean": 0.41}  # fmt: skip
    ev = m.EvalSummary(event_id="e", step=4, accuracy=0.5, correct_answers=1, total_samples=2, compiled=2,
                       fast_p={"0.0": 0.5, "1.0": 0.5}, pass_at_k={"1": 0.5, "2": 1.0}, beat_rate=0.5)  # fmt: skip
    got = eval_metrics(ev)
    assert {k: got[k] for k in ("eval/step", "eval/accuracy", "eval/attempted_answer", "eval/fast_1.0", "eval/pass@2",
                                "eval/beat_rate")} == {"eval/step": 4, "eval/accuracy": 0.5, "eval/attempted_answer": 2,
            "eval/fast_1.0": 0.5, "eval/pass@2": 1.0, "eval/beat_rate": 0.5}  # fmt: skip


def test_a_row_has_every_turns_prompt_response_kernel_verdict_and_reward() -> None:
    assert turn_prompts(TRAJECTORY.messages) == [[m.ChatMessage("system", "S"), m.ChatMessage("user", "P")],
                                                 [m.ChatMessage("user", "F1")]]  # fmt: skip
    row = dict(zip(table_columns(3), trajectory_row(9, 0, TRAJECTORY, max_turns=3), strict=True))
    assert (row["step"], row["sample"], row["problem"], row["num_turns"], row["termination"]) == (9, 0, "level1/1_ReLU", 2,
                                                                                               "success")  # fmt: skip
    assert row["turn_1_prompt"] == "⚙️ SYSTEM:\nS\n\n👤 USER:\nP" and row["turn_2_prompt"] == "👤 USER:\nF1"
    assert [row[f"turn_{t}_{f}"] for t in (1, 2) for f in ("response", "kernel")] == ["R1", "K1", "R2", "K2"]
    assert "correct ✗" in row["turn_1_eval"] and "error[mismatch]" in row["turn_1_eval"]
    assert "correct ✓ speedup 2.50x" in row["turn_2_eval"]
    assert (row["turn_1_reward"], row["turn_2_reward"], row["turn_3_reward"], row["turn_3_response"]) == (0.1, 1.9, None, "")
    assert row["total_reward"] == pytest.approx(0.86) and row["final_correct"] is True and row["final_speedup"] == 2.5
    assert "turn 2: 1.900 (compile 0.10 + correct 0.30 + speed 1.50)" in row["rewards"]
    assert "🤖 ASSISTANT:\nR2" in row["full_trajectory"]


def test_asking_for_wandb_without_it_is_one_line_and_exit_2(tmp_path: Path) -> None:
    hide_wandb = (
        "import sys; sys.modules['wandb'] = None; from kernelrl.bin.eval_policy import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", hide_wandb, "--runs-root", str(tmp_path / "runs"), "--wandb"],
                          cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"kernelrl eval: {INSTALL_HINT}"]


def test_offline_wandb_writes_a_run_with_the_full_trajectories_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelrl.actors.wandb_log import WandbSink  # wandb is in the dev extra: `make test` installs it

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(project="kernelrl-test", run_name="offline", config={"reward": {"gamma": 0.4}}, max_turns=3)
    try:
        sink.observe(TRAJECTORY)
        sink.observe(m.StepSummary(event_id="s", step=1, loss=0.5, groups=m.GroupSummary(groups_kept=1)))
        sink.observe(m.EvalSummary(event_id="e", step=1, accuracy=1.0, correct_answers=1, total_samples=1))
    finally:
        sink.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))
    (table,) = (run_dir / "files" / "media" / "table").glob("full_trajectories_*.table.json")
    data = orjson.loads(table.read_bytes())
    assert data["columns"] == table_columns(3)
    (row,) = data["data"]
    assert row[:3] == [1, 0, "level1/1_ReLU"] and row[data["columns"].index("turn_2_kernel")] == "K2"
