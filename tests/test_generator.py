"""The generator over a real nats-server, a real CPU evaluator and a real logger, with the replay backend."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from transformers import AutoTokenizer, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from kernelrl.actors.gen_backend import Completion, Generation
from kernelrl.actors.gen_policy import TurnGate
from kernelrl.core import messages as m
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus
from kernelrl.core.config import BusSettings, Config, GeneratorSettings, WorkSettings
from kernelrl.core.consumers import consumer_table
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems
from kernelrl.core.run_dirs import latest_run
from kernelrl.core.subjects import POLICY_LATEST_KEY

from helpers import command_env, count_lines, kernelrl_cmd, wait_for
from test_gen_hf import recompute_logprobs
from tiny_model import tiny_model_dir

RELU = builtin_problems().get("level1/1_ReLU")
CORRECT = RELU.solution or ""
WRONG = CORRECT.replace("y = tl.maximum(x, 0.0)", "y = tl.maximum(x, 1.0)")  # allowed code, wrong outputs


def answer(code: str) -> str:
    return f"Here is my kernel.\n```python\n{code}```\nIt uses one Triton kernel."


def replay_log(path: Path, responses: list[str], problem_id: str = RELU.id) -> Path:
    """A turns.jsonl whose turn t answered ``responses[t]`` for ``problem_id``."""
    with path.open("wb") as f:
        for t, response in enumerate(responses):
            data = m.TurnData(response=response, response_token_ids=[t, t + 1], response_logprobs=[-0.5, -0.25])
            event = m.TurnEvent(event_id=f"logged-{t}", timestamp="20250101_000000_000000", instance_id=problem_id, turn_idx=t,
                                turn_data=data)  # fmt: skip
            f.write(m.codec_for(m.TurnEvent).encode(event) + b"\n")
    return path


def rollout(run_id: str, request_id: str, max_turns: int = 3) -> m.RolloutRequest:
    return m.RolloutRequest(request_id=request_id, run_id=run_id, problem_id=RELU.id, group_id="g1", sample_idx=0,
                            n_samples=1, max_turns=max_turns)  # fmt: skip


@pytest.fixture
async def run_bus(nats_server: EmbeddedNatsServer, run_id: str) -> AsyncIterator[Bus]:
    """The run provisioned with a generator consumer that redelivers 4 s after a lost generator's last sign of life."""
    bus = await Bus.connect(BusSettings(url=nats_server.url, run=run_id, publish_deadline_s=30), name="test")
    work = WorkSettings(ack_wait_s=4.0, max_deliver=3, in_progress_interval_s=1.0)
    await bus.provision(consumer_table(Config(bus=bus.settings, generator=GeneratorSettings(work=work))))
    yield bus
    await bus.close()


def roles(spawn: Callable[..., subprocess.Popen[str]], url: str, run_id: str, log_dir: Path) -> list[subprocess.Popen[str]]:
    common = ["--nats", url, "--run", run_id]
    return [
        spawn("evaluator", *common, "--time-limit", "30", stdout=subprocess.DEVNULL),
        spawn("logger", *common, "--log-dir", str(log_dir), "--quiet", stdout=subprocess.DEVNULL),
    ]


def generator(spawn: Callable[..., subprocess.Popen[str]], url: str, run_id: str, log: Path) -> subprocess.Popen[str]:
    return spawn("generator", "--nats", url, "--run", run_id, "--backend", "replay", "--replay-log", str(log),
                 stdout=subprocess.DEVNULL)  # fmt: skip


def records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_a_correct_kernel_on_turn_2_ends_the_dialogue_as_a_success(
    run_bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", ["I am not sure how to do this.", answer(CORRECT), answer(WRONG)])
    logs = tmp_path / "logs"
    roles(spawn, nats_server.url, run_id, logs)
    gen = generator(spawn, nats_server.url, run_id, log)
    await run_bus.publish(run_bus.subjects.rollout_request, rollout(run_id, "req-success"))
    await wait_for(lambda: count_lines(logs / "trajectories.jsonl") >= 1, 180, "the trajectory in the log")
    (trajectory,) = records(logs / "trajectories.jsonl")
    turns = sorted(records(logs / "turns.jsonl"), key=lambda t: t["turn_idx"])  # type: ignore[arg-type,return-value]
    assert trajectory["event_id"] == "traj-req-success" and trajectory["request_id"] == "req-success"
    assert trajectory["termination_reason"] == "success" and trajectory["num_turns"] == 2
    assert trajectory["turn_rewards"] == pytest.approx([0.0, 0.4])  # no code; correct on the interpreter (no speedup)
    assert trajectory["turn_returns"] == pytest.approx([0.0 + 0.4 * 0.4, 0.4])
    assert trajectory["aggregated_return"] == pytest.approx(0.16)
    assert trajectory["response_token_ids"] == [[0, 1], [1, 2]]  # as the backend gave them
    assert [t["turn_data"]["eval_result"]["error_kind"] for t in turns] == ["no_code", ""]  # type: ignore[index]
    assert turns[1]["turn_data"]["eval_result"]["correctness"] is True  # type: ignore[index]
    assert turns[1]["turn_data"]["kernel_code"] == CORRECT  # type: ignore[index]
    prompt = turns[1]["turn_data"]["prompt"][1]["content"]  # type: ignore[index]
    assert "### Attempt 1" in prompt and "held no ```python block" in prompt  # turn 2 saw turn 1's verdict
    gen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gen.wait, 60) == 0


async def test_a_generator_killed_mid_dialogue_leaves_the_request_to_another_and_one_trajectory(
    run_bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", [answer(WRONG), answer(WRONG), answer(CORRECT)])
    logs = tmp_path / "logs"
    roles(spawn, nats_server.url, run_id, logs)
    first = generator(spawn, nats_server.url, run_id, log)
    await run_bus.publish(run_bus.subjects.rollout_request, rollout(run_id, "req-killed"))
    await wait_for(lambda: count_lines(logs / "turns.jsonl") >= 1, 180, "the first generator's first turn")
    first.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 30)
    generator(spawn, nats_server.url, run_id, log)
    await wait_for(lambda: count_lines(logs / "trajectories.jsonl") >= 1, 180, "the trajectory from the second generator")
    await asyncio.sleep(5.0)  # room for a duplicate to arrive
    (trajectory,) = records(logs / "trajectories.jsonl")
    assert trajectory["request_id"] == "req-killed" and trajectory["num_turns"] == 3
    assert trajectory["termination_reason"] == "success"
    attempts = {t["turn_data"]["extra_info"]["attempt"] for t in records(logs / "turns.jsonl")}  # type: ignore[index]
    assert attempts == {1, 2}  # the second generator redid it from the start


async def test_a_request_finished_twice_is_one_trajectory(
    run_bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", [answer(CORRECT)])
    logs = tmp_path / "logs"
    roles(spawn, nats_server.url, run_id, logs)
    generator(spawn, nats_server.url, run_id, log)
    request = rollout(run_id, "req-twice")
    payload = m.codec_for(m.RolloutRequest).encode(request)
    for copy in ("a", "b"):  # the same request stored twice (as after a lost publish acknowledgement and a retry)
        await run_bus.js.publish(run_bus.subjects.rollout_request, payload,
                                 headers={TYPE_HEADER: "RolloutRequest", MSG_ID_HEADER: f"req-twice-{copy}"})  # fmt: skip

    async def both_done() -> bool:
        return (await run_bus.js.stream_info(run_bus.subjects.rollout_stream)).state.messages == 0

    for _ in range(600):
        if await both_done():
            break
        await asyncio.sleep(0.3)
    assert await both_done(), "both copies of the request were not finished"
    await wait_for(lambda: count_lines(logs / "trajectories.jsonl") >= 1, 60, "the trajectory")
    await asyncio.sleep(3.0)
    assert [t["request_id"] for t in records(logs / "trajectories.jsonl")] == ["req-twice"]
    assert count_lines(logs / "turns.jsonl") == 1  # the same ids both times: one turn and one trajectory in the log


async def test_kernelrl_run_publishes_rollouts_and_ends_once_their_trajectories_are_logged(tmp_path: Path) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", [answer(WRONG), answer(CORRECT)])
    argv = kernelrl_cmd(
        "run", "--runs-root", str(tmp_path / "runs"), "--roles", "logger,evaluator,generator,rollouts",
        "--set", 'generator.backend="replay"',
        "--set", f"generator.replay_log={log}", "--set", f'rollout.problems=["{RELU.id}"]', "--set", "rollout.n_samples=2",
    )  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, argv, cwd=tmp_path, env=command_env(), capture_output=True, text=True,
                                   timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = latest_run(tmp_path / "runs")
    assert run_dir is not None
    trajectories = records(run_dir.logs / "trajectories.jsonl")
    assert sorted(t["sample_idx"] for t in trajectories) == [0, 1]  # type: ignore[type-var]
    assert {t["group_id"] for t in trajectories} == {trajectories[0]["group_id"]}  # one GRPO group
    assert all(t["termination_reason"] == "success" and t["num_turns"] == 2 for t in trajectories)


async def test_an_update_waits_for_turns_being_sampled_and_holds_new_ones_back() -> None:
    gate = TurnGate()
    order: list[str] = []
    sampling = asyncio.Event()
    release = asyncio.Event()

    async def turn(name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.turn():
            order.append(f"{name} starts")
            if hold is not None:
                sampling.set()
                await hold.wait()
            order.append(f"{name} ends")

    async def update() -> None:
        async with gate.update():
            order.append("update")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(turn("t1", release))
        await sampling.wait()
        tg.create_task(update())
        await asyncio.sleep(0.05)
        tg.create_task(turn("t2"))  # arrives while the update waits: goes after it
        await asyncio.sleep(0.05)
        assert order == ["t1 starts"]
        release.set()
    assert order == ["t1 starts", "t1 ends", "update", "t2 starts", "t2 ends"]


async def test_turns_record_the_policy_version_the_generator_applied(
    run_bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    log = replay_log(tmp_path / "replayed.jsonl", [answer(CORRECT)])
    logs = tmp_path / "logs"
    roles(spawn, nats_server.url, run_id, logs)
    kv = await run_bus.kv(run_bus.subjects.policy_bucket)
    update = m.PolicyUpdate(version=3, path=str(tmp_path), sha256="", run_id=run_id)
    await kv.put(POLICY_LATEST_KEY, m.codec_for(m.PolicyUpdate).encode(update))
    generator(spawn, nats_server.url, run_id, log)
    await asyncio.sleep(4.0)  # the generator starts and reads the bucket
    await run_bus.publish(run_bus.subjects.rollout_request, rollout(run_id, "req-v3"))
    await wait_for(lambda: count_lines(logs / "trajectories.jsonl") >= 1, 180, "the trajectory")
    (trajectory,) = records(logs / "trajectories.jsonl")
    (turn,) = records(logs / "turns.jsonl")
    assert trajectory["policy_version"] == 3 and turn["policy_version"] == 3


@pytest.mark.parametrize(("backend", "atol"), [("hf", 1e-4), ("vllm", 1e-3)])
async def test_a_dialogue_with_a_model_backend_records_what_the_model_saw_and_sampled(
    run_bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory, backend: str, atol: float,
) -> None:  # fmt: skip
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here")
    model_dir = tiny_model_dir(tmp_path_factory)
    logs = tmp_path / "logs"
    roles(spawn, nats_server.url, run_id, logs)
    sampling = ["--set", "generator.sampling.temperature=0.8", "--set", "generator.sampling.top_k=20",
                "--set", "generator.sampling.max_new_tokens=12"]  # fmt: skip
    spawn("generator", "--nats", nats_server.url, "--run", run_id, "--backend", backend, "--model", str(model_dir), *sampling,
          stdout=subprocess.DEVNULL)  # fmt: skip
    await run_bus.publish(run_bus.subjects.rollout_request, rollout(run_id, f"req-{backend}"))
    await wait_for(lambda: count_lines(logs / "trajectories.jsonl") >= 1, 300, "the trajectory")
    (trajectory,) = records(logs / "trajectories.jsonl")
    turns = sorted(records(logs / "turns.jsonl"), key=lambda t: t["turn_idx"])  # type: ignore[arg-type,return-value]
    assert trajectory["termination_reason"] == "all_failed" and trajectory["num_turns"] == 2  # it writes nonsense
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20)])
    for t, turn in enumerate(turns):
        prompt = [{"role": c["role"], "content": c["content"]} for c in turn["turn_data"]["prompt"]]  # type: ignore[index]
        template = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert trajectory["prompt_token_ids"][t] == turn["turn_data"]["prompt_token_ids"] == list(template)  # type: ignore[index]
        response_ids = trajectory["response_token_ids"][t]  # type: ignore[index]
        generation = Generation(prompt_token_ids=list(template), policy_version=0,
                                completions=[Completion(text="", token_ids=response_ids, logprobs=[])])  # fmt: skip
        (expected,) = recompute_logprobs(model_dir, generation, processors)
        assert trajectory["response_logprobs"][t] == pytest.approx(expected, abs=atol)  # type: ignore[index]
        assert tokenizer.decode(response_ids, skip_special_tokens=True) == turn["turn_data"]["response"]  # type: ignore[index]


def test_a_seeded_run_gives_each_turn_of_each_rollout_its_own_reproducible_seed() -> None:
    from kernelrl.actors.generator import turn_sampling
    from kernelrl.core.config import SamplingSettings

    seeded = SamplingSettings(seed=7)
    seeds = {turn_sampling(seeded, f"r1-p0-s{i}", t).seed for i in range(4) for t in range(3)}
    assert len(seeds) == 12  # a group's members (and a dialogue's turns) do not sample alike
    assert turn_sampling(seeded, "r1-p0-s0", 0) == turn_sampling(seeded, "r1-p0-s0", 0)
    assert turn_sampling(SamplingSettings(seed=8), "r1-p0-s0", 0).seed != turn_sampling(seeded, "r1-p0-s0", 0).seed
    assert turn_sampling(SamplingSettings(), "r1-p0-s0", 0).seed is None
