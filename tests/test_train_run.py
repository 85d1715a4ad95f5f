"""``kernelrl run`` as ``make run`` starts it, on the default configuration: it warm-starts the CPU default policy,
trains, and ends by itself with turns, trajectories and step summaries logged, groups kept and the policy moving."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pytest

from kernelrl.core.run_dirs import latest_run

from helpers import command_env, kernelrl_cmd


def records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.slow
def test_the_default_run_trains_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(kernelrl_cmd("run"), cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    run = latest_run(tmp_path / "runs")
    assert run is not None
    turns, trajectories, steps = (records(run.logs / name) for name in ("turns.jsonl", "trajectories.jsonl", "steps.jsonl"))
    # 3 rounds x 2 prompts x 4 samples, each counted once
    assert len(trajectories) == 24 and len({t["trajectory_id"] for t in trajectories}) == 24
    assert len(turns) == sum(t["num_turns"] for t in trajectories)  # type: ignore[misc]
    assert all(t["response_token_ids"] and t["response_logprobs"] for t in trajectories)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    kept = [s for s in steps if s["groups"]["groups_kept"] > 0]  # type: ignore[index]
    assert kept, "no step kept a group: the warm-started policy gave no reward spread"
    assert sum(s["groups"]["total_groups"] for s in steps) == 6  # type: ignore[index,misc]  # every group reported once
    for step in kept:
        assert step["tokens_trained"] > 0 and step["weights_sha256"]  # type: ignore[operator]
        assert Path(str(step["weights_path"])).is_dir()
    assert max(t["policy_version"] for t in trajectories) >= 1  # type: ignore[type-var]  # later rollouts sampled new weights
    config = (run.path / "config.toml").read_text()
    assert "warm-" in config  # generator and learner started from the cached warm start
    assert f"Run {run.run_id}: {len(steps)} training steps" in done.stdout

    # the tools over the logs of this real run: analyze's counts are the files' own, and view reports every dialogue
    from kernelrl.actors.analysis_read import analyze

    s = analyze([run.path]).combined
    assert (s.records.turns, s.records.trajectories, s.records.steps) == (len(turns), 24, len(steps))
    assert s.records.skipped == {} and s.records.eval_trajectories == 0
    assert s.overall.correct == sum(bool(t["execution_details"]["final_correctness"]) for t in trajectories)  # type: ignore[index]
    assert sum(t.trajectories for t in s.per_turn) == len(turns)
    assert sum(o.trajectories for o in s.per_step) == 24 and [st.step for st in s.steps] == [st["step"] for st in steps]
    report = tmp_path / "report.html"
    viewed = subprocess.run(kernelrl_cmd("view", str(run.path), "--output", str(report)), cwd=tmp_path, env=command_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert viewed.returncode == 0, viewed.stderr
    assert f"24 trajectories, {len(turns)} turns, {len(steps)} steps" in viewed.stdout and report.stat().st_size > 0
