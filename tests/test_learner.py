"""The learner actor over a real nats-server with the tiny model: batches in, versioned weights, policy updates and step
summaries out; a learner killed after a step resumes at the next batch with nothing lost or trained twice."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from kernelrl.actors.gen_models import demo_tokenizer, weights_sha256
from kernelrl.actors.learn_trainer import PolicyTrainer
from kernelrl.actors.learner import LearnerActor, batch_turns
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import Config, LearnerSettings
from kernelrl.core.nats_server import EmbeddedNatsServer

from helpers import wait_for
from tiny_model import tiny_model_dir

SETTINGS = LearnerSettings(learning_rate=1e-3, device="cpu", dtype="float32", gradient_checkpointing=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def trajectory(run_id: str, name: str, turns: int, seed: int) -> m.TrajectoryEvent:
    """A dialogue of ``turns`` turns whose prompts are real chat text and whose responses are fixed token ids."""
    tokenizer = demo_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer(f"Problem {name}, attempt {t}: write a Triton ReLU.")["input_ids"] for t in range(turns)]
    responses = [torch.randint(100, 40000, (12,), generator=g).tolist() for _ in range(turns)]
    return m.TrajectoryEvent(
        event_id=f"traj-{name}", timestamp=m.log_timestamp(), instance_id="level1/1_ReLU", final_reward=0.0, num_turns=turns,
        turn_rewards=[0.0] * turns, aggregated_return=0.0, run_id=run_id, trajectory_id=name, request_id=name,
        prompt_token_ids=prompts, response_token_ids=responses, response_logprobs=[[-3.0] * 12 for _ in range(turns)],
    )  # fmt: skip


async def publish_batch(bus: Bus, step: int, named: list[tuple[m.TrajectoryEvent, float]], missing: int = 0) -> m.TrainBatch:
    samples = []
    for event, advantage in named:
        ack = await bus.publish(bus.subjects.event_trajectory, event)
        samples.append(m.BatchSample(stream_seq=ack.seq, trajectory_id=event.trajectory_id,
                                     turn_advantages=[advantage] * event.num_turns))  # fmt: skip
    samples += [
        m.BatchSample(stream_seq=10_000_000 + i, trajectory_id=f"gone-{i}", turn_advantages=[1.0]) for i in range(missing)
    ]
    batch = m.TrainBatch(batch_id=f"batch-{step:06d}", run_id=bus.settings.run, step=step, samples=samples,
                         groups=m.GroupSummary(total_groups=1, groups_kept=1, total_tokens=1000))  # fmt: skip
    await bus.publish(bus.subjects.batch, batch)
    return batch


async def step_summaries(bus: Bus) -> list[m.StepSummary]:
    info = await bus.js.stream_info(bus.subjects.event_stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.stored(bus.subjects.event_stream, seq)
        if isinstance(msg, m.StepSummary):
            found.append(msg)
    return found


def learner_config(bus: Bus, tmp_path: Path) -> Config:
    return Config(bus=bus.settings, learner=msgspec.structs.replace(SETTINGS, weights_dir=str(tmp_path / "policy"),
                                                                    checkpoint_dir=str(tmp_path / "ckpt")))  # fmt: skip


async def run_learner(bus: Bus, config: Config, model: Path) -> tuple[LearnerActor, asyncio.Event, asyncio.Task[None]]:
    trainer = await asyncio.to_thread(PolicyTrainer, config.learner, model)
    actor = LearnerActor(bus, config, trainer, Path(config.learner.weights_dir), Path(config.learner.checkpoint_dir))
    stopping = asyncio.Event()
    return actor, stopping, asyncio.create_task(actor.run(stopping))


async def test_a_batch_becomes_a_published_version_and_a_step_summary_with_missing_trajectories_counted(
    bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path
) -> None:
    config = learner_config(bus, tmp_path)
    good, bad = trajectory(run_id, "a", 2, 1), trajectory(run_id, "b", 1, 2)
    await publish_batch(bus, 1, [(good, 1.0), (bad, -1.0)], missing=1)
    actor, stopping, task = await run_learner(bus, config, tiny_model)
    try:
        await wait_for(lambda: actor.counters["steps"] >= 1, 120, "the learner's first step")
        update = await bus.latest_policy()
        assert update is not None and update.version == 1 and update.step == 1 and not update.is_lora
        assert Path(update.path) == (tmp_path / "policy" / "v000001").resolve()
        assert update.sha256 == weights_sha256(Path(update.path))
        (summary,) = await step_summaries(bus)
        assert summary.step == 1 and summary.policy_version == 1 and summary.batch_id == "batch-000001"
        assert summary.samples == 2 and summary.missing_samples == 1
        assert summary.tokens_trained == 3 * 12  # every response token of the three turns present, nothing else
        assert summary.weights_sha256 == update.sha256 and summary.loss != 0.0
    finally:
        stopping.set()
        await task


async def test_a_batch_redelivered_after_its_checkpoint_is_not_trained_again(
    bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = learner_config(bus, tmp_path)
    config = msgspec.structs.replace(config, learner=msgspec.structs.replace(
        config.learner, work=msgspec.structs.replace(config.learner.work, retry_delay_s=0.2)))  # fmt: skip
    await publish_batch(bus, 1, [(trajectory(run_id, "a", 1, 1), 1.0), (trajectory(run_id, "b", 1, 2), -1.0)])
    real_put = Bus.put_policy
    failures = iter([True])

    async def put_failing_once(self: Bus, update: m.PolicyUpdate) -> None:
        if next(failures, False):
            raise ConnectionError("the broker went away after the checkpoint")
        await real_put(self, update)

    monkeypatch.setattr(Bus, "put_policy", put_failing_once)
    actor, stopping, task = await run_learner(bus, config, tiny_model)
    try:
        await wait_for(lambda: actor.counters["batches_redelivered"] >= 1, 120, "the redelivered batch")
        await wait_for(lambda: actor.loop.gauges().get("job_s", 0.0) == 0.0, 30, "the redelivery settled")
        assert actor.trainer.step == 1
        update = await bus.latest_policy()
        assert update is not None and update.version == 1
        summaries = await step_summaries(bus)
        assert [s.step for s in summaries] == [1]
    finally:
        stopping.set()
        await task


async def test_a_learner_killed_after_a_step_resumes_at_the_next_batch(
    nats_server: EmbeddedNatsServer, bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path,
    spawn: Callable[..., subprocess.Popen[str]],
) -> None:  # fmt: skip
    weights, ckpt = tmp_path / "policy", tmp_path / "ckpt"
    args = ["learner", "--nats", nats_server.url, "--run", run_id, "--model", str(tiny_model), "--lr", "1e-3",
            "--set", "learner.device=cpu", "--set", "learner.gradient_checkpointing=false",
            "--set", f"learner.weights_dir={weights}", "--set", f"learner.checkpoint_dir={ckpt}"]  # fmt: skip
    batches = [[(trajectory(run_id, f"s{s}-{i}", 1 + i, 10 * s + i), 1.0 - 2 * i) for i in range(2)] for s in (1, 2)]
    await publish_batch(bus, 1, batches[0])
    first = spawn(*args, stdout=subprocess.DEVNULL)

    async def version() -> int:
        update = await bus.latest_policy()
        return update.version if update else 0

    async def wait_version(v: int) -> None:
        for _ in range(600):
            if await version() >= v:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"policy version {v} never came")

    await wait_version(1)
    for _ in range(600):  # killed after the step: its summary is out (the policy update goes out just before it)
        if [s.step for s in await step_summaries(bus)] == [1]:
            break
        await asyncio.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 30)
    await publish_batch(bus, 2, batches[1])
    second = spawn(*args, stdout=subprocess.DEVNULL)
    await wait_version(2)
    await asyncio.sleep(1.0)  # room for a repeated step to show
    assert [s.step for s in await step_summaries(bus)] == [1, 2]
    assert sorted(p.name for p in weights.iterdir() if p.name.startswith("v")) == ["v000001", "v000002"]
    second.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.wait, 60) == 0

    # The same two batches trained by one uninterrupted learner give the same weights.
    reference = PolicyTrainer(SETTINGS, tiny_model)
    for batch in batches:
        named = [(event, m.BatchSample(stream_seq=0, trajectory_id=event.trajectory_id,
                                       turn_advantages=[adv] * event.num_turns)) for event, adv in batch]  # fmt: skip
        reference.train_step(batch_turns(named))
    reference.save_policy(tmp_path / "reference")
    resumed, uninterrupted = (
        load_file(weights / "v000002" / "model.safetensors"),
        load_file(tmp_path / "reference" / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4)


async def test_a_batch_without_samples_reports_its_groups_and_keeps_the_weights(
    bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The buffer's last batch holds no samples when its groups were all filtered: no optimiser step, but the step
    summary goes out and version 2 (the batch's step, so versions keep counting batches) carries the same weights."""
    config = learner_config(bus, tmp_path)
    await publish_batch(bus, 1, [(trajectory(run_id, "a", 1, 1), 1.0), (trajectory(run_id, "b", 1, 2), -1.0)])
    await publish_batch(bus, 2, [])
    actor, stopping, task = await run_learner(bus, config, tiny_model)
    try:
        await wait_for(lambda: actor.counters["steps"] >= 2, 120, "both batches")
        update = await bus.latest_policy()
        assert update is not None and (update.version, update.step) == (2, 2)
        assert update.sha256 == weights_sha256(tmp_path / "policy" / "v000001")  # the weights step 1 made
        assert actor.trainer.step == 1  # one optimiser step
        _, second = await step_summaries(bus)
        assert (second.step, second.samples, second.policy_version, second.tokens_trained) == (2, 0, 2, 0)
        assert second.groups.total_groups == 1  # the summary the buffer sent is reported
    finally:
        stopping.set()
        await task


async def test_every_eval_steps_steps_the_learner_evaluates_the_held_out_problems(
    bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path
) -> None:
    """With ``learner.eval_steps = 2``, step 2 (not step 1) sends ``eval_samples`` dialogues per held-out problem to
    the generators, tagged as an evaluation of that step, beside training."""
    config = learner_config(bus, tmp_path)
    config = msgspec.structs.replace(config, learner=msgspec.structs.replace(config.learner, eval_steps=2, eval_samples=3))
    for step in (1, 2):
        await publish_batch(
            bus, step, [(trajectory(run_id, f"a{step}", 1, step), 1.0), (trajectory(run_id, f"b{step}", 1, 9), -1.0)]
        )
    trainer = await asyncio.to_thread(PolicyTrainer, config.learner, tiny_model)
    actor = LearnerActor(bus, config, trainer, tmp_path / "policy", tmp_path / "ckpt", heldout=["level1/4_Tanh", "level1/6_SiLU"])
    stopping = asyncio.Event()
    task = asyncio.create_task(actor.run(stopping))
    try:
        await wait_for(lambda: actor.counters["steps"] >= 2, 120, "both steps")
        psub = await bus.js.pull_subscribe_bind(durable="generators", stream=bus.subjects.rollout_stream)  # as a generator
        requests = []
        while len(requests) < 6:
            requests += [m.codec_for(m.RolloutRequest).decode(raw.data) for raw in await psub.fetch(6, timeout=30)]
        assert sorted((r.problem_id, r.sample_idx) for r in requests) == sorted(
            (p, i) for p in ("level1/4_Tanh", "level1/6_SiLU") for i in range(3)
        )
        assert {r.step for r in requests} == {2} and all(r.group_id.startswith("eval-0002-") for r in requests)
    finally:
        stopping.set()
        await task


async def test_keep_versions_deletes_all_but_the_newest_weights(bus: Bus, run_id: str, tiny_model: Path, tmp_path: Path) -> None:
    config = learner_config(bus, tmp_path)
    config = msgspec.structs.replace(config, learner=msgspec.structs.replace(config.learner, keep_versions=3))
    for step in range(1, 5):
        await publish_batch(bus, step, [(trajectory(run_id, f"k{step}", 1, step), 1.0)])
    actor, stopping, task = await run_learner(bus, config, tiny_model)
    try:
        await wait_for(lambda: actor.counters["steps"] >= 4, 120, "four steps")
        assert sorted(p.name for p in (tmp_path / "policy").iterdir() if p.name.startswith("v")) == [
            "v000002",
            "v000003",
            "v000004",
        ]
    finally:
        stopping.set()
        await task
