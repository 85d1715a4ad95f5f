"""Console text in the seed formats."""

from __future__ import annotations

import msgspec

from kernelrl.actors import console
from kernelrl.core import messages as m


def turn(idx: int, compiled: bool, correct: bool, runtime: float, speedup: float, reward: float) -> m.TurnEvent:
    result = m.EvalResult(compiled=compiled, correctness=correct, runtime=runtime, speedup=speedup)
    return m.TurnEvent(
        event_id="e",
        timestamp="t",
        instance_id="kernelbench_1",
        turn_idx=idx,
        turn_data=m.TurnData(eval_result=result, reward=reward),
    )


def test_turn_line_matches_the_seed_format() -> None:
    line = console.format_turn_line(turn(0, True, False, 5.234, 0.8, 0.5))
    assert line == "[Turn 1] kernelbench_1: Compile:✓ Correct:✗ Runtime:5.23ms Speedup:0.80x Reward:0.500"


def test_verbose_turn_line_adds_the_error_tail() -> None:
    ev = m.TurnEvent(
        event_id="e",
        timestamp="t",
        instance_id="p",
        turn_idx=1,
        turn_data=m.TurnData(eval_result=m.EvalResult(compiled=False, error_kind="compile", error_message="a\nb\nLast line")),
    )
    text = console.format_turn_line(ev, verbose=True)
    assert text.startswith("[Turn 2] p: Compile:✗")
    assert "error[compile]" in text and "Last line" in text


def test_trajectory_summary_matches_the_seed_block() -> None:
    ev = m.TrajectoryEvent(
        event_id="e",
        timestamp="t",
        instance_id="kernelbench_1",
        final_reward=3.0,
        num_turns=3,
        turn_rewards=[0.5, 1.2, 3.0],
        aggregated_return=2.5,
        execution_details=m.ExecutionDetails(final_compiled=True, final_correctness=True, final_runtime=1.567, final_speedup=2.5),
    )
    assert console.format_trajectory_summary(ev).splitlines() == [
        "=== Final Trajectory Summary for kernelbench_1 ===",
        "Total turns: 3",
        "Turn rewards: [0.5, 1.2, 3]",
        "Aggregated return: 2.5000",
        "Final correctness: True",
        "Final speedup: 2.50x",
    ]


def test_advantage_table_has_a_row_per_rollout_and_a_column_per_turn() -> None:
    table = console.format_advantage_table([[0.35, 0.42, 0.8], [-0.2]])
    lines = table.splitlines()
    assert "Rollout | Turn  1 | Turn  2 | Turn  3 |" in lines
    assert "      1 | +0.350 | +0.420 | +0.800 |" in lines
    assert any(line.startswith("      2 | -0.200 |") for line in lines)


def test_step_summary_is_concise_by_default_and_detailed_when_verbose() -> None:
    ev = m.StepSummary(
        event_id="e",
        step=10,
        total_steps=200,
        groups=m.GroupSummary(
            total_groups=8,
            groups_kept=6,
            groups_filtered=2,
            num_early_exit=18,
            num_rollouts=48,
            total_tokens=45678,
            trainable_tokens=12345,
            turn_advantages=[[0.1, 0.2]],
            reward_mean=0.41,
            reward_change=0.07,
        ),
    )
    concise = console.format_step_summary(ev)
    assert concise == "Step 10/200 · Groups: 6/8 kept (2 filtered), 18/48 finished early · reward 0.41 (+0.07)"
    assert "Advantage" not in concise
    verbose = console.format_step_summary(ev, verbose=True)
    assert "  - Trainable tokens: 12,345 (27.0%)" in verbose
    assert "Turn-by-Turn Advantage Table:" in verbose
    assert verbose.splitlines()[0] == concise
    first = msgspec.structs.replace(ev, groups=msgspec.structs.replace(ev.groups, reward_change=None))
    assert console.format_step_summary(first).endswith("· reward 0.41")
