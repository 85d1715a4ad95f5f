"""Policy evaluation: the summary's numbers against hand counts, and ``kernelrl eval`` end to end (replay backend)."""

from __future__ import annotations

import asyncio
import math
import subprocess
from pathlib import Path

import orjson
import pytest

from kernelrl.actors.console import format_eval_block
from kernelrl.actors.eval_policy import (
    eval_json_path,
    eval_requests,
    k_values,
    pass_at_k,
    samples_path,
    summarize,
)
from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig
from kernelrl.core.problems import builtin_problems

from helpers import command_env, kernelrl_cmd

RELU = builtin_problems().get("level1/1_ReLU")
CORRECT = RELU.solution or ""
WRONG = CORRECT.replace("y = tl.maximum(x, 0.0)", "y = tl.maximum(x, 1.0)")  # allowed code, wrong outputs


def trajectory(problem: str, sample: int, *, correct: bool, compiled: bool, speedup: float, turns: int, ret: float,
               version: int = 3) -> m.TrajectoryEvent:  # fmt: skip
    return m.TrajectoryEvent(
        event_id=f"t-{problem}-{sample}", timestamp="20250101_000000_000000", instance_id=problem, final_reward=ret,
        num_turns=turns, turn_rewards=[ret] * turns, aggregated_return=ret, sample_idx=sample, policy_version=version,
        execution_details=m.ExecutionDetails(final_compiled=compiled, final_correctness=correct, final_speedup=speedup),
    )  # fmt: skip


# problem A: 4 samples, 2 correct (2.5x in 1 turn, 0.8x in 2 turns); problem B: 2 samples, 1 correct (1.2x in 3 turns)
HAND = [
    trajectory("A", 0, correct=True, compiled=True, speedup=2.5, turns=1, ret=2.0),
    trajectory("A", 1, correct=True, compiled=True, speedup=0.8, turns=2, ret=0.56),
    trajectory("A", 2, correct=False, compiled=True, speedup=0.0, turns=3, ret=0.1),
    trajectory("A", 3, correct=False, compiled=False, speedup=0.0, turns=3, ret=0.0),
    trajectory("B", 0, correct=True, compiled=True, speedup=1.2, turns=3, ret=0.6),
    trajectory("B", 1, correct=False, compiled=True, speedup=0.0, turns=1, ret=0.1, version=4),
]


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 1) == 0.25 and pass_at_k(2, 1, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6] and k_values(16) == [1, 2, 4, 8, 16]


def test_the_summary_equals_hand_counts() -> None:
    s = summarize(HAND, step=12, samples_per_problem=4, eval_time=9.5, run_id="r1")
    assert (s.step, s.run_id, s.policy_version, s.eval_time) == (12, "r1", 4, 9.5)
    assert (s.correct_answers, s.total_samples, s.compiled, s.attempted_answer) == (3, 6, 5, 5)
    assert s.accuracy == 0.5
    assert s.avg_reward == pytest.approx(3.36 / 6)
    assert s.median_reward == pytest.approx((0.1 + 0.56) / 2)
    assert s.std_reward == pytest.approx(math.sqrt((1.44**2 + 0 + 0.46**2 + 0.56**2 + 0.04**2 + 0.46**2) / 6))
    assert (s.min_reward, s.max_reward) == (0.0, 2.0)
    # correct speedups 2.5, 0.8, 1.2 over 6 trajectories
    assert s.fast_p == pytest.approx({"0.0": 3 / 6, "1.0": 2 / 6, "1.5": 1 / 6, "2.0": 1 / 6})
    assert s.beat_rate == pytest.approx(2 / 6)
    assert s.avg_turns_correct == pytest.approx((1 + 2 + 3) / 3)
    assert s.avg_speedup_correct == pytest.approx((2.5 + 0.8 + 1.2) / 3)
    # A: n=4, c=2; B: n=2, c=1 (pass@4 only over A, the one problem with 4 samples)
    assert s.pass_at_k == pytest.approx({"1": 0.5, "2": ((1 - 1 / 6) + 1.0) / 2, "4": 1.0})
    assert s.extra["per_problem"] == {"A": {"samples": 4, "correct": 2}, "B": {"samples": 2, "correct": 1}}
    assert (s.extra["n_problems"], s.extra["samples_per_problem"]) == (2, 4)


def test_an_empty_evaluation_is_all_zeros_not_an_error() -> None:
    s = summarize([], step=0, samples_per_problem=2)
    assert (s.accuracy, s.total_samples, s.avg_reward, s.pass_at_k, s.beat_rate) == (0.0, 0, 0.0, {}, 0.0)


def test_the_console_block_follows_the_seed_note() -> None:
    s = summarize(HAND, step=12, samples_per_problem=4, eval_time=9.5)
    text = format_eval_block(s, "out/eval_logs/eval_step_0012.json", "out/eval_logs/eval_step_0012.samples.jsonl")
    lines = text.splitlines()
    assert lines[1:5] == ["Detailed Rubric Statistics:", "   Accuracy: 3/6 (50.0%)", "   Attempted answers: 5/6 (83.3%)",
                          "   Avg turns (correct): 2.00 turns"]  # fmt: skip
    assert "fast_1.0: 0.333" in text and "pass@2: 0.917" in text and "Beat rate (correct and faster than baseline): 33.3%" in text
    assert lines[-3:] == ["", "Eval stats saved to: out/eval_logs/eval_step_0012.json",
                          "Eval samples saved to: out/eval_logs/eval_step_0012.samples.jsonl"]  # fmt: skip


def test_eval_requests_are_one_eval_group_per_problem(tmp_path: Path) -> None:
    requests = eval_requests("r1", ["A", "B"], 3, RewardConfig(max_turns=2), step=5)
    assert [(r.problem_id, r.sample_idx, r.n_samples, r.max_turns, r.step) for r in requests] == [
        (p, i, 3, 2, 5) for p in ("A", "B") for i in range(3)
    ]
    assert len({r.group_id for r in requests}) == 2 and all(r.group_id.startswith("eval-0005-") for r in requests)
    assert len({r.request_id for r in requests}) == 6
    first = eval_json_path(tmp_path, 5, "ev-a")
    assert first == tmp_path / "eval_logs" / "eval_step_0005.json"
    assert samples_path(first).name == "eval_step_0005.samples.jsonl"
    first.parent.mkdir()
    first.write_bytes(orjson.dumps({"event_id": "ev-a"}))
    assert eval_json_path(tmp_path, 5, "ev-a") == first  # the same summary: the same file
    assert eval_json_path(tmp_path, 5, "ev-b").name == "eval_step_0005.ev-b.json"  # another one goes beside it


def replay_log(path: Path, responses: list[str]) -> Path:
    """A turns.jsonl with these first-turn answers for ReLU: sample i replays ``responses[i]`` on every turn."""
    with path.open("wb") as f:
        for i, response in enumerate(responses):
            event = m.TurnEvent(event_id=f"logged-{i}", timestamp="20250101_000000_000000", instance_id=RELU.id, turn_idx=0,
                                turn_data=m.TurnData(response=f"My kernel:\n```python\n{response}```\n"))  # fmt: skip
            f.write(m.codec_for(m.TurnEvent).encode(event) + b"\n")
    return path


EVAL_JSON_FIELDS = {
    "event_id", "step", "timestamp", "run_id", "policy_version", "accuracy", "correct_answers", "total_samples",
    "compiled", "attempted_answer", "avg_reward", "median_reward", "std_reward", "min_reward", "max_reward", "fast_p",
    "pass_at_k", "avg_turns_correct", "avg_speedup_correct", "eval_time", "extra", "v",
}  # fmt: skip


async def test_kernelrl_eval_writes_the_eval_json_the_samples_and_a_wandb_table(tmp_path: Path) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", [CORRECT, WRONG])  # sample 0 right at once, sample 1 wrong every turn
    out = tmp_path / "out"
    argv = [*kernelrl_eval(), "--runs-root", str(tmp_path / "runs"), "--backend", "replay", "--replay-log", str(log),
            "--only", RELU.id, "--samples", "2", "--max-turns", "2", "--step", "7", "--output", str(out), "--wandb"]  # fmt: skip
    env = command_env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    done = await asyncio.to_thread(subprocess.run, argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = orjson.loads((out / "eval_logs" / "eval_step_0007.json").read_bytes())
    assert EVAL_JSON_FIELDS <= summary.keys()
    assert (
        "beat_rate" in summary
        and {"per_problem", "samples_per_problem", "n_problems", "missing", "samples_file"} <= summary["extra"].keys()
    )
    assert (summary["step"], summary["accuracy"], summary["correct_answers"], summary["total_samples"]) == (7, 0.5, 1, 2)
    assert summary["attempted_answer"] == summary["compiled"] == 2 and summary["avg_turns_correct"] == 1.0
    assert summary["pass_at_k"] == {"1": 0.5, "2": 1.0}
    # interpreter timings earn no reward for speed: 0.1 + 0.3 for the right kernel, 0.1 + 0.4 * 0.1 for two wrong turns
    assert (summary["max_reward"], summary["min_reward"]) == pytest.approx((0.4, 0.14))
    assert summary["extra"]["missing"] == 0 and summary["extra"]["samples_file"] == "eval_step_0007.samples.jsonl"
    samples = [orjson.loads(line) for line in (out / "eval_logs" / "eval_step_0007.samples.jsonl").read_bytes().splitlines()]
    assert [(t["sample_idx"], t["execution_details"]["final_correctness"], t["num_turns"]) for t in samples] == [
        (0, True, 1), (1, False, 2)
    ]  # fmt: skip
    assert all(t["group_id"].startswith("eval-0007-") and t["messages"] and t["history"] for t in samples)
    assert "Accuracy: 1/2 (50.0%)" in done.stdout and "Attempted answers: 2/2 (100.0%)" in done.stdout
    assert "pass@2: 1.000" in done.stdout
    assert done.stdout.count("Detailed Rubric Statistics:") == 1 and done.stdout.count("Eval stats saved to:") == 1
    assert f"Eval samples saved to: {out / 'eval_logs' / 'eval_step_0007.samples.jsonl'}" in done.stdout
    assert not (tmp_path / "runs" / "latest").exists()  # an evaluation is not the latest training run
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/full_trajectories_*.table.json")
    data = orjson.loads(table.read_bytes())
    right, wrong = (dict(zip(data["columns"], row, strict=True)) for row in data["data"])
    answer = f"My kernel:\n```python\n{WRONG}```\n"
    assert (wrong["sample"], wrong["turn_1_response"], wrong["turn_2_response"]) == (1, answer, answer)
    assert "### Attempt 1" not in wrong["turn_1_prompt"] and "### Attempt 1" in wrong["turn_2_prompt"]
    assert "Correct: ✗" in wrong["turn_2_prompt"]  # turn 1's verdict, fed back
    assert (right["turn_1_response"], right["turn_2_response"]) == (f"My kernel:\n```python\n{CORRECT}```\n", "")


def test_an_empty_held_out_split_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([*kernelrl_eval(), "--runs-root", str(tmp_path / "runs"), "--heldout"], cwd=tmp_path,
                          env=command_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "kernelrl eval: --heldout: the buffer holds no problem out (set buffer.heldout_fraction > 0)"
    )


def kernelrl_eval() -> list[str]:

    return kernelrl_cmd("eval")


def test_a_summary_from_before_attempted_answer_still_reads_its_compiled_count() -> None:
    from kernelrl.actors.console import format_eval_block

    old = b'{"event_id":"e","step":1,"accuracy":0.5,"correct_answers":2,"total_samples":4,"compiled":3,"v":1}'
    ev = m.codec_for(m.EvalSummary).decode(old)
    assert (ev.compiled, ev.attempted_answer, ev.attempted) == (3, 0, 3)
    assert "   Attempted answers: 3/4 (75.0%)" in format_eval_block(ev)
