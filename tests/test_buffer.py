"""The buffer actor over a real nats-server: the test plays the generator (takes rollout requests, publishes
trajectory events) and the learner (takes train batches, publishes policy versions)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from kernelrl.actors.buffer import BufferActor, read_buffer_state
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus, PullConsumer
from kernelrl.core.config import BufferSettings, Config, RewardConfig
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems

from helpers import command_env, wait_for


def config_for(bus: Bus, **buffer: object) -> Config:
    settings = dict(num_rollout=2, rollout_batch_size=2, n_samples_per_prompt=2, global_batch_size=4, max_inflight_groups=4,
                    max_off_policy_steps=1, state_interval_s=0.1, problems=("level1/",))  # fmt: skip
    return Config(bus=bus.settings, buffer=BufferSettings(**(settings | buffer)), reward=RewardConfig(max_turns=2))  # type: ignore[arg-type]


class InProcessBuffer:
    def __init__(self, bus: Bus, config: Config) -> None:
        self.actor = BufferActor(bus, config, builtin_problems())
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self.actor.run(self.stopping))

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def actor_bus(nats_server: EmbeddedNatsServer, run_id: str, bus: Bus) -> AsyncIterator[Bus]:
    """The buffer's own connection to the run the ``bus`` fixture provisioned."""
    b = await Bus.connect(bus.settings, name="buffer")
    yield b
    await b.close()


async def take(consumer: PullConsumer[m.Message], count: int, timeout_s: float = 30.0) -> list[m.Message]:
    """Exactly ``count`` messages (acked), failing after ``timeout_s``."""
    got: list[m.Message] = []

    async def fill() -> None:
        while len(got) < count:
            for delivery in await consumer.fetch(count - len(got), 0.5):
                await delivery.ack()
                got.append(delivery.msg)

    await asyncio.wait_for(fill(), timeout_s)
    return got


async def nothing_more(consumer: PullConsumer[m.Message], wait_s: float) -> bool:
    return await consumer.fetch(1, wait_s) == []


def trajectory(request: m.RolloutRequest, returns: list[float], version: int = 0) -> m.TrajectoryEvent:
    turns = len(returns)
    return m.TrajectoryEvent(
        event_id=f"traj-{request.request_id}", timestamp=m.log_timestamp(), instance_id=request.problem_id,
        final_reward=returns[-1], num_turns=turns, turn_rewards=returns, aggregated_return=returns[0], run_id=request.run_id,
        trajectory_id=request.request_id, group_id=request.group_id, request_id=request.request_id,
        sample_idx=request.sample_idx, n_samples=request.n_samples, policy_version=version, turn_returns=returns,
        prompt_token_ids=[[1, 2, 3]] * turns, response_token_ids=[[4, 5]] * turns, response_logprobs=[[-0.1, -0.2]] * turns,
        rollout_time_s=1.0,
    )  # fmt: skip


def returns_for(request: m.RolloutRequest) -> list[float]:
    """Spread within every group: sample 0 scores, sample 1 does not; group p1 takes two turns."""
    first = 1.0 if request.sample_idx == 0 else 0.0
    return [first, 0.5] if request.group_id.endswith("p1") else [first]


async def publish(bus: Bus, request: m.RolloutRequest, version: int = 0) -> int:
    ack = await bus.publish(bus.subjects.event_trajectory, trajectory(request, returns_for(request), version))
    return ack.seq


async def consumers(bus: Bus) -> tuple[PullConsumer[m.Message], PullConsumer[m.Message]]:
    st = bus.subjects
    return await bus.pull(st.rollout_stream, s.GENERATORS_CONSUMER), await bus.pull(st.batch_stream, s.LEARNER_CONSUMER)


async def test_the_buffer_issues_rollouts_and_batches_their_trajectories_by_stream_sequence(bus: Bus, actor_bus: Bus) -> None:
    buffer = InProcessBuffer(actor_bus, config_for(bus))
    rollouts, batches = await consumers(bus)
    requests = await take(rollouts, 8)  # both rounds: round 2's batch is one version ahead of its sampler, allowed
    assert all(isinstance(r, m.RolloutRequest) for r in requests)
    assert sorted(r.request_id for r in requests) == sorted(f"r{n:05d}-p{k}-s{i}" for n in (1, 2) for k in (0, 1) for i in (0, 1))
    assert all(r.problem_id.startswith("level1/") and r.max_turns == 2 and r.n_samples == 2 for r in requests)
    assert {r.step for r in requests if r.group_id.startswith("r00001")} == {1}
    seqs = {r.request_id: await publish(bus, r) for r in requests if r.step == 1}  # type: ignore[union-attr]
    (first,) = await take(batches, 1)
    assert isinstance(first, m.TrainBatch) and first.batch_id == "batch-000001" and first.step == 1
    assert first.total_steps == 2
    assert {x.trajectory_id: x.stream_seq for x in first.samples} == seqs
    assert sorted(len(x.turn_advantages) for x in first.samples) == [1, 1, 2, 2]
    for x in first.samples:
        assert x.turn_advantages[0] == pytest.approx(1.0 if x.trajectory_id.endswith("s0") else -1.0, abs=1e-4)
    g = first.groups
    assert (g.total_groups, g.groups_kept, g.num_rollouts, g.num_early_exit) == (2, 2, 4, 2)
    assert g.total_tokens == 2 * 5 + 2 * 2 * 5 and g.trainable_tokens == 2 * 2 + 2 * 2 * 2
    assert g.reward_mean == pytest.approx(0.5) and g.reward_change is None
    for r in requests:
        if r.step == 2:  # type: ignore[union-attr]
            await publish(bus, r)  # type: ignore[arg-type]
    (second,) = await take(batches, 1)
    assert second.step == 2 and {x.trajectory_id[:6] for x in second.samples} == {"r00002"}  # type: ignore[union-attr]
    await wait_for(lambda: buffer.actor.state == "finished", 10, "the buffer to finish")
    state = await read_buffer_state(bus)
    assert state is not None and state.finished and state.batches_published == 2 and not state.open_groups
    assert await nothing_more(rollouts, 1.0)
    await buffer.stop()


async def test_a_buffer_killed_mid_run_and_restarted_batches_every_trajectory_exactly_once(
    bus: Bus, nats_server: EmbeddedNatsServer, run_id: str
) -> None:
    argv = [sys.executable, "-m", "kernelrl.bin.buffer", "--nats", nats_server.url, "--run", run_id, "--n-samples", "2",
            "--num-rollout", "2", "--rollout-batch-size", "2", "--global-batch-size", "4", "--set", "buffer.state_interval_s=0.2",
            "--set", "reward.max_turns=2", "--set", 'buffer.problems=["level1/"]', "--log-level", "WARNING"]  # fmt: skip

    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(argv, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs[-1]

    first = start()
    try:
        rollouts, batches = await consumers(bus)
        requests: list[m.RolloutRequest] = sorted(await take(rollouts, 8), key=lambda r: r.request_id)  # type: ignore[arg-type,attr-defined]
        seqs = {}
        for r in requests[:2]:  # group r00001-p0, complete: its two samples are kept, 2 < 4, no batch yet
            seqs[r.request_id] = await publish(bus, r)

        async def saved_past(seq: int) -> None:
            while (state := await read_buffer_state(bus)) is None or state.last_seq < seq:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(saved_past(max(seqs.values())), 30)
        seqs[requests[2].request_id] = await publish(bus, requests[2])  # consumed, perhaps not yet saved
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 30)
        for r in requests[3:]:  # the rest arrive while no buffer runs
            seqs[r.request_id] = await publish(bus, r)
        again = trajectory(requests[0], returns_for(requests[0]))  # finished twice, outside the dedup window
        codec = m.codec_for(m.TrajectoryEvent)
        await bus.publish_raw(bus.subjects.event_trajectory, codec.encode(again),
                              {TYPE_HEADER: "TrajectoryEvent", MSG_ID_HEADER: "a-second-copy"})  # fmt: skip
        second = start()
        got: list[m.TrainBatch] = await take(batches, 2)  # type: ignore[assignment]
        assert [b.step for b in got] == [1, 2]
        named = [(x.trajectory_id, x.stream_seq) for b in got for x in b.samples]
        assert sorted(named) == sorted(seqs.items())  # none lost, none twice, each by its own stream sequence
        assert await nothing_more(batches, 1.0) and await nothing_more(rollouts, 0.1)  # no other batch, no request again
        state = await read_buffer_state(bus)
        assert state is not None and state.finished and state.totals.get("duplicate") == 1
        assert state.totals["trajectories"] == 8
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_synchronous_mode_waits_for_the_learner_before_the_next_round(bus: Bus, actor_bus: Bus) -> None:
    buffer = InProcessBuffer(actor_bus, config_for(bus, max_off_policy_steps=0, rollout_batch_size=1, global_batch_size=2))
    rollouts, batches = await consumers(bus)
    round1: list[m.RolloutRequest] = await take(rollouts, 2)  # type: ignore[assignment]
    assert {r.step for r in round1} == {1}
    for r in round1:
        await publish(bus, r)
    (first,) = await take(batches, 1)
    assert first.step == 1  # type: ignore[attr-defined]
    assert await nothing_more(rollouts, 2.0)  # generation waits: the learner has not trained batch 1
    kv = await bus.kv(bus.subjects.policy_bucket)
    update = m.PolicyUpdate(version=1, path="/weights/v000001", sha256="", run_id=bus.settings.run, step=1)
    await kv.put(s.POLICY_LATEST_KEY, m.codec_for(m.PolicyUpdate).encode(update))
    round2: list[m.RolloutRequest] = await take(rollouts, 2)  # type: ignore[assignment]
    assert {r.step for r in round2} == {2}
    for r in round2:
        await publish(bus, r, version=1)
    (second,) = await take(batches, 1)
    assert second.step == 2 and second.min_policy_version == 1  # type: ignore[attr-defined]
    assert buffer.actor.gauges()["policy_version"] == 1.0
    await buffer.stop()
