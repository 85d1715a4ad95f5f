"""W&B logging: metric names and table rows (no wandb needed), the missing-wandb message, offline mode, and the
logger's W&B run (after its lock, resumed on restart)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import msgspec
import orjson
import pytest

from kernelrl.actors.gen_backend import Completion, Generation
from kernelrl.actors.generator import GeneratorActor, Turn
from kernelrl.actors.run_log import LogDirLock
from kernelrl.actors.wandb_log import (
    FROM_MESSAGES,
    INSTALL_HINT,
    NO_TURN_RECORD,
    TableSample,
    eval_metrics,
    step_metrics,
    table_columns,
    trajectory_row,
    turns_by_trajectory,
    wandb_run_id,
)
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import RewardConfig
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems
from kernelrl.core.prompts import turn_messages
from kernelrl.core.reward import result_score

from helpers import command_env, count_lines, kernelrl_cmd, wait_for


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


def generator_dialogue(verdicts: list[m.EvalResult], *, group_id: str = "group-1", step: int = 5, version: int = 2
                       ) -> tuple[list[m.TurnEvent], m.TrajectoryEvent]:  # fmt: skip
    """One dialogue's turn events and trajectory, made by the generator's own builders from core.prompts' prompts."""
    actor = SimpleNamespace(bus=SimpleNamespace(settings=SimpleNamespace(run="r1")), actor_id="generator-1")
    request = m.RolloutRequest(request_id=f"{group_id}-s0", run_id="r1", problem_id=RELU.id, group_id=group_id, sample_idx=0,
                               n_samples=1, step=step)  # fmt: skip
    history: list[m.HistoryEntry] = []
    turns: list[Turn] = []
    for idx, verdict in enumerate(verdicts):
        code = f"# kernel of turn {idx + 1}"
        completion = Completion(text=f"Response {idx + 1}\n```python\n{code}\n```", token_ids=[7], logprobs=[-0.5])
        generation = Generation(prompt_token_ids=[1, 2], completions=[completion], policy_version=version)
        turn = Turn(idx=idx, messages=turn_messages(RELU.source, history), generation=generation, code=code, result=verdict,
                    score=result_score(verdict, RewardConfig()), policy_version=version, timings={})  # fmt: skip
        turns.append(turn)
        history.append(m.HistoryEntry(turn_idx=idx, kernel_code=code, eval_result=verdict, reward=turn.score))
    events = [GeneratorActor.turn_event(actor, request, 1, t) for t in turns]  # type: ignore[arg-type]
    return events, GeneratorActor.trajectory_event(actor, request, turns, "max_turns", 1.0, 0.4)  # type: ignore[arg-type]


RELU = builtin_problems().get("level1/1_ReLU")
MISMATCH = verdict(True, False, error="max_abs_error 0.87 on trial 2")
TURNS, DIALOGUE = generator_dialogue([MISMATCH, verdict(True, True, 2.5)])


def test_a_row_has_every_turns_prompt_response_kernel_verdict_and_reward() -> None:
    row = dict(zip(table_columns(3), trajectory_row(0, DIALOGUE, 3, turns=turns_by_trajectory(TURNS)["group-1-s0"]),
                   strict=True))  # fmt: skip
    assert (row["problem"], row["num_turns"], row["termination"]) == (RELU.id, 2, "max_turns")
    assert row["turn_1_response"] == "Response 1\n```python\n# kernel of turn 1\n```"
    assert row["turn_2_response"].startswith("Response 2")
    assert "Your earlier attempts" not in row["turn_1_prompt"] and row["turn_1_prompt"].startswith("⚙️ SYSTEM:")
    assert "### Attempt 1\n```python\n# kernel of turn 1" in row["turn_2_prompt"]  # turn 1's feedback
    assert "Error (max_abs_error 0.87 on trial 2)" in row["turn_2_prompt"]
    assert [row[f"turn_{t}_kernel"] for t in (1, 2)] == ["# kernel of turn 1", "# kernel of turn 2"]
    assert "correct ✗" in row["turn_1_eval"] and "correct ✓ speedup 2.50x" in row["turn_2_eval"]
    assert (row["turn_3_prompt"], row["turn_3_response"], row["turn_3_reward"]) == ("", "", None)
    assert "🤖 ASSISTANT:\nResponse 2" in row["full_trajectory"]


def test_without_turn_records_a_row_says_what_the_trajectory_messages_cannot_tell() -> None:
    row = dict(zip(table_columns(3), trajectory_row(0, DIALOGUE, 3), strict=True))
    assert row["turn_1_prompt"] == row["turn_1_response"] == NO_TURN_RECORD  # not turn 2's, which is all messages hold
    assert row["turn_2_prompt"].startswith(FROM_MESSAGES) and "### Attempt 1" in row["turn_2_prompt"]
    assert row["turn_2_response"].startswith("Response 2")
    stale = turns_by_trajectory(generator_dialogue([MISMATCH, MISMATCH])[0])["group-1-s0"]  # another attempt's turns
    stale = {t: msgspec.structs.replace(x, kernel_code="# another kernel") for t, x in stale.items()}
    row = dict(zip(table_columns(3), trajectory_row(0, DIALOGUE, 3, turns=stale), strict=True))
    assert row["turn_1_prompt"] == NO_TURN_RECORD


def test_each_reward_component_has_a_column_per_turn() -> None:
    row = dict(zip(table_columns(3), trajectory_row(9, TRAJECTORY, max_turns=3), strict=True))
    assert [row[f"turn_2_reward_{c}"] for c in ("compile", "correct", "speed")] == pytest.approx([0.1, 0.3, 1.5])
    assert [row[f"turn_1_reward_{c}"] for c in ("compile", "correct", "speed")] == pytest.approx([0.1, 0.0, 0.0])
    assert row["turn_3_reward_speed"] is None
    assert (row["turn_1_reward"], row["turn_2_reward"]) == (0.1, 1.9)
    assert row["total_reward"] == pytest.approx(0.86) and row["final_correct"] is True and row["final_speedup"] == 2.5
    assert "turn 2: 1.900 (compile 0.10 + correct 0.30 + speed 1.50)" in row["rewards"]


def test_a_row_is_filed_under_the_step_whose_policy_sampled_it() -> None:
    row = dict(zip(table_columns(3), trajectory_row(0, DIALOGUE, 3), strict=True))
    assert (row["step"], row["policy_version"], row["request_step"]) == (2, 2, 5)


def test_the_table_keeps_the_turns_of_the_first_dialogues_after_each_step_only() -> None:
    sample = TableSample(per_step=2, capacity=3)
    dialogues = [generator_dialogue([MISMATCH, MISMATCH], group_id=f"g{i}")[0] for i in range(6)]
    for turns in dialogues[:3]:  # g0 and g1 are chosen; g2 started after the step's two
        for ev in turns:
            sample.turn(ev)
    assert sorted(sample.finished("g1-s0") or {}) == [0, 1] and sample.finished("g1-s0") is None
    assert sample.finished("g2-s0") is None and len(sample) == 1  # g0 still running
    sample.next_step()
    for turns in dialogues[3:]:  # g3 and g4 chosen; g0 (never finished) is dropped past 3 waiting
        for ev in turns:
            sample.turn(ev)
    sample.next_step()
    for ev in generator_dialogue([MISMATCH], group_id="g6")[0]:
        sample.turn(ev)
    assert len(sample) == 3 and sample.finished("g0-s0") is None
    assert [sorted(sample.finished(t) or {}) for t in ("g3-s0", "g4-s0", "g5-s0", "g6-s0")] == [[0, 1], [0, 1], [], [0]]


def test_the_table_chooses_dialogues_at_their_first_turn_whatever_is_in_flight() -> None:
    sample = TableSample(per_step=2)
    turns = {g: generator_dialogue([MISMATCH, MISMATCH], group_id=g)[0] for g in "abcde"}
    for g in "abcd":  # four dialogues start: a and b are this step's two
        sample.turn(turns[g][0])
    sample.next_step()
    for ev in (turns["c"][1], turns["d"][1], turns["e"][0], turns["e"][1]):  # c and d started before: never half-kept
        sample.turn(ev)
    assert [sorted(sample.finished(f"{g}-s0") or {}) for g in "abcde"] == [[0], [0], [], [], [0, 1]]
    retried = generator_dialogue([MISMATCH, MISMATCH], group_id="f")[0]
    sample.turn(retried[0])
    sample.turn(retried[1])
    sample.turn(msgspec.structs.replace(retried[0], event_id="f-again"))  # the request is run again from turn 0
    assert sorted(sample.finished("f-s0") or {}) == [0]


def test_the_wandb_run_id_is_kept_with_the_logs_and_new_for_new_logs(tmp_path: Path) -> None:
    first, again, reused = tmp_path / "runs" / "a" / "logs", tmp_path / "runs" / "a" / "logs", tmp_path / "again" / "logs"
    for d in (first, reused):
        d.mkdir(parents=True)
    made = wandb_run_id("exp/1:b", first)
    assert wandb_run_id("exp/1:b", again) == made  # a restarted logger resumes its W&B run
    assert (first / "wandb_run_id").read_text().strip() == made
    assert wandb_run_id("exp/1:b", reused) != made  # a new run under an old run's name gets a W&B run of its own
    assert made.startswith("kernelrl-exp-1-b-") and not set(":;,#?/'") & set(made)


def test_asking_for_wandb_without_it_is_one_line_and_exit_2(tmp_path: Path) -> None:
    hide_wandb = (
        "import sys; sys.modules['wandb'] = None; from kernelrl.bin.eval_policy import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", hide_wandb, "--runs-root", str(tmp_path / "runs"), "--wandb"],
                          cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"kernelrl eval: {INSTALL_HINT}"]


def offline_wandb(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")


def table_rows(run_dir: Path) -> list[list[dict[str, object]]]:
    """Every ``full_trajectories`` table of an offline run, in logging order, as rows of column → cell."""
    files = sorted((run_dir / "files" / "media" / "table").glob("full_trajectories_*.table.json"),
                   key=lambda f: int(f.name.split("_")[2]))  # fmt: skip
    tables = [orjson.loads(f.read_bytes()) for f in files]
    return [[dict(zip(t["columns"], row, strict=True)) for row in t["data"]] for t in tables]


def test_offline_wandb_writes_a_run_with_the_full_trajectories_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelrl.actors.wandb_log import WandbSink  # wandb is in the dev extra: `make test` installs it

    offline_wandb(monkeypatch, tmp_path)
    eval_turns, eval_dialogue = generator_dialogue([MISMATCH, verdict(True, True, 1.5)], group_id="eval-0003-ab-p0", step=3)
    sink = WandbSink(project="kernelrl-test", run_name="offline", config={"reward": {"gamma": 0.4}}, max_turns=3,
                     run_id="kernelrl-offline-test", resume="allow")  # fmt: skip
    try:
        for ev in [*eval_turns, *TURNS, DIALOGUE, eval_dialogue]:  # evaluation rollouts are not tabled with a step
            sink.observe(ev)
        sink.observe(m.StepSummary(event_id="s", step=7, loss=0.5, groups=m.GroupSummary(groups_kept=1)))
        summary = m.EvalSummary(event_id="e", step=3, accuracy=1.0, correct_answers=1, total_samples=1)
        sink.log_eval(summary, [eval_dialogue], eval_turns)
    finally:
        sink.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-kernelrl-offline-test")
    assert list(run_dir.glob("run-*.wandb"))
    (train_row,), (eval_row,) = table_rows(run_dir)
    assert list(train_row) == table_columns(3)
    assert (train_row["step"], train_row["request_step"], train_row["problem"]) == (2, 5, RELU.id)
    assert train_row["turn_1_response"].startswith("Response 1") and train_row["turn_2_kernel"] == "# kernel of turn 2"
    assert "### Attempt 1" in train_row["turn_2_prompt"] and train_row["turn_2_reward_speed"] == pytest.approx(1.5)
    assert eval_row["trajectory_id"] == "eval-0003-ab-p0-s0" and eval_row["turn_1_response"].startswith("Response 1")
    assert "Error (max_abs_error 0.87 on trial 2)" in eval_row["turn_2_prompt"]


def test_asking_the_logger_for_wandb_without_it_is_one_line_and_exit_2(tmp_path: Path) -> None:
    hide_wandb = "import sys; sys.modules['wandb'] = None; from kernelrl.bin.logger import main; sys.exit(main(sys.argv[1:]))"
    argv = ["--nats", "nats://127.0.0.1:1", "--run", "r1", "--log-dir", str(tmp_path / "logs"), "--wandb"]
    done = subprocess.run([sys.executable, "-c", hide_wandb, *argv], cwd=tmp_path, env=command_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"kernelrl logger: {INSTALL_HINT}"]


def test_a_logger_refused_its_log_directory_opens_no_wandb_run(tmp_path: Path, nats_server: EmbeddedNatsServer) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    lock = LogDirLock(log_dir)  # another logger holds the directory
    try:
        env = command_env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
        argv = kernelrl_cmd("logger", "--nats", nats_server.url, "--run", "r1", "--log-dir", str(log_dir), "--wandb")
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    finally:
        lock.release()
    assert done.returncode == 2 and "kernelrl logger:" in done.stderr
    assert not (tmp_path / "wandb").exists()


async def test_the_logger_tables_turns_in_wandb_and_a_restarted_logger_continues_the_same_run(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    offline_wandb(monkeypatch, tmp_path)
    log_dir = tmp_path / "logs"
    argv = ["logger", "--nats", nats_server.url, "--run", run_id, "--log-dir", str(log_dir), "--wandb"]
    await bus.publish_many([(bus.subjects.event_turn, t) for t in TURNS] + [(bus.subjects.event_trajectory, DIALOGUE)])
    for step in (1, 2):
        await bus.publish(bus.subjects.event_step, m.StepSummary(event_id=f"step-{step}", step=step, loss=0.5))
        logger = spawn(*argv, stdout=subprocess.DEVNULL)
        await wait_for(lambda n=step: count_lines(log_dir / "steps.jsonl") == n, 60, f"step {step} logged")
        logger.send_signal(signal.SIGTERM)
        assert logger.wait(timeout=30) == 0
    first, second = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert first.name.endswith(wandb_run_id(run_id, log_dir)) and second.name.endswith(wandb_run_id(run_id, log_dir))
    ((row,),) = table_rows(first)
    assert (row["step"], row["turn_1_response"]) == (2, TURNS[0].turn_data.response)
    assert "### Attempt 1" in row["turn_2_prompt"]


async def test_a_logger_whose_wandb_fails_to_start_still_writes_its_logs(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # wandb.init refuses it, as it would an unreachable server
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    log_dir = tmp_path / "logs"
    await bus.publish_many([(bus.subjects.event_turn, t) for t in TURNS])
    logger = spawn("logger", "--nats", nats_server.url, "--run", run_id, "--log-dir", str(log_dir), "--wandb")
    await wait_for(lambda: count_lines(log_dir / "turns.jsonl") == len(TURNS), 60, "the turns logged")
    logger.send_signal(signal.SIGTERM)
    out, _ = logger.communicate(timeout=30)
    assert logger.returncode == 0
    assert "kernelrl logger: W&B did not start (" in out and "logging to files only" in out
