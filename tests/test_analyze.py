"""``kernelrl analyze``: every number of the summary against a hand count of the fixture logs
(tests/fixtures/analysis: run_a has 4 trajectories, 8 turns, 2 steps, a malformed, a wrongly typed and a torn
turn line and a non-JSON trajectory line; run_b has its own [reward] weights in config.toml), the plot, the
command, and logs written from core.messages Structs the way the logger writes them."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import msgspec
import pytest

from kernelrl.actors.analysis import HIST_EDGES, Analysis
from kernelrl.actors.analysis_read import AnalysisError, analyze
from kernelrl.actors.sample_events import sample_run
from kernelrl.bin import analyze as analyze_cmd
from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig, SampleSettings

FIXTURES = Path(__file__).parent / "fixtures" / "analysis"
RUN_A = FIXTURES / "run_a" / "logs"
RUN_B = FIXTURES / "run_b"  # a run directory: logs/ and config.toml


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def test_one_run_every_number_is_a_hand_count() -> None:
    a = analyze([RUN_A], top_n=2)
    s = a.combined
    assert a.runs == [s]
    assert s.name == "run_a"
    assert (s.records.turns, s.records.trajectories, s.records.steps) == (8, 4, 2)
    assert s.records.skipped == {"turns.jsonl": 3, "trajectories.jsonl": 1}  # bad JSON, wrong type, torn; not JSON
    # a held-out eval dialogue (group eval-0002-…, return 9.0, correct at 8x) is counted apart and in no number below
    assert (s.records.eval_trajectories, s.records.eval_turns) == (1, 1)

    o = s.overall
    assert o.trajectories == 4
    assert o.avg_turns == approx(2.0)  # (3 + 1 + 2 + 2) / 4
    assert o.avg_return == approx(0.921)  # (0.184 + 2.4 + 0.44 + 0.66) / 4
    assert (o.correct, o.final_correct_rate) == (3, 0.75)
    assert o.timed_correct == 3  # final speedups 1.5, 4.0, 2.0
    assert o.avg_speedup == approx(2.5)
    assert o.geomean_speedup == approx(12 ** (1 / 3))  # (1.5 · 4 · 2)^(1/3)
    assert o.fast_p == {"0.0": 0.75, "1.0": 0.75, "1.5": 0.5, "2.0": 0.25}
    assert (s.improved, s.multi_turn) == (2, 3)  # ta1 0 -> 0.9, ta4 0.1 -> 1.4; ta3 0.4 -> 0.1 did not
    assert s.improvement_rate == 0.5
    assert s.improvement_rate_multi_turn == approx(2 / 3)

    t0, t1, t2 = s.per_turn
    assert [t.turn_idx for t in s.per_turn] == [0, 1, 2]
    assert [t.trajectories for t in s.per_turn] == [4, 3, 1]
    # turn 0: rewards 0, 2.4, 0.4, 0.1; compiled 3, correct 2 (speedups 4.0 and 0.5, speed reward 2 + 0)
    assert t0.reward_mean == approx(0.725)
    assert (t0.compile_reward, t0.correct_reward, t0.speed_reward) == (approx(0.075), approx(0.15), approx(0.5))
    assert (t0.compile_rate, t0.correct_rate, t0.speedup_mean, t0.timed_correct) == (0.75, 0.5, approx(2.25), 2)
    assert t0.error_kinds == {"none": 2, "syntax": 1, "mismatch": 1}
    # turn 1: rewards 0.1, 0.1, 1.4; compiled 3, correct 1 (speedup 2.0, speed reward 1)
    assert t1.reward_mean == approx(1.6 / 3)
    assert (t1.compile_reward, t1.correct_reward, t1.speed_reward) == (approx(0.1), approx(0.1), approx(1 / 3))
    assert (t1.compile_rate, t1.correct_rate, t1.speedup_mean) == (1.0, approx(1 / 3), approx(2.0))
    assert t1.error_kinds == {"none": 1, "mismatch": 1, "runtime": 1}
    # turn 2: ta1 alone, correct at 1.5x
    assert (t2.reward_mean, t2.compile_reward, t2.correct_reward, t2.speed_reward) == (
        approx(0.9),
        approx(0.1),
        approx(0.3),
        approx(0.5),
    )
    assert (t2.compile_rate, t2.correct_rate, t2.speedup_mean, t2.error_kinds) == (1.0, 1.0, approx(1.5), {"none": 1})

    level1, level2 = s.per_level
    assert (level1.name, level1.trajectories, level1.avg_return, level1.correct) == ("level1", 2, approx(1.292), 2)
    assert (level1.avg_speedup, level1.geomean_speedup) == (approx(2.75), approx(math.sqrt(6)))
    assert level1.fast_p == {"0.0": 1.0, "1.0": 1.0, "1.5": 0.5, "2.0": 0.5}
    assert (level2.name, level2.trajectories, level2.avg_turns, level2.avg_return) == ("level2", 2, approx(2.0), approx(0.55))
    assert (level2.final_correct_rate, level2.avg_speedup, level2.fast_p["2.0"]) == (0.5, approx(2.0), 0.0)
    assert [(p.name, p.trajectories, p.correct) for p in s.per_problem] == [
        ("level1/1_ReLU", 1, 1),
        ("level1/2_GELU", 1, 1),
        ("level2/7_Conv", 2, 1),
    ]
    relu, gelu, conv = s.per_problem
    assert (relu.avg_return, relu.avg_turns, relu.avg_speedup, relu.geomean_speedup) == (approx(0.184), 3.0, 1.5, approx(1.5))
    assert relu.fast_p == {"0.0": 1.0, "1.0": 1.0, "1.5": 0.0, "2.0": 0.0}  # 1.5x is not > 1.5
    assert (gelu.avg_speedup, gelu.fast_p["2.0"], gelu.timed_correct) == (4.0, 1.0, 1)
    assert (conv.avg_turns, conv.avg_return, conv.timed_correct, conv.avg_speedup) == (2.0, approx(0.55), 1, 2.0)
    assert conv.fast_p == {"0.0": 0.5, "1.0": 0.5, "1.5": 0.5, "2.0": 0.0}  # ta4 at 2.0x; ta3's final kernel is wrong
    assert [t.timed_correct for t in s.per_turn] == [2, 1, 1]

    # by the step that sampled them: extra_info.step (ta4: 5), else the policy version (ta3's step is not a number,
    # ta2's extra_info is null)
    assert [(o.step, o.trajectories, o.correct, o.final_correct_rate) for o in s.per_step] == [
        (0, 2, 1, 0.5),  # ta2, ta3
        (1, 1, 1, 1.0),  # ta1
        (5, 1, 1, 1.0),  # ta4
    ]
    assert [o.avg_return for o in s.per_step] == [approx(1.42), approx(0.184), approx(0.66)]

    assert [(t.trajectory_id, t.aggregated_return, t.progression, t.final_speedup) for t in s.top] == [
        ("ta2", 2.4, "✓", 4.0),
        ("ta4", 0.66, "✗✓", 2.0),
    ]
    assert [
        (
            st.step,
            st.policy_version,
            st.groups_kept,
            st.total_groups,
            st.groups_filtered,
            st.num_early_exit,
            st.num_rollouts,
            st.reward_mean,
            st.loss,
        )
        for st in s.steps
    ] == [
        (1, 1, 1, 2, 1, 1, 4, 0.5, 0.25),
        (2, 2, 2, 2, 0, 3, 4, 1.0, -0.1),
    ]
    # quarter-octave bins: 1.5x in [2^(2/4), 2^(3/4)), 2.0x in [2^(4/4), 2^(5/4)), 4.0x in [2^(8/4), 2^(9/4))
    counts = s.speedup_histogram.counts
    assert len(counts) == len(HIST_EDGES) - 1 == 32
    assert {i: c for i, c in enumerate(counts) if c} == {18: 1, 20: 1, 24: 1}


def test_top_n_keeps_the_best_returns_in_order() -> None:
    s = analyze([RUN_A], top_n=3).combined
    assert [(t.trajectory_id, t.progression) for t in s.top] == [("ta2", "✓"), ("ta4", "✗✓"), ("ta3", "✓✗")]
    assert analyze([RUN_A], top_n=0).combined.top == []
    assert [t.progression for t in analyze([RUN_A], top_n=10).combined.top] == ["✓", "✗✓", "✓✗", "✗✗✓"]


def test_two_runs_combined_and_each_with_its_own_reward_weights() -> None:
    a = analyze([RUN_A, RUN_B], top_n=2)
    run_a, run_b = a.runs
    assert (run_a.name, run_b.name) == ("run_a", "run_b")
    assert run_b.reward is not None and run_b.reward.compile_weight == 0.2  # from run_b/config.toml
    assert run_a.reward == RewardConfig()
    assert run_b.per_turn[0].compile_reward == approx(0.1)  # tb1 compiled, tb2 not: 0.2 / 2
    c = a.combined
    assert c.reward is None  # the runs' weights differ
    assert (c.records.turns, c.records.trajectories, c.records.steps) == (11, 6, 3)
    assert c.records.skipped == {"turns.jsonl": 3, "trajectories.jsonl": 1}
    o = c.overall
    assert (o.trajectories, o.correct, o.timed_correct) == (6, 4, 4)
    assert o.avg_turns == approx(11 / 6)
    assert o.avg_return == approx(6.184 / 6)
    assert o.avg_speedup == approx(2.625)  # 1.5, 4, 2, 3
    assert o.geomean_speedup == approx(math.sqrt(6))  # 36^(1/4)
    assert o.fast_p == {"0.0": approx(4 / 6), "1.0": approx(4 / 6), "1.5": 0.5, "2.0": approx(2 / 6)}
    assert (c.improved, c.multi_turn, c.improvement_rate_multi_turn) == (2, 4, 0.5)
    t0 = c.per_turn[0]
    assert [t.trajectories for t in c.per_turn] == [6, 4, 1]
    assert t0.reward_mean == approx(0.9)  # (2.9 + 2.5 + 0) / 6
    assert t0.compile_reward == approx(0.5 / 6)  # 3 · 0.1 (run_a) + 1 · 0.2 (run_b)
    assert t0.correct_reward == approx(0.15)
    assert t0.speed_reward == approx(4 / 6)
    assert t0.error_kinds == {"none": 3, "syntax": 2, "mismatch": 1}
    assert [lv.name for lv in c.per_level] == ["level1", "level2", "level3"]
    assert [(t.run, t.trajectory_id) for t in c.top] == [("run_b", "tb1"), ("run_a", "ta2")]
    assert [(st.run, st.step) for st in c.steps] == [("run_a", 1), ("run_a", 2), ("run_b", 1)]


def test_missing_or_empty_logdir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="no such directory"):
        analyze([tmp_path / "nope"])
    with pytest.raises(AnalysisError, match=r"turns\.jsonl"):
        analyze([tmp_path])


def test_plot_has_a_point_per_turn_and_step_and_a_bar_per_bin(tmp_path: Path) -> None:
    from kernelrl.actors.analysis_plot import plot

    png = tmp_path / "analysis.png"
    fig = plot(analyze([RUN_A, RUN_B]), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_size(png) == (1500, 450)  # the figure as drawn: 15 x 4.5 inches at 100 dpi
    by_turn, by_step, speed = fig.axes[:3]
    assert [len(line.get_xdata()) for line in by_turn.get_lines()] == [3, 3, 3]  # reward, correct, compile by turn 0..2
    # correct rate by turn: 3 of 6 (ta2, ta3, tb1), 1 of 4 (ta4), 1 of 1 (ta1)
    assert list(by_turn.get_lines()[1].get_ydata()) == [approx(3 / 6), approx(1 / 4), approx(1.0)]
    # group reward_mean of run_a's two steps and run_b's one, then the final correct rate by sampling step
    assert [line.get_label() for line in by_step.get_lines()] == [
        "group reward_mean (run_a)",
        "group reward_mean (run_b)",
        "final correct rate (run_a)",
        "final correct rate (run_b)",
    ]
    assert [len(line.get_xdata()) for line in by_step.get_lines()] == [2, 1, 3, 1]
    assert list(by_step.get_lines()[2].get_xdata()) == [0, 1, 5]
    assert list(by_step.get_lines()[2].get_ydata()) == [0.5, 1.0, 1.0]
    heights = [p.get_height() for p in speed.patches]
    assert len(heights) == 32 and sum(heights) == 4  # four correct final kernels with a speedup


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_cli_writes_json_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "analysis.json", tmp_path / "plot.png"
    assert analyze_cmd.main([str(RUN_A), str(RUN_B), "--output", str(out), "--plot", str(png), "--top", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["combined"]["overall"]["trajectories"] == 6
    assert [r["name"] for r in data["runs"]] == ["run_a", "run_b"]
    assert data["runs"][0]["records"]["skipped"] == {"turns.jsonl": 3, "trajectories.jsonl": 1}
    assert msgspec.json.decode(out.read_bytes(), type=Analysis).combined.overall.correct == 4  # the Struct round-trips
    assert png.stat().st_size > 0
    text = capsys.readouterr().out
    assert "final correct 4/6 (66.7%)" in text
    assert "✗✓" in text and "run_b" in text
    assert "Held-out evaluation records left out: 1 trajectories, 1 turns" in text


def test_cli_missing_logdir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze_cmd.main([str(RUN_A), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "kernelrl analyze:" in err and "missing: no such directory" in err


def test_logs_written_from_message_structs(tmp_path: Path) -> None:
    """Records encoded from core.messages Structs as the logger writes them (one encoded message per line)."""
    log_dir = tmp_path / "run" / "logs"
    log_dir.mkdir(parents=True)
    turns, trajs, steps = [], [], []
    files = {
        m.TurnEvent: (turns, "turns.jsonl"),
        m.TrajectoryEvent: (trajs, "trajectories.jsonl"),
        m.StepSummary: (steps, "steps.jsonl"),
    }
    for _, msg in sample_run("t", SampleSettings(steps=3, groups=2, samples=4, seed=7)):
        if type(msg) in files:
            files[type(msg)][0].append(msg)
    for type_, (msgs, name) in files.items():
        (log_dir / name).write_bytes(b"".join(m.codec_for(type_).encode(x) + b"\n" for x in msgs))
    s = analyze([tmp_path / "run"]).combined
    assert s.records == type(s.records)(turns=len(turns), trajectories=len(trajs), steps=len(steps), skipped={})
    assert s.overall.trajectories == 24  # 3 steps x 2 groups x 4 samples
    assert s.overall.correct == sum(t.execution_details.final_correctness for t in trajs)
    assert s.overall.avg_return == approx(sum(t.aggregated_return for t in trajs) / len(trajs))
    assert [t.trajectories for t in s.per_turn] == [sum(1 for t in turns if t.turn_idx == i) for i in range(len(s.per_turn))]
    assert s.per_turn[0].reward_mean == approx(
        sum(t.turn_data.reward for t in turns if t.turn_idx == 0) / s.per_turn[0].trajectories
    )
    for t in s.per_turn:  # the components add up to the logged reward (the sample stream scores with the default weights)
        assert t.compile_reward + t.correct_reward + t.speed_reward == approx(t.reward_mean)
    assert [st.step for st in s.steps] == [1, 2, 3]
    assert [st.groups_kept for st in s.steps] == [st.groups.groups_kept for st in steps]


def _same_numbers(a: object, b: object) -> bool:
    """Equal structure and values, floats up to summation order (parts are summed separately, then added)."""
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_numbers(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_line_ranges_cover_the_file_in_whole_lines(tmp_path: Path) -> None:
    from kernelrl.actors.analysis_read import line_ranges

    path = tmp_path / "turns.jsonl"
    lines = [b"x" * n for n in (5, 300, 1, 40, 2, 2, 2, 700, 9)]
    path.write_bytes(b"\n".join(lines) + b"\n" + b"torn")
    data = path.read_bytes()
    for parts in (1, 2, 3, 7, 50):
        ranges = line_ranges(path, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        assert all(data[a - 1 : a] == b"\n" for a, _ in ranges[1:])  # every part starts a line
        assert len(ranges) <= min(parts, len(lines) + 1)
    assert len(line_ranges(path, 3)) == 3


def test_a_run_read_in_many_small_parts_gives_the_sequential_summary() -> None:
    """run_a's files cut every ~200 bytes: its malformed, wrongly typed and torn lines are still skipped once each."""
    whole = msgspec.to_builtins(analyze([RUN_A, RUN_B], top_n=3, jobs=1))
    for jobs in (2, 5):  # workers only where this process has no other thread; the parts are the same either way
        parted = analyze([RUN_A, RUN_B], top_n=3, jobs=jobs, part_bytes=200)
        assert parted.runs[0].records.skipped == {"turns.jsonl": 3, "trajectories.jsonl": 1}
        assert _same_numbers(msgspec.to_builtins(parted), whole)


WORKERS_SCRIPT = """
import sys, msgspec
from pathlib import Path
from kernelrl.actors import analysis_read

pools = []
real_in_workers = analysis_read.in_workers
def counted_in_workers(fn, jobs, workers):
    pools.append(workers)
    return real_in_workers(fn, jobs, workers)
analysis_read.in_workers = counted_in_workers
runs = [Path(p) for p in sys.argv[1:]]
analysis_read.analyze(runs, top_n=3, jobs=2)  # small files: one part each, read here
small = list(pools)
a = analysis_read.analyze(runs, top_n=3, jobs=2, part_bytes=200)
print(msgspec.json.encode({"small": small, "pools": pools, "analysis": a}).decode())
"""


def test_large_logs_are_read_by_worker_processes() -> None:
    """In a fresh single-threaded process (as `kernelrl analyze` is), jobs=2 reads the parts in a pool of 2 workers,
    and only when a file was cut into parts."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", WORKERS_SCRIPT, str(RUN_A), str(RUN_B)], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout)
    assert result["small"] == []  # no file was big enough to cut: no worker started
    assert result["pools"] == [2]
    whole = msgspec.to_builtins(analyze([RUN_A, RUN_B], top_n=3, jobs=1))
    assert _same_numbers(result["analysis"], whole)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (this sandbox's init may never reap one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{pid}\n" in status.read_text() and _alive(int(status.parent.name)):
                kids.append(int(status.parent.name))
        except (OSError, ValueError):
            continue
    return kids


@pytest.fixture(scope="module")
def many_big_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 run directories sharing one 70 MB turns.jsonl (symlinked): big enough to be cut into parts, long to read."""
    root = tmp_path_factory.mktemp("big")
    event = m.TurnEvent(event_id="e", timestamp="t", instance_id="level1/1_ReLU", turn_idx=0,
                        turn_data=m.TurnData(kernel_code="x = 1\n" * 40, eval_result=m.EvalResult(compiled=True)))  # fmt: skip
    line = m.codec_for(m.TurnEvent).encode(event) + b"\n"
    (root / "logs").mkdir()
    (root / "logs" / "turns.jsonl").write_bytes(line * (70_000_000 // len(line)))
    runs = []
    for i in range(40):
        (root / f"r{i}").mkdir()
        (root / f"r{i}" / "logs").symlink_to(root / "logs")
        runs.append(root / f"r{i}")
    return runs


@pytest.mark.parametrize("stop", ["ctrl-c", "kill the command", "kill a worker"])
def test_a_stopped_or_killed_analyze_leaves_no_worker_behind(many_big_runs: list[Path], stop: str) -> None:
    """Ctrl-C stops `kernelrl analyze` at once (exit 130, one line) and its workers with it; a killed command's
    workers end by themselves; a worker that dies is an error (exit 2, one line), not a wait for its lost part."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "kernelrl.bin.analyze", "--jobs", "2", *map(str, many_big_runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(workers := _children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(workers) == 2, "the workers never started"
    if stop == "kill a worker":
        os.kill(workers[0], signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    if stop == "ctrl-c":
        assert proc.returncode == 130 and err.strip() == "kernelrl analyze: interrupted"
    elif stop == "kill a worker":
        assert proc.returncode == 2 and err.strip().startswith("kernelrl analyze: a worker process died")
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]


CTRL_C_AT_RANDOM_MOMENTS = """
import json, multiprocessing, os, random, signal, sys, time
from kernelrl.actors.analysis_workers import in_workers

armed = {}
signal.signal(signal.SIGALRM, lambda *_: armed.pop("now", False) and os.kill(os.getpid(), signal.SIGINT))
rng, outcomes = random.Random(0), {"done": 0, "interrupted": 0}
for _ in range(int(sys.argv[1])):
    try:
        armed["now"] = True
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.02))
        assert list(in_workers(pow, [(j, 2) for j in range(20)], 2)) == [j * j for j in range(20)]
        outcomes["done"] += 1
    except KeyboardInterrupt:
        outcomes["interrupted"] += 1
    finally:
        armed.clear()
        signal.setitimer(signal.ITIMER_REAL, 0)
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not multiprocessing.active_children(), "a worker outlived its call"
print(json.dumps(outcomes))
"""


def test_ctrl_c_at_any_moment_of_a_worker_pool_is_a_keyboard_interrupt_and_no_worker_outlives_it() -> None:
    """Ctrl-C landing anywhere in ``in_workers`` (starting the executor, waiting, collecting, stopping) is a
    ``KeyboardInterrupt`` and nothing else: raised inside the executor's thread start or a condition's wait it used to
    become a ``RuntimeError`` from the cleanup (CI saw `kernelrl analyze` exit 1). 300 calls, each with a real SIGINT
    at a random moment."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CTRL_C_AT_RANDOM_MOMENTS, "300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout)
    assert outcomes["done"] + outcomes["interrupted"] == 300 and outcomes["interrupted"] > 0
