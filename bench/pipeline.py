"""End-to-end trajectories per minute of ``kernelrl run``, and the asynchronous pipeline against the same run forced
synchronous (``--set buffer.max_off_policy_steps=0``: the next round waits until the learner has trained the last).

Each mode is the real thing: a ``kernelrl run`` subprocess (embedded NATS, the CPU evaluator, the generator, the
buffer, the learner, the logger) in a fresh runs root, which trains and exits by itself once the buffer's last batch
is trained. Both modes use the same seeds (``generator.sampling.seed=0``, the buffer's default seed), so they run
the same dialogues as far as the asynchrony lets them. The starting policy is resolved once by ``kernelrl sft``
(same settings; quick: when it writes its replay log) before anything is timed, so the timed runs find it cached.

Full mode: the default configuration (the ``hf`` generator on the warm-started CPU mini policy, 3 rounds of 2 prompts
x 4 samples; ``--rounds`` for more), the two runs one after the other. ``--quick`` (under 30 s once its replay log is
cached): the ``replay`` generator on a ``turns.jsonl`` written once (into ``~/.cache/kernelrl/bench``) from the
built-in reference solutions (per default problem, samples 0 and 2 answer with the solution, 1 and 3 with a variant
that does not compile, so every group has reward spread; token ids from the policy's tokenizer, SmolLM2's, and the
first turn's prompt ids as the warm start builds them), a 1-layer, hidden-64 mini policy, randomly initialised
(``policy.warm_start=false``; resolved once and given as ``learner.model``, so the runs skip the look-up), one turn
per dialogue, 2 rounds of one prompt (one train batch each). Each run spends ~15 s starting up, so the quick runs go
at the same time (the second once the first's broker is up): quick checks that both modes run to the end and that
the figures come out; its ratio, start-up dominated and taken on shared cores, says nothing about the pipeline.

Per mode, from the run's clock and logs (``<run>/logs/{trajectories,turns,steps}.jsonl``): wall seconds from process
start to exit (the cached policy lookup and start-up included); seconds from the first trajectory to the last step
(log timestamps); trajectories (lines of trajectories.jsonl), turns, steps, trajectories per minute of wall time;
the mean policy lag (``groups.policy_lag_mean`` of each step, weighted by its samples). ``ratio_async_vs_sync`` is
the asynchronous run's trajectories per minute over the synchronous run's; ``wall_ratio_sync_vs_async`` the other
way round in wall seconds. A run that exits non-zero or trains no step fails the bench (exit 1), naming its directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from kernelrl.core import messages as m
from kernelrl.core.problems import builtin_problems

KERNELRL = Path(sys.executable).with_name("kernelrl")
MODES = (("async", []), ("sync", ["buffer.max_off_policy_steps=0"]))
QUICK_SETTINGS = [
    "generator.backend=replay",
    "policy.warm_start=false",
    "reward.max_turns=1",
    "policy.mini_layers=1",
    "policy.mini_hidden=64",
    "policy.mini_heads=2",
    "buffer.num_rollout=2",
    "buffer.rollout_batch_size=1",
]
REPLAY_CACHE = Path("~/.cache/kernelrl/bench").expanduser()
REPLAY_FORMAT = 1  # bump when what write_replay_log writes changes
PROBLEMS = ("level1/1_ReLU", "level1/3_Sigmoid", "level1/5_GELU", "level1/8_ScaleShift")  # buffer.problems' default
REPLAY_SAMPLES = 4
BEHAVIOUR_LOGPROB = -10.8  # about log(1 / 49,152): a random policy's


class RunFailed(Exception):
    pass


def set_flags(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def resolve_policy(settings: list[str], env: dict[str, str]) -> Path:
    """``kernelrl sft`` with the runs' settings: the starting policy, cached for the timed runs."""
    done = subprocess.run([str(KERNELRL), "sft", *set_flags(settings)], capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RunFailed(f"kernelrl sft exited with status {done.returncode}:\n{done.stderr[-3000:]}")
    return Path(lines[-1])


def broken(solution: str) -> str:
    return solution.replace("class ModelNew", "class ModelNew((", 1)


def write_replay_log(path: Path, policy_dir: Path) -> None:
    """Turn 0 of each default problem, ``REPLAY_SAMPLES`` answers: even samples the reference solution, odd ones a
    variant that does not compile; ids from the policy's tokenizer (SmolLM2's, as ``gen_models.demo_tokenizer``)."""
    from transformers import AutoTokenizer

    from kernelrl.actors.warm_start import answer_text, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
    problems = builtin_problems()
    encode = m.codec_for(m.TurnEvent).encode
    with path.open("wb") as f:
        for pid in PROBLEMS:
            problem = problems.get(pid)
            prompt = prompt_ids(tokenizer, problem.source)
            for i in range(REPLAY_SAMPLES):
                response = answer_text(problem.solution if i % 2 == 0 else broken(problem.solution or ""))
                ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                data = m.TurnData(response=response, prompt_token_ids=prompt, response_token_ids=ids,
                                  response_logprobs=[BEHAVIOUR_LOGPROB] * len(ids))  # fmt: skip
                event = m.TurnEvent(event_id=f"{pid}-{i}", timestamp="replay", instance_id=pid, turn_idx=0, turn_data=data)
                f.write(encode(event) + b"\n")


def cached_replay_log(settings: list[str], env: dict[str, str]) -> tuple[Path, Path]:
    """The replay log for ``settings`` (its tokenizer is the policy's), written once into ``REPLAY_CACHE``, and the
    policy's directory (recorded beside it; resolved again when it is gone)."""
    problems = builtin_problems()
    key = hashlib.sha256(repr((REPLAY_FORMAT, settings, [problems.get(p).solution for p in PROBLEMS])).encode()).hexdigest()
    path = REPLAY_CACHE / f"pipeline-replay-{key[:16]}.jsonl"
    policy_file = path.with_suffix(".policy")
    policy = Path(policy_file.read_text().strip()) if policy_file.is_file() else None
    if policy is None or not (policy / "config.json").is_file() or not path.is_file():
        REPLAY_CACHE.mkdir(parents=True, exist_ok=True)
        policy = resolve_policy(settings, env)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_replay_log(tmp, policy)
        tmp.replace(path)
        policy_file.write_text(f"{policy}\n")
    return path, policy


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y%m%d_%H%M%S_%f").timestamp()


class ModeRun:
    """One ``kernelrl run`` subprocess in its own runs root, its output in ``<root>/<mode>.{out,err}``."""

    def __init__(self, mode: str, settings: list[str], root: Path, env: dict[str, str]) -> None:
        self.mode, self.root = mode, root
        self.runs_root = root / mode
        argv = [str(KERNELRL), "run", "--runs-root", str(self.runs_root), *set_flags(settings)]
        with (root / f"{mode}.out").open("wb") as out, (root / f"{mode}.err").open("wb") as err:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)

    def run_dir(self) -> Path:
        found = [p for p in self.runs_root.iterdir() if p.is_dir() and not p.is_symlink()] if self.runs_root.is_dir() else []
        return found[0] if len(found) == 1 else self.runs_root

    def wait_broker(self, timeout_s: float = 30.0) -> None:
        """Until the run's embedded broker is up (it has written ``nats.url``), so that a second run started now
        does not race it for port 4222."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline and self.proc.poll() is None and not (self.run_dir() / "nats.url").is_file():
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop a run still going (the other quick run failed): SIGTERM stops it and its children cleanly."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def finish(self, timeout_s: float) -> dict[str, object]:
        try:
            code: int | None = self.proc.wait(max(1.0, timeout_s - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # kernelrl run stops its children cleanly on SIGTERM
            self.proc.wait(60)
            code = None
        wall = time.perf_counter() - self.t0
        run_dir = self.run_dir()
        logs = run_dir / "logs"
        trajectories = read_jsonl(logs / "trajectories.jsonl")
        steps = sorted(read_jsonl(logs / "steps.jsonl"), key=lambda r: r["step"])
        stderr = (self.root / f"{self.mode}.err").read_text(errors="replace")
        if code != 0 or not steps:
            why = f"ran past {timeout_s:.0f} s" if code is None else f"exited with status {code}" if code else "trained no step"
            tail = stderr[-3000:]
            raise RunFailed(f"{self.mode} run {why}; run directory {run_dir}; stderr ends:\n{tail}")
        samples = sum(r.get("samples", 0) for r in steps)
        lag = sum(r["groups"]["policy_lag_mean"] * r.get("samples", 0) for r in steps) / samples if samples else 0.0
        active = log_time(steps[-1]["timestamp"]) - min(log_time(t["timestamp"]) for t in trajectories)
        return {
            "wall_s": round(wall, 2),
            "first_trajectory_to_last_step_s": round(active, 2),
            "trajectories": len(trajectories),
            "trajectories_per_min": round(len(trajectories) / wall * 60, 2),
            "turns": sum(t["num_turns"] for t in trajectories),
            "steps": len(steps),
            "samples_trained": samples,
            "stale_dropped": sum(r["groups"].get("stale_dropped", 0) for r in steps),
            "policy_lag_mean": round(lag, 3),
            "errors_logged": sum(" ERROR " in line for line in stderr.splitlines()),  # e.g. a batch retried
            "run_dir": str(run_dir),
        }


def measure(quick: bool, rounds: int, extra: list[str], root: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    settings = ["generator.sampling.seed=0", *(QUICK_SETTINGS if quick else [])]
    if rounds:
        settings.append(f"buffer.num_rollout={rounds}")
    settings += extra
    t0 = time.perf_counter()
    if quick:  # learner.model set: the replay runs skip their own policy look-up (a few seconds of start-up)
        log, policy = cached_replay_log(settings, env)
        settings += [f"generator.replay_log={log}", f"learner.model={policy}"]
    else:
        resolve_policy(settings, env)  # the warm start, once, untimed
    prepare_s = time.perf_counter() - t0
    timeout_s = 90.0 if quick else 1800.0
    if quick:  # both at once: two start-ups one after the other would not fit in 30 s
        runs = {}
        for mode, more in MODES:
            runs[mode] = ModeRun(mode, settings + more, root, env)
            runs[mode].wait_broker()
        try:
            modes = {mode: run.finish(timeout_s) for mode, run in runs.items()}
        finally:
            for run in runs.values():
                run.stop()
    else:
        modes = {mode: ModeRun(mode, settings + more, root, env).finish(timeout_s) for mode, more in MODES}
    a, s = modes["async"], modes["sync"]
    return {
        "mode": "quick" if quick else "full",
        "async_trajectories_per_min": a["trajectories_per_min"],
        "sync_trajectories_per_min": s["trajectories_per_min"],
        "ratio_async_vs_sync": round(a["trajectories_per_min"] / s["trajectories_per_min"], 3),  # type: ignore[operator]
        "async_wall_s": a["wall_s"],
        "sync_wall_s": s["wall_s"],
        "wall_ratio_sync_vs_async": round(s["wall_s"] / a["wall_s"], 3),  # type: ignore[operator]
        "async_active_s": a["first_trajectory_to_last_step_s"],
        "sync_active_s": s["first_trajectory_to_last_step_s"],
        "trajectories": a["trajectories"],
        "async_steps": a["steps"],
        "sync_steps": s["steps"],
        "async_samples_trained": a["samples_trained"],
        "sync_samples_trained": s["samples_trained"],
        "async_stale_dropped": a["stale_dropped"],
        "sync_stale_dropped": s["stale_dropped"],
        "errors_logged": a["errors_logged"] + s["errors_logged"],  # type: ignore[operator]
        "async_policy_lag_mean": a["policy_lag_mean"],
        "sync_policy_lag_mean": s["policy_lag_mean"],
        "prepare_s": round(prepare_s, 2),
        "settings": settings,
        "runs": modes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="replay generator, random mini policy: under 30 s")
    parser.add_argument("--rounds", type=int, default=0, help="buffer.num_rollout (default: the mode's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings for both runs")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kernelrl-bench-pipeline-"))
    t0 = time.perf_counter()
    try:
        figures = measure(args.quick, args.rounds, args.set, root)
    except RunFailed as exc:
        print(f"bench pipeline ({'quick' if args.quick else 'full'}): {exc}\n(kept {root})", file=sys.stderr)
        return 1
    total_s = time.perf_counter() - t0
    for mode in ("async", "sync"):
        r = figures["runs"][mode]  # type: ignore[index]
        print(f"{mode:5s}: {r['trajectories']} trajectories ({r['turns']} turns), {r['steps']} steps in {r['wall_s']} s "
              f"({r['first_trajectory_to_last_step_s']} s first trajectory → last step): {r['trajectories_per_min']} "
              f"trajectories/min, policy lag {r['policy_lag_mean']}, {r['stale_dropped']} stale dropped",
              file=sys.stderr)  # fmt: skip
        if r["errors_logged"]:
            print(f"  warning: the {mode} run logged {r['errors_logged']} errors but finished; its output: {root}/{mode}.err, "
                  f"its directory {r['run_dir']}", file=sys.stderr)  # fmt: skip
    if not args.keep and not figures["errors_logged"]:
        shutil.rmtree(root, ignore_errors=True)
    print(f"async / sync: {figures['ratio_async_vs_sync']}x trajectories/min; bench {total_s:.1f} s", file=sys.stderr)
    del figures["runs"], figures["settings"]
    print(json.dumps({"bench": "pipeline", **figures, "bench_s": round(total_s, 1), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
