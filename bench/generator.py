"""The generator's orchestration cost: turns/s through one generator, and per-turn time not spent generating
or evaluating, with the ``replay`` backend (answers from a log, no model) and an evaluator that answers at once.

The generator is a real ``kernelrl generator --backend replay`` process; the instant evaluator runs here, on the
shared work loop, answering each eval request through the run's results stream with a fixed verdict (compiled,
correct from turn 3 on), so every dialogue has three turns. Each turn is one JetStream eval request, one eval
result and one turn event; each dialogue adds a rollout request and a trajectory event.

Per-dialogue overhead per turn = (rollout time − time in the backend − time in the evaluator) / turns, from
the trajectory and turn events. The baseline, run in this process, is the same dialogues with no NATS at all
(prompt, replay, extract, verdict, score in a loop): ``ratio_vs_direct`` is the generator's turns/s over it.
Targets: p50 ≤ 1 ms, p99 ≤ 5 ms, ≥ 1,000 turns/s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from kernelrl.actors.gen_backend import GenerateRequest
from kernelrl.actors.gen_replay import ReplayBackend
from kernelrl.core import messages as m
from kernelrl.core.actor import run_main
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import BusSettings, Config, GeneratorSettings, RewardConfig
from kernelrl.core.consumers import consumer_for, consumer_table
from kernelrl.core.extract import extract_code
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems
from kernelrl.core.prompts import turn_messages
from kernelrl.core.reward import dialogue_termination, result_score
from kernelrl.core.work_loop import Outcome, WorkLoop

TURNS = 3


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def verdict(request: m.EvalRequest) -> m.EvalResult:
    correct = request.turn_idx >= TURNS - 1
    return m.EvalResult(eval_id=request.eval_id, problem_id=request.problem_id, compiled=True, correctness=correct,
                        runtime=1.0, baseline_runtime=1.0, speedup=1.0 if correct else 0.0)  # fmt: skip


def write_replay_log(path: Path, problem_ids: list[str]) -> None:
    problems = builtin_problems()
    with path.open("wb") as f:
        for pid in problem_ids:
            code = problems.get(pid).solution or ""
            for t in range(TURNS):
                data = m.TurnData(response=f"Attempt {t + 1}.\n```python\n{code}```\n", response_token_ids=list(range(200)),
                                  response_logprobs=[-0.1] * 200)  # fmt: skip
                event = m.TurnEvent(event_id=f"{pid}-{t}", timestamp="x", instance_id=pid, turn_idx=t, turn_data=data)
                f.write(m.codec_for(m.TurnEvent).encode(event) + b"\n")


def rollout(run_id: str, i: int, problem_ids: list[str]) -> m.RolloutRequest:
    pid = problem_ids[i % len(problem_ids)]
    return m.RolloutRequest(request_id=f"r{i}", run_id=run_id, problem_id=pid, group_id=f"g{i}", sample_idx=0, n_samples=1)


class InstantEvaluator:
    role = "evaluator"

    def __init__(self) -> None:
        self.state = "idle"
        self.counters: Counter[str] = Counter()

    async def answer(self, delivery: Delivery[m.EvalRequest]) -> Outcome:
        return [(delivery.msg.reply_to, verdict(delivery.msg))]


async def direct_baseline(log: Path, problem_ids: list[str], dialogues: int) -> float:
    """turns/s of the same dialogues with no NATS: prompt, replay, extract, verdict, score."""
    backend = ReplayBackend(GeneratorSettings(backend="replay"), log)
    await backend.start()
    problems = builtin_problems()
    reward = RewardConfig()
    turns = 0
    t0 = time.perf_counter()
    for i in range(dialogues):
        pid = problem_ids[i % len(problem_ids)]
        history: list[m.HistoryEntry] = []
        results: list[m.EvalResult] = []
        scores: list[float] = []
        while True:
            messages = turn_messages(problems.get(pid).source, history)
            gen = await backend.generate(GenerateRequest(messages=messages, problem_id=pid, turn_idx=len(history)))
            code = extract_code(gen.completions[0].text) or ""
            request = m.EvalRequest(eval_id=str(i), run_id="b", problem_id=pid, candidate_source=code, reply_to="x",
                                    turn_idx=len(history))  # fmt: skip
            result = verdict(request)
            results.append(result)
            scores.append(result_score(result, reward))
            history.append(m.HistoryEntry(turn_idx=len(history), kernel_code=code, eval_result=result, reward=scores[-1]))
            turns += 1
            if dialogue_termination(results, scores, reward) is not None:
                break
    return turns / (time.perf_counter() - t0)


async def measure(dialogues: int, concurrency: int, sync: str) -> dict[str, float]:
    problem_ids = [p.id for p in builtin_problems().problems[:8]]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "replay.jsonl"
        write_replay_log(log, problem_ids)
        direct = await direct_baseline(log, problem_ids, min(dialogues, 2000))
        async with EmbeddedNatsServer(Path(tmp) / "nats", sync_interval=sync) as server:
            run_id = "bench-gen"
            bus = await Bus.connect(BusSettings(url=server.url, run=run_id), name="bench")
            config = Config(bus=bus.settings)
            await bus.provision(consumer_table(config))
            argv = [sys.executable, "-m", "kernelrl.bin.cli", "generator", "--nats", server.url, "--run", run_id, "--backend",
                    "replay", "--replay-log", str(log), "--concurrency", str(concurrency), "--log-level", "WARNING"]  # fmt: skip
            gen = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            evaluator = InstantEvaluator()
            stopping = asyncio.Event()
            loop: WorkLoop[m.EvalRequest] = WorkLoop(bus, consumer_for(config, "evaluator"), config.evaluator.work, evaluator,
                                                     evaluator.answer)  # fmt: skip
            trajectories: list[m.TrajectoryEvent] = []
            turn_times: dict[str, list[dict[str, float]]] = {}

            async def on_event(msg: object) -> None:
                event = bus.decode(msg.subject, msg.data, msg.headers)  # type: ignore[attr-defined]
                if isinstance(event, m.TrajectoryEvent):
                    trajectories.append(event)
                elif isinstance(event, m.TurnEvent):
                    turn_times.setdefault(event.trajectory_id, []).append(event.turn_data.timings)

            sub = await bus.nc.subscribe(bus.subjects.events, cb=on_event)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(loop.run(stopping, slots=concurrency))
                    await asyncio.sleep(3.0)  # the generator process starts
                    requests = [rollout(run_id, i, problem_ids) for i in range(dialogues)]
                    t0 = time.perf_counter()
                    await bus.publish_many((bus.subjects.rollout_request, r) for r in requests)
                    while len(trajectories) < dialogues:
                        await asyncio.sleep(0.05)
                    wall = time.perf_counter() - t0
                    stopping.set()
            finally:
                await sub.unsubscribe()
                gen.terminate()
                gen.wait(30)
                await bus.close()
    total_turns = sum(t.num_turns for t in trajectories)
    overheads = []
    for t in trajectories:
        spent = sum(x.get("generate_s", 0.0) for x in turn_times.get(t.trajectory_id, []))
        overheads.append((t.rollout_time_s - spent) / t.num_turns)
    turns_per_s = total_turns / wall
    return {
        "dialogues": dialogues,
        "turns": total_turns,
        "concurrency": concurrency,
        "turns_per_s": round(turns_per_s, 1),
        "p50_overhead_ms": round(pct(overheads, 0.5) * 1000, 3),
        "p99_overhead_ms": round(pct(overheads, 0.99) * 1000, 3),
        "direct_turns_per_s": round(direct, 1),
        "ratio_vs_direct": round(turns_per_s / direct, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run, under 30 s")
    parser.add_argument("--dialogues", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--nats-sync", default="always", help="the broker's JetStream sync_interval (kernelrl run's default)")
    args = parser.parse_args()
    dialogues = args.dialogues or (300 if args.quick else 2000)
    figures = run_main(measure(dialogues, args.concurrency, args.nats_sync))
    print(f"{figures['turns']} turns through one generator: {figures['turns_per_s']:,.0f} turns/s; per-turn overhead "
          f"p50 {figures['p50_overhead_ms']} ms, p99 {figures['p99_overhead_ms']} ms; no NATS: "
          f"{figures['direct_turns_per_s']:,.0f} turns/s", file=sys.stderr)  # fmt: skip
    print(json.dumps({"bench": "generator", **figures, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
