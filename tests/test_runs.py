"""Runs as a user meets them: a directory per run, a findable broker that is supervised, a truthful exit status."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import orjson

from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings
from kernelrl.core.run_dirs import latest_run

from helpers import children_of, command_env, count_lines, kernelrl_cmd, small_turn, wait_for


def start_run(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """``kernelrl run`` with the sample event stream standing in for generator and rollouts (no model)."""
    argv = kernelrl_cmd("run", "--roles", "logger,evaluator,sample", *args)
    return subprocess.Popen(argv, cwd=cwd, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def command(cwd: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kernelrl_cmd(*args), cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout_s)


def stop(run: subprocess.Popen[str], timeout_s: float = 90) -> tuple[int, str]:
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=timeout_s)
    return run.returncode, out


async def wait_for_actors(cwd: Path, roles: set[str], timeout_s: float = 90) -> str:
    """``kernelrl status`` with no flags, until it lists these roles."""
    out = ""

    def listed() -> bool:
        nonlocal out
        done = command(cwd, "status", "--json")
        out = done.stdout
        return done.returncode == 0 and roles <= {orjson.loads(line)["role"] for line in out.splitlines() if line}

    for _ in range(int(timeout_s / 0.5)):
        if await asyncio.to_thread(listed):
            return out
        await asyncio.sleep(0.5)
    raise AssertionError(f"status never listed {roles}: {out}")


async def test_each_run_gets_its_own_directory_and_status_finds_the_latest_without_flags(tmp_path: Path) -> None:
    first = start_run(tmp_path, "--sample-steps", "1")
    code, out = await asyncio.to_thread(first.communicate, timeout=180)
    assert first.returncode == 0, out
    first_dir = latest_run(tmp_path / "runs")
    assert first_dir is not None and (first_dir.logs / "steps.jsonl").exists()
    second = start_run(tmp_path, "--sample-steps", "0")
    try:
        status = await wait_for_actors(tmp_path, {"logger", "evaluator"})
        second_dir = latest_run(tmp_path / "runs")
        assert second_dir is not None and second_dir.run_id != first_dir.run_id
        assert all(orjson.loads(line)["run_id"] == second_dir.run_id for line in status.splitlines() if line)
        url = second_dir.url_file.read_text().strip()
        assert url.startswith("nats://127.0.0.1:")
    finally:
        code, out = await asyncio.to_thread(stop, second)
    assert code == 0, out
    assert count_lines(first_dir.logs / "steps.jsonl") == 1  # the second run wrote nothing into the first's files
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([first_dir.run_id, second_dir.run_id, "latest"])


async def test_a_killed_broker_is_restarted_nothing_acknowledged_is_lost_and_the_run_exits_0(tmp_path: Path) -> None:
    run = start_run(tmp_path, "--sample-steps", "0")
    try:
        await wait_for_actors(tmp_path, {"logger"})
        run_dir = latest_run(tmp_path / "runs")
        assert run_dir is not None
        url = run_dir.url_file.read_text().strip()
        bus = await Bus.connect(BusSettings(url=url, run=run_dir.run_id, publish_deadline_s=60), name="test")
        try:
            await bus.publish_many([(bus.subjects.event_turn, small_turn(run_dir.run_id, i)) for i in range(200)])
            (server,) = children_of(run.pid, "nats-server")
            os.kill(server, signal.SIGKILL)
            for i in range(200, 400):  # each publish is retried until the restarted server acknowledges it
                await bus.publish(bus.subjects.event_turn, small_turn(run_dir.run_id, i))
        finally:
            await bus.close()
        turns = run_dir.logs / "turns.jsonl"
        await wait_for(lambda: count_lines(turns) >= 400, 120, "all 400 turns on disk")
        ids = [orjson.loads(line)["event_id"] for line in turns.read_bytes().splitlines()]
        assert len(ids) == len(set(ids)) == 400
        assert children_of(run.pid, "nats-server") != [server]  # a new server process
    finally:
        code, out = await asyncio.to_thread(stop, run)
    assert code == 0, out
    assert "NATS server exited" in out and "restarting" in out


async def test_a_broker_that_cannot_come_back_stops_the_run_with_a_summary_and_exit_1(tmp_path: Path) -> None:
    run = start_run(tmp_path, "--sample-steps", "0")
    holder: socket.socket | None = None
    try:
        await wait_for_actors(tmp_path, {"logger"})
        run_dir = latest_run(tmp_path / "runs")
        assert run_dir is not None
        port = int(run_dir.url_file.read_text().strip().rsplit(":", 1)[1])
        (server,) = children_of(run.pid, "nats-server")
        os.kill(server, signal.SIGKILL)
        await wait_for(lambda: not Path(f"/proc/{server}/cmdline").exists() or not children_of(run.pid, "nats-server"),
                       10, "the server to die")  # fmt: skip
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # something else now holds the port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        out, _ = await asyncio.to_thread(run.communicate, timeout=180)
    finally:
        if holder is not None:
            holder.close()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, out
    assert "nats-server" in out and "stopped because" in out


def test_an_unreachable_broker_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    url = "nats://127.0.0.1:9"
    for args in (("status", "--nats", url), ("tap", "--nats", url), ("evaluator", "--nats", url), ("logger", "--nats", url,
                 "--log-dir", str(tmp_path / "logs"))):  # fmt: skip
        done = command(tmp_path, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and "INFO" not in line]
        assert len(lines) == 1 and url in lines[0] and "Traceback" not in done.stderr, (args, lines)
