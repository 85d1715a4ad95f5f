"""The kernelrl commands a user types: run, status, tap."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson

from kernelrl.actors.sample_events import sample_run
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import SampleSettings
from kernelrl.core.nats_server import EmbeddedNatsServer

from helpers import count_lines, kernelrl_cmd, small_turn, wait_for


async def run_cmd(*args: str, timeout_s: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *kernelrl_cmd(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode or 0, out.decode()


async def test_run_starts_embedded_nats_logs_the_sample_stream_and_exits_0(tmp_path: Path) -> None:
    code, out = await run_cmd(
        "run", "--run-dir", str(tmp_path), "--roles", "logger,evaluator,sample", "--sample-steps", "1", timeout_s=120
    )
    assert code == 0, out
    expected = Counter(type(msg).__name__ for _, msg in sample_run("default", SampleSettings(steps=1)))
    logs = tmp_path / "logs"
    assert count_lines(logs / "turns.jsonl") == expected["TurnEvent"]
    assert count_lines(logs / "trajectories.jsonl") == expected["TrajectoryEvent"]
    assert count_lines(logs / "steps.jsonl") == 1
    assert (logs / "eval_logs" / "eval_step_0001.json").exists()
    assert "[Turn 1] level1/" in out and "Step 1/1" in out
    assert "stopped cleanly" in out
    assert (tmp_path / "nats" / "nats-server.conf").read_text().count("max_payload: 8388608") == 1


async def test_status_lists_the_running_logger_with_its_counters(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    await bus.publish_many([(bus.subjects.event_turn, small_turn(run_id, i)) for i in range(5)])
    logger = spawn("logger", "--nats", nats_server.url, "--run", run_id, "--log-dir", str(tmp_path), stdout=subprocess.DEVNULL)
    await wait_for(lambda: count_lines(tmp_path / "turns.jsonl") == 5, 30, "the logger")
    beats: list[dict[str, object]] = []
    for _ in range(50):
        code, out = await run_cmd("status", "--nats", nats_server.url, "--run", run_id, "--json")
        assert code == 0, out
        beats = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
        if beats and beats[0]["counters"].get("written_TurnEvent") == 5:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.2)
    assert len(beats) == 1
    assert beats[0]["role"] == "logger" and beats[0]["state"] == "running" and beats[0]["pid"] == logger.pid
    code, table = await run_cmd("status", "--nats", nats_server.url, "--run", run_id)
    assert "ROLE" in table and "logger" in table and "written_TurnEvent=5" in table
    logger.send_signal(signal.SIGTERM)
    assert logger.wait(timeout=15) == 0


async def test_status_of_an_empty_run_says_so(nats_server: EmbeddedNatsServer) -> None:
    code, out = await run_cmd("status", "--nats", nats_server.url, "--run", "nobody-here")
    assert code == 0 and "no live actors" in out


async def test_tap_prints_one_decoded_line_per_message_and_flags_garbage(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    tap = spawn("tap", "--nats", nats_server.url, "--run", run_id, "--count", "3", "--timeout", "30")
    assert "tap: watching" in await asyncio.to_thread(tap.stdout.readline)  # type: ignore[union-attr]
    await bus.publish(bus.subjects.event_turn, small_turn(run_id, 7))
    await bus.publish_core(bus.subjects.eval_result("gen-1"), m.EvalResult(eval_id="e9", compiled=True))
    await bus.nc.publish(bus.subjects.event_step, b"{oops")
    out, _ = await asyncio.to_thread(tap.communicate, timeout=30)
    lines = [ln for ln in out.splitlines() if ln.startswith("krl.")]
    assert lines[0].startswith(f"krl.{run_id}.event.turn TurnEvent [Turn 2] level1/7_Op: Compile:✗")
    assert lines[1].startswith(f"krl.{run_id}.eval.result.gen-1 EvalResult e9")
    assert lines[2].startswith(f"krl.{run_id}.event.step UNDECODABLE StepSummary:")
    assert tap.returncode == 0


async def test_tap_json_prints_the_whole_message(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    tap = spawn("tap", f"krl.{run_id}.event.turn", "--nats", nats_server.url, "--json", "--count", "1", "--timeout", "30")
    assert "tap: watching" in await asyncio.to_thread(tap.stdout.readline)  # type: ignore[union-attr]
    await bus.publish(bus.subjects.event_turn, small_turn(run_id, 1))
    out, _ = await asyncio.to_thread(tap.communicate, timeout=30)
    record = orjson.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    assert record["type"] == "TurnEvent" and record["msg"]["event_id"] == f"{run_id}-turn-1"
