"""``kernelrl analyze`` throughput and peak memory, beside a stdlib-``json`` line reader, in one run.

A synthetic run log (``turns.jsonl``, ``trajectories.jsonl``, ``steps.jsonl``) of 1 million turns (``--quick``:
100k) is written with ``core.messages`` Structs through the logger's encoding, half of it first. Each reader runs
in a fresh child process (so its ``ru_maxrss`` is its own) and computes the same summary with the same
accumulator (``actors.analysis.RunStats``): ``kernelrl analyze``'s msgspec reader (chunks, minimal Structs) as the
command runs it (one forked worker per CPU, each summing whole-line parts of the files), the same reader in one
process, and a stdlib reader (``json.loads`` per line into plain dicts, one process). The files were just written,
so all read from the page cache. Figures: mb_per_s (the three files' bytes / seconds of analysis, interpreter start
not counted; worker start counted), mb_per_s_one_process, stdlib_mb_per_s, ratio_vs_stdlib (target ≥ 10) and
ratio_one_process_vs_stdlib, peak_rss_mb (the reading process) and worker_peak_rss_mb (the largest worker) on the
whole log and on its first half (target: independent of the log's size). The summaries are checked equal (floats
up to summation order).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from kernelrl.actors.analysis_workers import default_jobs
from kernelrl.core import messages as m

SYSTEM = (
    "You are an expert GPU kernel engineer. You rewrite PyTorch reference programs as fast, correct Triton kernels. "
    "Answer with exactly one python code block holding the complete module (imports, kernels, ModelNew). "
)
USER = (
    "Here is the PyTorch reference program:\n```python\n"
    "class Model(nn.Module):\n    def forward(self, x):\n        return x\n```\n"
)
KERNEL = (
    "import torch\nimport triton\nimport triton.language as tl\n\n@triton.jit\ndef k(x_ptr, out_ptr, n, BLOCK: tl.constexpr):\n"
    "    pid = tl.program_id(0)\n    offs = pid * BLOCK + tl.arange(0, BLOCK)\n    mask = offs < n\n"
    "    tl.store(out_ptr + offs, tl.maximum(tl.load(x_ptr + offs, mask=mask), 0.0), mask=mask)\n"
)
RESPONSE = f"```python\n{KERNEL}```"
PROBLEMS = [f"level{1 + i % 3}/{i}_Problem{i}" for i in range(50)]
ERRORS = ["syntax", "runtime", "no_code", "mismatch", "timeout"]


def _verdict(rng: random.Random, problem: str, turn: int) -> m.EvalResult:
    compiled = rng.random() < 0.5 + 0.1 * turn
    correct = compiled and rng.random() < 0.25 + 0.05 * turn
    speedup = round(rng.lognormvariate(0.0, 0.6), 4) if correct else 0.0
    return m.EvalResult(
        compiled=compiled,
        correctness=correct,
        runtime=1.0 / speedup if speedup else -1.0,
        speedup=speedup,
        error_message="" if correct else "Traceback: something failed\n" * 2,
        eval_id=f"e{rng.random()}",
        problem_id=problem,
        baseline_runtime=1.0,
        error_kind="" if correct else rng.choice(ERRORS),
        max_abs_error=1e-6 if correct else None,
        timings={"load_s": 0.1, "correctness_s": 0.25, "total_s": 0.5},
        device="cuda:0",
        evaluator_id="ev-1",
    )


def write_log(log_dir: Path, turns: int, seed: int, first_seq: int = 0) -> int:
    """Append dialogues (1 to 3 turns, stopping at a correct kernel) until ``turns`` turns; returns the dialogues."""
    rng = random.Random(seed)
    prompt_ids, resp_ids = list(range(1000, 1064)), list(range(2000, 2032))
    logprobs = [round(-rng.random(), 6) for _ in range(32)]
    prompt = [m.ChatMessage("system", SYSTEM), m.ChatMessage("user", USER)]
    enc = m.codec_for(m.TurnEvent).encode
    tenc = m.codec_for(m.TrajectoryEvent).encode
    senc = m.codec_for(m.StepSummary).encode
    written = dialogues = 0
    with (
        open(log_dir / "turns.jsonl", "ab") as tf,
        open(log_dir / "trajectories.jsonl", "ab") as jf,
        open(log_dir / "steps.jsonl", "ab") as sf,
    ):
        while written < turns:
            seq = first_seq + dialogues
            problem = PROBLEMS[seq % len(PROBLEMS)]
            tid = f"traj-{seq:08d}"
            history, rewards, out = [], [], []
            for t in range(3):
                ev = _verdict(rng, problem, t)
                reward = 0.1 * ev.compiled + 0.3 * ev.correctness + (min(max(ev.speedup - 1, 0), 2) if ev.correctness else 0)
                td = m.TurnData(
                    prompt=prompt,
                    response=RESPONSE,
                    kernel_code=KERNEL,
                    eval_result=ev,
                    reward=reward,
                    turn_return=reward,
                    prompt_token_ids=prompt_ids,
                    response_token_ids=resp_ids,
                    response_logprobs=logprobs,
                    timings={"generate_s": 1.5, "eval_s": 0.5},
                )
                out.append(
                    enc(
                        m.TurnEvent(
                            event_id=f"{tid}-t{t}",
                            timestamp="20250807_084801_411804",
                            instance_id=problem,
                            turn_idx=t,
                            turn_data=td,
                            run_id="bench",
                            trajectory_id=tid,
                            group_id=f"g{seq // 8}",
                            sample_idx=seq % 8,
                            policy_version=seq // 4096,
                        )
                    )
                )
                history.append(m.HistoryEntry(turn_idx=t, kernel_code=KERNEL, eval_result=ev, reward=reward))
                rewards.append(reward)
                written += 1
                if ev.correctness or written >= turns:
                    break
            tf.write(b"\n".join(out) + b"\n")
            n = len(rewards)
            ret = sum(r * 0.4**i for i, r in enumerate(rewards))
            last = history[-1].eval_result
            jf.write(
                tenc(
                    m.TrajectoryEvent(
                        event_id=f"e-{tid}",
                        timestamp="20250807_084801_411804",
                        instance_id=problem,
                        final_reward=rewards[-1],
                        num_turns=n,
                        turn_rewards=rewards,
                        aggregated_return=ret,
                        history=history,
                        messages=[*prompt, m.ChatMessage("assistant", RESPONSE)],
                        execution_details=m.ExecutionDetails(
                            final_compiled=last.compiled,
                            final_correctness=last.correctness,
                            final_runtime=last.runtime,
                            final_speedup=last.speedup,
                        ),
                        run_id="bench",
                        trajectory_id=tid,
                        group_id=f"g{seq // 8}",
                        sample_idx=seq % 8,
                        n_samples=8,
                        policy_version=seq // 4096,
                        turn_returns=rewards,
                        turn_advantages=[0.5] * n,
                        prompt_token_ids=[prompt_ids] * n,
                        response_token_ids=[resp_ids] * n,
                        response_logprobs=[logprobs] * n,
                    )
                )
                + b"\n"
            )
            dialogues += 1
            if dialogues % 256 == 0:  # one train step per 32 groups of 8
                step = (first_seq + dialogues) // 256
                groups = m.GroupSummary(
                    total_groups=32,
                    groups_kept=28,
                    groups_filtered=4,
                    num_early_exit=100,
                    num_rollouts=256,
                    reward_mean=0.5,
                    turn_advantages=[[0.1, 0.2]] * 224,
                )
                sf.write(
                    senc(m.StepSummary(event_id=f"step-{step}", step=step, policy_version=step, loss=0.01, groups=groups)) + b"\n"
                )
    return dialogues


# ---------------------------------------------------------------- the readers (each in a child process)


def stdlib_run(log_dir: Path):  # -> RunStats
    """The same summary from ``json.loads`` per line and plain dicts."""
    from kernelrl.actors.analysis import RunStats, StepTrend, progression_marks
    from kernelrl.core.config import RewardConfig

    stats = RunStats("bench", [str(log_dir)], RewardConfig(), 5)
    bad = 0
    with open(log_dir / "turns.jsonl", "rb") as f:
        for line in f:
            try:
                d = json.loads(line)
                if d.get("group_id", "").startswith("eval-"):
                    stats.records.eval_turns += 1
                    continue
                td = d["turn_data"]
                ev = td.get("eval_result", {})
                stats.add_turn(
                    d["turn_idx"],
                    td.get("reward", 0.0),
                    ev.get("compiled", False),
                    ev.get("correctness", False),
                    ev.get("speedup") or 0.0,
                    ev.get("interpreter", False),
                    ev.get("error_kind", ""),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
    with open(log_dir / "trajectories.jsonl", "rb") as f:
        for line in f:
            try:
                d = json.loads(line)
                if d.get("group_id", "").startswith("eval-"):
                    stats.records.eval_trajectories += 1
                    continue
                rw, ret, ex = d["turn_rewards"], d["aggregated_return"], d.get("execution_details", {})
                step = d.get("extra_info", {}).get("step")
                prog = (
                    progression_marks(h["eval_result"]["correctness"] for h in d.get("history", []))
                    if ret > stats.top_floor
                    else ""
                )
                stats.add_trajectory(
                    "bench",
                    d.get("trajectory_id") or d.get("event_id", ""),
                    d["instance_id"],
                    d["num_turns"],
                    ret,
                    rw[0] if rw else 0.0,
                    rw[-1] if rw else 0.0,
                    ex.get("final_correctness", False),
                    ex.get("final_speedup") or 0.0,
                    prog,
                    d.get("policy_version", 0),
                    step if type(step) is int else d.get("policy_version", 0),
                )
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                bad += 1
    with open(log_dir / "steps.jsonl", "rb") as f:
        for line in f:
            try:
                d = json.loads(line)
                g = d.get("groups", {})
                stats.add_step(
                    StepTrend(
                        run="bench",
                        step=d["step"],
                        policy_version=d.get("policy_version", 0),
                        total_groups=g.get("total_groups", 0),
                        groups_kept=g.get("groups_kept", 0),
                        groups_filtered=g.get("groups_filtered", 0),
                        num_early_exit=g.get("num_early_exit", 0),
                        num_rollouts=g.get("num_rollouts", 0),
                        reward_mean=g.get("reward_mean", 0.0),
                        loss=d.get("loss") or 0.0,
                    )
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
    stats.skipped("all", bad)
    return stats


def child(reader: str, log_dir: Path) -> None:
    """``reader``: ``msgspec`` (``kernelrl analyze``'s reader, one worker per CPU), ``msgspec1`` (the same in one
    process) or ``stdlib``."""
    from kernelrl.actors.analysis_read import analyze
    from kernelrl.core.config import RewardConfig

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if reader == "stdlib":
        summary = stdlib_run(log_dir).summary()
    else:
        summary = analyze([log_dir], RewardConfig(), 5, jobs=1 if reader == "msgspec1" else None).combined
    seconds = time.perf_counter() - start
    summary.log_dirs = []
    summary.records.skipped = {}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before_mb": rss0 / 1024,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "summary": msgspec.to_builtins(summary),
            }
        )
    )


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Where two summaries differ, floats compared up to summation order: the workers' parts are summed
    separately, then added, and a sum of n floats in another order may move by ~n ulp."""
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-12 else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def measure(reader: str, log_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", reader, str(log_dir)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100k turns")
    ap.add_argument("--dir", default=None, help="where to write the synthetic log (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("READER", "LOGDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    turns = 100_000 if args.quick else args.turns
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="krl-analyze-bench-") as tmp:
        log_dir = Path(tmp) / "bench"  # analyze names a run by its directory; the stdlib reader calls it "bench"
        log_dir.mkdir()
        t0 = time.perf_counter()
        first = write_log(log_dir, turns // 2, seed=1)
        print(f"wrote {turns // 2:,} turns ({first:,} trajectories) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        half = measure("msgspec", log_dir)
        t0 = time.perf_counter()
        second = write_log(log_dir, turns - turns // 2, seed=2, first_seq=first)
        size = sum((log_dir / f).stat().st_size for f in ("turns.jsonl", "trajectories.jsonl", "steps.jsonl"))
        print(
            f"wrote {turns:,} turns ({first + second:,} trajectories, {size / 1e6:,.0f} MB) "
            f"in {time.perf_counter() - t0:.1f}s more",
            file=sys.stderr,
        )
        fast = measure("msgspec", log_dir)
        one = measure("msgspec1", log_dir)
        slow = measure("stdlib", log_dir)
        diffs = differences(fast["summary"], slow["summary"]) + differences(one["summary"], slow["summary"])
        same = not diffs
        for name, r in (("msgspec half", half), ("msgspec", fast), ("msgspec 1 proc", one), ("stdlib", slow)):
            print(
                f"{name:>14}: {r['seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.1f} MB, worker {r['worker_peak_rss_mb']:.1f} MB "
                f"(after imports {r['rss_before_mb']:.1f} MB)",
                file=sys.stderr,
            )
        if diffs:
            print("the readers' summaries differ:", *diffs[:20], sep="\n  ", file=sys.stderr)
    mb = size / 1e6
    print(
        json.dumps(
            {
                "bench": "analyze",
                "turns": turns,
                "trajectories": first + second,
                "log_mb": round(mb, 1),
                "jobs": default_jobs(),
                "mb_per_s": round(mb / fast["seconds"], 1),
                "mb_per_s_one_process": round(mb / one["seconds"], 1),
                "stdlib_mb_per_s": round(mb / slow["seconds"], 1),
                "ratio_vs_stdlib": round(slow["seconds"] / fast["seconds"], 2),
                "ratio_one_process_vs_stdlib": round(slow["seconds"] / one["seconds"], 2),
                "peak_rss_mb": round(fast["peak_rss_mb"], 1),
                "worker_peak_rss_mb": round(fast["worker_peak_rss_mb"], 1),
                "peak_rss_mb_half_size": round(half["peak_rss_mb"], 1),
                "worker_peak_rss_mb_half_size": round(half["worker_peak_rss_mb"], 1),
                "one_process_peak_rss_mb": round(one["peak_rss_mb"], 1),
                "stdlib_peak_rss_mb": round(slow["peak_rss_mb"], 1),
                "same_summary": same,
                "cpus": os.cpu_count(),
            }
        )
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
