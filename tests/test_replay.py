"""``kernelrl replay`` over a real nats-server: to eval with a real CPU evaluator, to buffer with an in-process buffer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import orjson
import pytest

from kernelrl.actors.buffer import BufferActor, read_buffer_state
from kernelrl.actors.replay import compare_verdicts, speedup_noise
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus, PullConsumer
from kernelrl.core.config import BufferSettings, Config, RewardConfig
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems

from helpers import command_env

RELU = builtin_problems().get("level1/1_ReLU")
CORRECT = RELU.solution or ""
WRONG = CORRECT.replace("y = tl.maximum(x, 0.0)", "y = tl.maximum(x, 1.0)")  # allowed code, wrong outputs
CHEAT = CORRECT.replace("        return out", "        return torch.relu(x)")  # a torch fallback the gate rejects

CORRECT_VERDICT = m.EvalResult(compiled=True, correctness=True, interpreter=True, speedup=1.0, device="cpu (Triton interpreter)")
MISMATCH_VERDICT = m.EvalResult(compiled=True, error_kind="mismatch", error_message="output 0 differs")


def replay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kernelrl.bin.replay", *args]


async def run_cmd(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=600)


def turn(event_id: str, code: str, logged: m.EvalResult, problem: str = RELU.id, turn_idx: int = 0) -> bytes:
    event = m.TurnEvent(event_id=event_id, timestamp="20250101_000000_000000", instance_id=problem, turn_idx=turn_idx,
                        turn_data=m.TurnData(kernel_code=code, eval_result=logged), run_id="old-run",
                        trajectory_id=f"traj-of-{event_id}")  # fmt: skip
    return m.codec_for(m.TurnEvent).encode(event) + b"\n"


# ---------------------------------------------------------------- the change rule


def test_a_verdict_changes_by_correctness_compilation_error_kind_and_speedup_beyond_the_noise() -> None:
    timed = m.EvalResult(compiled=True, correctness=True, speedup=1.0, runtime_stats={"mean": 1.0, "std": 0.01})
    assert compare_verdicts(timed, timed) == []
    assert compare_verdicts(timed, MISMATCH_VERDICT) == ["correct_to_wrong", "error_kind"]
    assert compare_verdicts(MISMATCH_VERDICT, timed) == ["wrong_to_correct", "error_kind"]
    forbidden = m.EvalResult(error_kind="forbidden")
    assert compare_verdicts(timed, forbidden) == ["correct_to_wrong", "no_longer_compiles", "error_kind"]
    assert compare_verdicts(MISMATCH_VERDICT, m.EvalResult(compiled=True, error_kind="mismatch", error_message="other")) == []
    # noise: max(10 %, 3 x cv); cv = 0.01 here, so 10 %
    assert compare_verdicts(timed, msgspec_replace(timed, speedup=1.09)) == []
    assert compare_verdicts(timed, msgspec_replace(timed, speedup=1.2)) == ["faster"]
    assert compare_verdicts(timed, msgspec_replace(timed, speedup=0.8)) == ["slower"]
    noisy = msgspec_replace(timed, speedup=1.2, runtime_stats={"mean": 2.0, "std": 0.2})  # cv 0.1: noise is 30 %
    assert speedup_noise(timed, noisy) == pytest.approx(0.3)
    assert compare_verdicts(timed, noisy) == []
    assert compare_verdicts(timed, msgspec_replace(noisy, speedup=1.4)) == ["faster"]
    # interpreter timings are not timings: no speedup change between them
    assert compare_verdicts(CORRECT_VERDICT, msgspec_replace(CORRECT_VERDICT, speedup=3.0)) == []


def msgspec_replace(result: m.EvalResult, **changes: object) -> m.EvalResult:
    return msgspec.structs.replace(result, **changes)


# ---------------------------------------------------------------- to eval


async def test_replay_to_eval_reports_exactly_the_verdicts_an_older_rule_got_wrong(
    bus: Bus, run_id: str, nats_server: EmbeddedNatsServer, spawn: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    logs = tmp_path / "runs" / "old-run" / "logs"
    logs.mkdir(parents=True)
    (logs / "turns.jsonl").write_bytes(
        turn("still-correct", CORRECT, CORRECT_VERDICT)
        + turn("was-wrong", CORRECT, MISMATCH_VERDICT, turn_idx=1)  # the older rule rejected a correct kernel
        + turn("was-correct", CHEAT, CORRECT_VERDICT)  # the older rule let a torch fallback through
        + turn("still-wrong", WRONG, MISMATCH_VERDICT)
        + turn("no-code", "", m.EvalResult(error_kind="no_code"))
        + turn("gone", CORRECT, CORRECT_VERDICT, problem="level1/999_NotThere")
        + turn("never-judged", CORRECT, m.EvalResult(error_kind="eval_timeout"))  # no verdict then: nothing to compare
        + b'{"event_id": "torn", "turn_da\n'
    )
    evaluator_log = tmp_path / "evaluator.log"
    with evaluator_log.open("w") as log:  # kept for the failure message: a lost verdict should say why
        spawn("evaluator", "--nats", nats_server.url, "--run", run_id, "--time-limit", "30", stdout=log)
    output = tmp_path / "changes.jsonl"
    # a verdict that never comes is an eval timeout in the summary, well before the command's own time runs out
    done = await run_cmd(replay_cmd(str(logs.parent), "--to", "eval", "--nats", nats_server.url, "--run", run_id,
                                    "--replay-id", "r1", "--output", str(output), "--max-in-flight", "2",
                                    "--eval-timeout", "200"), tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + "\nevaluator:\n" + evaluator_log.read_text()[-5000:]
    lines = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    *changes, summary = lines
    by_event = {c["event_id"]: c for c in changes}
    assert set(by_event) == {"was-wrong", "was-correct"}
    assert by_event["was-wrong"]["changes"] == ["wrong_to_correct", "error_kind"]
    assert by_event["was-wrong"]["turn_idx"] == 1 and by_event["was-wrong"]["problem_id"] == RELU.id
    assert by_event["was-wrong"]["old"]["error_kind"] == "mismatch" and by_event["was-wrong"]["new"]["correctness"] is True
    assert by_event["was-correct"]["changes"] == ["correct_to_wrong", "no_longer_compiles", "error_kind"]
    assert by_event["was-correct"]["new"]["error_kind"] == "forbidden"
    assert by_event["was-correct"]["eval_id"] == "replay-r1-was-correct"
    assert summary["record"] == "summary" and summary["run_id"] == run_id
    counts = {k: summary[k] for k in ("turns_read", "no_code", "old_no_verdict", "replayed", "unchanged", "changed",
                                      "missing_problems", "errors", "malformed_lines", "other_device")}  # fmt: skip
    assert counts == {"turns_read": 7, "no_code": 1, "old_no_verdict": 1, "replayed": 4, "unchanged": 2, "changed": 2,
                      "missing_problems": 1, "errors": 0, "malformed_lines": 1, "other_device": 0}  # fmt: skip
    assert summary["changed_by_kind"] == {"correct_to_wrong": 1, "error_kind": 2, "no_longer_compiles": 1, "wrong_to_correct": 1}
    assert summary["missing_problem_ids"] == ["level1/999_NotThere"]
    assert "was-wrong" in done.stdout and "wrong_to_correct,error_kind" in done.stdout  # the terminal table

    # --device: verdicts from a device that does not match are not compared (the queue cannot be steered)
    again = await run_cmd(replay_cmd(str(logs), "--to", "eval", "--nats", nats_server.url, "--run", run_id, "--replay-id", "r2",
                                     "--device", "H100"), tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    *_, summary2 = [orjson.loads(line) for line in (logs / "replay_eval.jsonl").read_bytes().splitlines()]
    assert (summary2["replayed"], summary2["other_device"], summary2["changed"]) == (0, 4, 0)


# ---------------------------------------------------------------- to buffer


class InProcessBuffer:
    def __init__(self, bus: Bus, config: Config) -> None:
        self.actor = BufferActor(bus, config, builtin_problems())
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self.actor.run(self.stopping))

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def actor_bus(bus: Bus) -> AsyncIterator[Bus]:
    """The buffer's own connection to the run the ``bus`` fixture provisioned."""
    b = await Bus.connect(bus.settings, name="buffer")
    yield b
    await b.close()


async def take(consumer: PullConsumer[m.Message], count: int, timeout_s: float = 30.0) -> list[m.Message]:
    got: list[m.Message] = []

    async def fill() -> None:
        while len(got) < count:
            for delivery in await consumer.fetch(count - len(got), 0.5):
                await delivery.ack()
                got.append(delivery.msg)

    await asyncio.wait_for(fill(), timeout_s)
    return got


def logged_trajectory(group: str, sample: int, first_return: float) -> m.TrajectoryEvent:
    request_id = f"{group}-s{sample}"
    return m.TrajectoryEvent(
        event_id=f"traj-{request_id}", timestamp="20250101_000000_000000", instance_id=RELU.id, final_reward=first_return,
        num_turns=1, turn_rewards=[first_return], aggregated_return=first_return, run_id="old-run", trajectory_id=request_id,
        group_id=group, request_id=request_id, sample_idx=sample, n_samples=2, policy_version=7, turn_returns=[first_return],
        prompt_token_ids=[[1, 2, 3]], response_token_ids=[[4, 5]], response_logprobs=[[-0.1, -0.2]], rollout_time_s=1.0,
    )  # fmt: skip


async def test_replayed_trajectories_form_batches_with_each_trajectory_once_even_when_replayed_twice(
    bus: Bus, actor_bus: Bus, nats_server: EmbeddedNatsServer, run_id: str, tmp_path: Path
) -> None:
    # the new run issues one group of its own (r00001-p0, never answered): the old run's r00001-p0 must not join it
    settings = BufferSettings(num_rollout=1, rollout_batch_size=1, n_samples_per_prompt=2, global_batch_size=4,
                              state_interval_s=0.1, problems=("level1/",))  # fmt: skip
    buffer = InProcessBuffer(actor_bus, Config(bus=bus.settings, buffer=settings, reward=RewardConfig(max_turns=2)))
    logs = tmp_path / "runs" / "old-run" / "logs"
    logs.mkdir(parents=True)
    logged = [logged_trajectory(g, i, 1.0 - i) for g in ("r00001-p0", "r00001-p1") for i in (0, 1)]
    codec = m.codec_for(m.TrajectoryEvent)
    (logs / "trajectories.jsonl").write_bytes(b"".join(codec.encode(t) + b"\n" for t in logged) + b"not json\n")
    argv = replay_cmd(str(logs), "--to", "buffer", "--nats", nats_server.url, "--run", run_id)
    first = await run_cmd(argv, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stored: 4" in first.stdout and "malformed_lines: 1" in first.stdout
    second = await run_cmd(argv, tmp_path)  # within the duplicate window: stored once
    assert second.returncode == 0 and "deduplicated: 4" in second.stdout, second.stdout + second.stderr
    # as if replayed again after the duplicate window: stored again, under another message id
    await bus.publish_raw(bus.subjects.event_trajectory, codec.encode(logged[0]),
                          {TYPE_HEADER: "TrajectoryEvent", MSG_ID_HEADER: "replayed-after-the-window"})  # fmt: skip
    batches = await bus.pull(bus.subjects.batch_stream, s.LEARNER_CONSUMER)
    (batch,) = await take(batches, 1)
    assert isinstance(batch, m.TrainBatch)
    assert sorted(x.trajectory_id for x in batch.samples) == sorted(t.trajectory_id for t in logged)
    assert sorted(x.stream_seq for x in batch.samples) == [1, 2, 3, 4]  # the first copies, by their stream sequences
    assert batch.groups.total_groups == 2 and batch.groups.groups_kept == 2
    for x in batch.samples:
        assert x.turn_advantages[0] == pytest.approx(1.0 if x.trajectory_id.endswith("s0") else -1.0, abs=1e-4)
    assert await batches.fetch(1, 2.0) == []  # no other batch
    await buffer.stop()
    state = await read_buffer_state(bus)
    assert state is not None
    assert state.totals["trajectories"] == 4 and state.totals["adopted_groups"] == 2 and state.totals["duplicate"] == 1
    (own,) = state.open_groups
    assert own.group_id == "r00001-p0" and not own.adopted and own.members == []


def test_an_adopted_group_short_of_members_closes_on_the_time_out_from_its_first_member_and_is_never_stale() -> None:
    from kernelrl.actors.buffer_state import BufferCore

    settings = BufferSettings(num_rollout=1, rollout_batch_size=1, n_samples_per_prompt=2, global_batch_size=2,
                              group_timeout_s=100.0, min_group_size=2, max_off_policy_steps=0, problems=("level1/",))  # fmt: skip
    core = BufferCore(settings, RewardConfig(max_turns=2), [p.id for p in builtin_problems().problems], "new-run")
    core.advance(1000.0, 0)  # the buffer's own round
    group = [msgspec.structs.replace(logged_trajectory("g7", i, 1.0 - i), n_samples=3) for i in range(3)]
    assert core.add_trajectory(group[0], 1) == "member"
    assert core.add_trajectory(group[0], 2) == "duplicate"
    assert core.add_trajectory(group[1], 3) == "member"
    core.advance(1050.0, 0)  # stamps the adopted group: its time-out runs from here
    core.advance(1149.0, 0)  # the buffer's own group timed out (empty: dropped); the adopted one has 1 s left
    assert [g.group_id for g in core.state.open_groups] == ["old-run:g7"]
    core.advance(1150.0, 0)
    (batch,) = core.state.outbox_batches  # two of three members, policy version 7 in a run at version 0: kept
    assert sorted(x.trajectory_id for x in batch.samples) == ["g7-s0", "g7-s1"]
    assert (batch.groups.short_groups, batch.groups.lost_rollouts, batch.groups.stale_dropped) == (2, 3, 0)
    assert core.add_trajectory(group[2], 4) == "late" and core.add_trajectory(group[0], 5) == "duplicate"
