"""The logger actor: every event exactly once on disk, through crashes, restarts and a full disk."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from kernelrl.actors.console import format_eval_block
from kernelrl.actors.logger import LoggerActor
from kernelrl.actors.sample_events import sample_run
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings, LoggerSettings, SampleSettings
from kernelrl.core.nats_server import EmbeddedNatsServer

from helpers import count_lines, small_turn, wait_for


def read_ids(path: Path) -> list[str]:
    """Every record's event_id; fails on any line that is not one whole JSON record."""
    return [orjson.loads(line)["event_id"] for line in path.read_bytes().splitlines()]


def logger_args(url: str, run_id: str, log_dir: Path) -> list[str]:
    return ["logger", "--nats", url, "--run", run_id, "--log-dir", str(log_dir)]


async def test_ten_thousand_events_are_written_exactly_once_and_sigterm_exits_0(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    sample = list(sample_run(run_id, SampleSettings(steps=1, groups=2, samples=2)))
    turns = [(bus.subjects.event_turn, small_turn(run_id, i)) for i in range(10_000)]
    await bus.publish_many([*turns, *sample])
    console = open(tmp_path / "console.txt", "w")
    log_dir = tmp_path / "logs"
    proc = spawn(*logger_args(nats_server.url, run_id, log_dir), stdout=console)
    expected_turns = 10_000 + sum(isinstance(msg, m.TurnEvent) for _, msg in sample)
    await wait_for(lambda: count_lines(log_dir / "turns.jsonl") >= expected_turns, 60, "10,000 turns on disk")
    await wait_for(lambda: (log_dir / "eval_logs" / "eval_step_0001.json").exists(), 10, "the eval summary")

    ids = read_ids(log_dir / "turns.jsonl")
    assert len(ids) == len(set(ids)) == expected_turns
    assert {f"{run_id}-turn-{i}" for i in range(10_000)} <= set(ids)
    n_traj = sum(isinstance(msg, m.TrajectoryEvent) for _, msg in sample)
    assert len(read_ids(log_dir / "trajectories.jsonl")) == n_traj
    assert len(read_ids(log_dir / "steps.jsonl")) == 1
    assert orjson.loads((log_dir / "eval_logs" / "eval_step_0001.json").read_bytes())["accuracy"] == 0.5

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    console.close()
    text = (tmp_path / "console.txt").read_text()
    assert "[Turn 1] level1/0_Op: Compile:✗ Correct:✗ Runtime:n/a Speedup:0.00x Reward:0.000" in text
    assert "=== Final Trajectory Summary for" in text
    assert "Eval stats saved to:" in text
    info = await bus.js.consumer_info(bus.subjects.event_stream, s.LOGGER_CONSUMER)
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_logger_killed_mid_stream_and_restarted_writes_each_event_once_with_no_torn_line(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    n = 6000
    log_dir = tmp_path / "logs"
    publisher = asyncio.create_task(bus.publish_many((bus.subjects.event_turn, small_turn(run_id, i)) for i in range(n)))
    first = spawn(*logger_args(nats_server.url, run_id, log_dir), stdout=subprocess.DEVNULL)
    await wait_for(lambda: count_lines(log_dir / "turns.jsonl") >= 1500, 60, "the first logger to write")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = count_lines(log_dir / "turns.jsonl")
    await publisher
    second = spawn(*logger_args(nats_server.url, run_id, log_dir), stdout=subprocess.DEVNULL)
    await wait_for(lambda: count_lines(log_dir / "turns.jsonl") >= n, 60, "the second logger to catch up")
    await asyncio.sleep(1.0)  # anything written twice would show up now
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 0
    ids = read_ids(log_dir / "turns.jsonl")
    assert killed_at < n
    assert len(ids) == n and set(ids) == {f"{run_id}-turn-{i}" for i in range(n)}


async def test_nats_server_killed_and_restarted_mid_stream_loses_nothing(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    n, run_id = 3000, "restart"
    log_dir = tmp_path / "logs"
    async with EmbeddedNatsServer(tmp_path / "nats") as server:
        bus = await Bus.connect(BusSettings(url=server.url, run=run_id), name="test-publisher")
        try:
            await bus.provision()
            logger = spawn(*logger_args(server.url, run_id, log_dir), stdout=subprocess.DEVNULL)
            for i in range(n // 3):
                await bus.publish(bus.subjects.event_turn, small_turn(run_id, i))
            server.kill()
            restarted = asyncio.create_task(asyncio.sleep(1.0))
            # publishes during the outage are retried until the server is back
            publishing = asyncio.create_task(
                bus.publish_many((bus.subjects.event_turn, small_turn(run_id, i)) for i in range(n // 3, n))
            )
            await restarted
            await server.start()
            await publishing
            stored = await bus.js.stream_info(bus.subjects.event_stream)
            assert stored.state.messages == n  # the server lost nothing it acknowledged (sync_interval: always)
            await wait_for(lambda: count_lines(log_dir / "turns.jsonl") >= n, 60, "every event on disk after the restart")
            await asyncio.sleep(0.5)
            logger.send_signal(signal.SIGTERM)
            assert logger.wait(timeout=15) == 0
        finally:
            await bus.close()
    ids = read_ids(log_dir / "turns.jsonl")
    assert len(ids) == n and set(ids) == {f"{run_id}-turn-{i}" for i in range(n)}


async def run_logger_until(
    bus: Bus, settings: LoggerSettings, done: Callable[[LoggerActor], bool], timeout_s: float = 30
) -> LoggerActor:
    actor = LoggerActor(bus, settings, out=io.StringIO())
    stopping = asyncio.Event()
    task = asyncio.create_task(actor.run(stopping))
    try:
        await wait_for(lambda: done(actor) or task.done(), timeout_s, "the logger")
    finally:
        stopping.set()
        await task
    return actor


async def test_torn_last_line_is_repaired_and_an_event_already_on_disk_is_not_written_again(
    bus: Bus, run_id: str, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    on_disk, torn, fresh = (small_turn(run_id, i) for i in range(3))
    codec = m.codec_for(m.TurnEvent)
    (log_dir / "turns.jsonl").write_bytes(codec.encode(on_disk) + b"\n" + codec.encode(torn)[:57])
    await bus.publish_many([(bus.subjects.event_turn, t) for t in (on_disk, torn, fresh)])
    actor = await run_logger_until(
        bus,
        LoggerSettings(log_dir=str(log_dir)),
        lambda a: a.counters["written_TurnEvent"] + a.counters["duplicates_skipped"] >= 3,
    )
    assert actor.counters["duplicates_skipped"] == 1
    assert read_ids(log_dir / "turns.jsonl") == [on_disk.event_id, torn.event_id, fresh.event_id]


async def test_full_disk_leaves_events_unacked_in_jetstream_and_they_are_written_later(
    bus: Bus, run_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "turns.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    await bus.publish_many([(bus.subjects.event_turn, small_turn(run_id, i)) for i in range(50)])
    settings = LoggerSettings(log_dir=str(log_dir), retry_backoff_s=0.2)
    with caplog.at_level(logging.ERROR):
        actor = await run_logger_until(bus, settings, lambda a: a.counters["write_errors"] >= 2)
    assert actor.counters["written_TurnEvent"] == 0
    assert any("No space left on device" in r.getMessage() and "turns.jsonl" in r.getMessage() for r in caplog.records)
    assert any("disk full" in r.getMessage() for r in caplog.records)
    info = await bus.js.consumer_info(bus.subjects.event_stream, s.LOGGER_CONSUMER)
    assert info.ack_floor.stream_seq == 0  # nothing was acknowledged

    (log_dir / "turns.jsonl").unlink()  # space is back
    await run_logger_until(bus, settings, lambda a: a.counters["written_TurnEvent"] >= 50)
    ids = read_ids(log_dir / "turns.jsonl")
    assert len(ids) == 50 and len(set(ids)) == 50


async def test_unwritable_log_directory_is_a_clear_error_and_events_stay_in_the_stream(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    await bus.publish(bus.subjects.event_turn, small_turn(run_id, 0))
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    proc = await asyncio.create_subprocess_exec(
        *__import__("helpers").kernelrl_cmd(*logger_args(nats_server.url, run_id, not_a_dir / "logs")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert f"log directory {not_a_dir / 'logs'} is not writable" in out.decode()
    info = await bus.js.stream_info(bus.subjects.event_stream)
    assert info.state.messages == 1


@pytest.mark.parametrize("verbose_env", ["", "true"])
async def test_console_is_concise_by_default_and_detailed_with_verbose_env(
    bus: Bus, run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbose_env: str
) -> None:
    monkeypatch.setenv("VERBOSE", verbose_env)
    step = next(msg for _, msg in sample_run(run_id, SampleSettings(steps=1)) if isinstance(msg, m.StepSummary))
    await bus.publish(bus.subjects.event_step, step)
    actor = await run_logger_until(bus, LoggerSettings(log_dir=str(tmp_path)), lambda a: a.counters["written_StepSummary"] == 1)
    text = actor.out.getvalue()  # type: ignore[attr-defined]
    assert "Step 1/1" in text or "STEP 1/1" in text
    assert ("Turn-by-Turn Advantage Table:" in text) == (verbose_env == "true")
    assert ("Groups kept for training" in text) == (verbose_env == "true")


async def test_two_eval_summaries_for_one_step_both_survive_and_a_redelivery_overwrites_nothing(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    first = m.EvalSummary(event_id=f"{run_id}-eval-a", step=3, accuracy=0.25, correct_answers=1, total_samples=4)
    second = m.EvalSummary(event_id=f"{run_id}-eval-b", step=3, accuracy=0.75, correct_answers=3, total_samples=4)
    log_dir = tmp_path / "logs"
    proc = spawn(*logger_args(nats_server.url, run_id, log_dir), stdout=subprocess.DEVNULL)
    await bus.publish(bus.subjects.event_eval, first)
    await wait_for(lambda: (log_dir / "eval_logs" / "eval_step_0003.json").exists(), 30, "the first summary")
    await bus.publish_core(bus.subjects.event_eval, first)  # the same summary again (not deduplicated by JetStream)
    await bus.publish(bus.subjects.event_eval, second)
    await wait_for(lambda: len(list((log_dir / "eval_logs").glob("eval_step_0003*.json"))) == 2, 30, "the second summary")
    files = sorted((log_dir / "eval_logs").glob("eval_step_0003*.json"))
    accuracies = sorted(orjson.loads(f.read_bytes())["accuracy"] for f in files)
    assert accuracies == [0.25, 0.75]
    assert orjson.loads((log_dir / "eval_logs" / "eval_step_0003.json").read_bytes())["event_id"] == first.event_id
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


async def test_the_logger_prints_the_eval_block_that_kernelrl_eval_prints(bus: Bus, run_id: str, tmp_path: Path) -> None:
    extra = {"samples_file": "eval_step_0003.samples.jsonl", "n_problems": 2}
    summary = m.EvalSummary(event_id=f"{run_id}-eval", step=3, accuracy=0.5, correct_answers=2, total_samples=4, compiled=3,
                            attempted_answer=3, extra=extra)  # fmt: skip
    (tmp_path / "eval_logs").mkdir()
    (tmp_path / "eval_logs" / "eval_step_0003.samples.jsonl").write_bytes(b"")  # kernelrl eval writes it, then publishes
    await bus.publish(bus.subjects.event_eval, summary)
    actor = await run_logger_until(bus, LoggerSettings(log_dir=str(tmp_path)), lambda a: a.counters["written_EvalSummary"] == 1)
    text = actor.out.getvalue()  # type: ignore[attr-defined]
    eval_logs = tmp_path / "eval_logs"
    block = format_eval_block(summary, str(eval_logs / "eval_step_0003.json"), str(eval_logs / "eval_step_0003.samples.jsonl"))
    assert block in text and "   Attempted answers: 3/4 (75.0%)" in text
    assert orjson.loads((eval_logs / "eval_step_0003.json").read_bytes())["attempted_answer"] == 3
