"""Runs across hosts: a broker-only server, a run joined from another process, and a three-node NATS cluster."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import nats.aio.msg
import orjson

from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings
from kernelrl.core.nats_server import free_port, local_cluster
from kernelrl.core.problems import builtin_problems
from kernelrl.core.run_dirs import latest_run

from helpers import command_env, count_lines, kernelrl_cmd, small_turn, wait_for

RELU = builtin_problems().get("level1/1_ReLU")


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(kernelrl_cmd(*args), cwd=cwd, env=command_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def stop(proc: subprocess.Popen[str], timeout_s: float = 90) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


class Results:
    def __init__(self) -> None:
        self.by_id: dict[str, m.EvalResult] = {}

    async def on_msg(self, msg: nats.aio.msg.Msg) -> None:
        result = m.codec_for(m.EvalResult).decode(msg.data)
        self.by_id[result.eval_id] = result


async def ask(bus: Bus, results: Results, reply_to: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        request = m.EvalRequest(eval_id=m.new_id(), run_id=bus.settings.run, problem_id=RELU.id,
                                candidate_source=RELU.solution or "", reply_to=reply_to)  # fmt: skip
        await bus.publish(bus.subjects.eval_request, request)
        ids.append(request.eval_id)
    return ids


async def test_a_second_run_process_joins_with_only_an_evaluator_and_answers_real_evaluations(tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    host_a.mkdir()
    host_b.mkdir()
    broker_and_logger = start(host_a, "run", "--run", "mh", "--roles", "logger", "--sample-steps", "0")
    evaluator_only: subprocess.Popen[str] | None = None
    try:
        await wait_for(lambda: (host_a / "runs" / "mh" / "nats.url").exists(), 60, "the broker's URL file")
        url = (host_a / "runs" / "mh" / "nats.url").read_text().strip()
        evaluator_only = start(host_b, "run", "--nats", url, "--run", "mh", "--roles", "evaluator")
        bus = await Bus.connect(BusSettings(url=url, run="mh"), name="test")
        try:
            results = Results()
            reply_to = bus.subjects.eval_result("gen-mh")
            await bus.nc.subscribe(reply_to, cb=results.on_msg)
            ids = await ask(bus, results, reply_to, 3)
            await wait_for(lambda: set(ids) <= set(results.by_id), 180, "three results from the joined evaluator")
            assert all(results.by_id[i].correctness for i in ids)
            await bus.publish(bus.subjects.event_turn, small_turn("mh", 1))  # and the first host's logger logs
            await wait_for(lambda: count_lines(host_a / "runs" / "mh" / "logs" / "turns.jsonl") == 1, 60, "the turn logged")
        finally:
            await bus.close()
        joined = latest_run(host_b / "runs")
        assert joined is not None and joined.run_id == "mh" and joined.url_file.read_text().strip() == url
    finally:
        codes = [stop(p) for p in (evaluator_only, broker_and_logger) if p is not None]
    assert [code for code, _ in codes] == [0, 0], [out[-2000:] for _, out in codes]


def test_joining_another_hosts_broker_needs_the_run_id(tmp_path: Path) -> None:
    done = subprocess.run(
        kernelrl_cmd("run", "--nats", "nats://127.0.0.1:9", "--roles", "evaluator"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=command_env(),
    )
    assert done.returncode == 2 and "--run ID" in done.stderr


async def test_kernelrl_server_runs_only_the_broker_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    server = start(tmp_path, "server", "--listen", f"127.0.0.1:{port}", "--store", str(tmp_path / "store"), "--name", "solo")
    try:
        url = f"nats://127.0.0.1:{port}"

        async def reachable() -> bool:
            try:
                bus = await Bus.connect(BusSettings(url=url, run="srv", connect_timeout_s=1), name="probe")
            except ConnectionError:
                return False
            await bus.provision()
            await bus.close()
            return True

        for _ in range(120):
            if await reachable():
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("kernelrl server never answered")
    finally:
        code, out = stop(server)
    assert code == 0, out
    assert f"NATS at nats://127.0.0.1:{port}" in out


async def test_a_three_node_cluster_with_replicas_3_loses_nothing_when_a_node_is_killed(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    nodes = await local_cluster(tmp_path, 3, "krl-test")
    urls = ",".join(node.url for node in nodes)
    run_id = "cluster"
    try:
        bus = await Bus.connect(BusSettings(url=urls, run=run_id, replicas=3, publish_deadline_s=60), name="test")
        try:
            await bus.provision()
            info = await bus.js.stream_info(bus.subjects.event_stream)
            assert info.config.num_replicas == 3
            common = ("--nats", urls, "--run", run_id, "--replicas", "3")
            logs = tmp_path / "logs"
            spawn("logger", *common, "--log-dir", str(logs), "--quiet", stdout=subprocess.DEVNULL)
            spawn("evaluator", *common, "--time-limit", "30", stdout=subprocess.DEVNULL)
            results = Results()
            reply_to = bus.subjects.eval_result("gen-cluster")
            await bus.nc.subscribe(reply_to, cb=results.on_msg)
            asked = await ask(bus, results, reply_to, 2)
            await bus.publish_many([(bus.subjects.event_turn, small_turn(run_id, i)) for i in range(300)])
            nodes[0].kill()  # SIGKILL one node mid-stream
            for i in range(300, 600):
                await bus.publish(bus.subjects.event_turn, small_turn(run_id, i))
            asked += await ask(bus, results, reply_to, 2)
            await wait_for(lambda: count_lines(logs / "turns.jsonl") >= 600, 180, "600 turns on disk")
            await wait_for(lambda: set(asked) <= set(results.by_id), 300, "every evaluation answered")
        finally:
            await bus.close()
        ids = [orjson.loads(line)["event_id"] for line in (logs / "turns.jsonl").read_bytes().splitlines()]
        assert len(ids) == len(set(ids)) == 600
        assert all(results.by_id[i].correctness for i in asked)
    finally:
        for node in nodes:
            await node.stop()
