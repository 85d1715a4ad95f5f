"""Learner actor: one GRPO step per train batch, then new weights for the generators.

Subscribes: ``krl.<run>.batch`` (consumer ``learner``, the shared work loop, one batch at a time).
Reads: each batch's trajectories from the run's event stream, by stream sequence (one gone under retention
limits is counted in ``missing_samples``, never a crash).
Every ``learner.eval_steps`` steps it also evaluates the new policy on the buffer's held-out problems
(``actors/eval_policy.py``), beside training.
Publishes: the weights, as ``<weights_dir>/v000001/`` ... (``actors/learn_trainer.py`` writes them atomically);
the ``PolicyUpdate`` under the policy bucket's ``latest`` key; a ``StepSummary`` on ``krl.<run>.event.step``.

Invariant, per batch: train → save the version's weights → checkpoint (weights, optimiser, step, and the batch
id with what it produced) → put the policy update → publish the step summary → ack. A learner killed anywhere
in that sequence resumes from its last checkpoint: a batch redelivered after its checkpoint is recognised by
id and only its update and summary are published again (same ids, so stored once); one redelivered before it
is trained again from the same state. No batch is lost or trained twice. Training runs off the event loop,
so heartbeats and in-progress marks keep going through a long step.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from kernelrl.actors.eval_policy import evaluate_policy
from kernelrl.actors.learn_objective import TurnSample, turn_sample
from kernelrl.actors.learn_trainer import TrainStats
from kernelrl.core import messages as m
from kernelrl.core.actor import default_actor_id
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import Config
from kernelrl.core.consumers import consumer_for
from kernelrl.core.work_loop import Outcome, WorkLoop

log = logging.getLogger(__name__)

NO_STEP = TrainStats(loss=0.0, grad_norm=0.0, learning_rate=0.0, tokens=0, sequences=0, clip_fraction=0.0, ratio_mean=1.0,
                     ratio_max=1.0, masked_by_band=0, kl=0.0, time_s=0.0)  # fmt: skip
KEEP_TRAINED = 256  # batches whose outcome the checkpoint remembers (a redelivery is of the last one or two)


class Trainer(Protocol):
    """What the actor needs of ``PolicyTrainer`` (one process) or ``DistributedTrainer`` (rank 0 of many)."""

    step: int
    trainable_params: int
    is_lora: bool

    def train_step(self, samples: list[TurnSample]) -> TrainStats: ...
    def save_policy(self, out_dir: Path) -> str: ...
    def save_checkpoint(self, ckpt_dir: Path, meta: dict[str, Any]) -> None: ...
    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any] | None: ...


class TrainedBatch(msgspec.Struct, frozen=True, kw_only=True):
    """What a consumed batch produced, kept in the checkpoint so a redelivery republishes it unchanged."""

    batch_id: str
    update: m.PolicyUpdate
    summary: m.StepSummary


def step_event_id(batch_id: str) -> str:
    return f"step-{batch_id}"


def batch_turns(trajectories: list[tuple[m.TrajectoryEvent, m.BatchSample]]) -> list[TurnSample]:
    """Every turn of every trajectory with its advantage; a turn that produced no tokens trains nothing."""
    samples = []
    for event, named in trajectories:
        turns = zip(event.prompt_token_ids, event.response_token_ids, event.response_logprobs, named.turn_advantages,
                    strict=False)  # fmt: skip
        for prompt, response, logprobs, advantage in turns:
            if response:
                samples.append(turn_sample(prompt, response, logprobs, advantage))
    return samples


class LearnerActor:
    role = "learner"

    def __init__(self, bus: Bus, config: Config, trainer: Trainer, weights_dir: Path, checkpoint_dir: Path,
                 actor_id: str | None = None, device: str = "cpu", heldout: Sequence[str] = ()) -> None:  # fmt: skip
        self.bus = bus
        self.config = config
        self.trainer = trainer
        self.weights_dir = weights_dir
        self.checkpoint_dir = checkpoint_dir
        self.actor_id = actor_id or default_actor_id(self.role)
        self.device = device
        self.state = "starting"
        self.counters: Counter[str] = Counter()
        self.trained: dict[str, TrainedBatch] = {}
        self.heldout = list(heldout)  # the problems evaluated every learner.eval_steps steps
        self.evaluations: asyncio.Queue[int] = asyncio.Queue()
        self.loop: WorkLoop[m.TrainBatch] = WorkLoop(
            bus, consumer_for(config, self.role), config.learner.work, self, self.train_batch, busy_state="training"
        )

    def gauges(self) -> dict[str, float]:
        return {**self.loop.gauges(), "policy_version": float(self.latest_update().version)}

    async def run(self, stopping: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.loop.run(stopping, ready=self.resume))
            tg.create_task(self.evaluate_policies(stopping))

    async def evaluate_policies(self, stopping: asyncio.Event) -> None:
        """Evaluate the policy of each step queued by ``train_batch`` on the held-out problems, one at a time, beside
        training (an evaluation waits for whole dialogues from the generators)."""
        settings = self.config.learner
        while not stopping.is_set():
            try:
                step = await asyncio.wait_for(self.evaluations.get(), 0.5)
            except TimeoutError:
                continue
            log_dir = Path(self.config.logger.log_dir) if self.config.logger.log_dir else None
            try:
                report = await evaluate_policy(self.bus, self.heldout, settings.eval_samples, self.config.reward, step=step,
                                               timeout_s=settings.eval_timeout_s, log_dir=log_dir, stopping=stopping)  # fmt: skip
            except Exception:  # an evaluation is a side job: it never stops training
                self.counters["evaluations_failed"] += 1
                log.exception("eval at step %d failed; training goes on", step)
                continue
            self.counters["evaluations"] += 1
            log.info(
                "eval at step %d: accuracy %.3f over %d samples", step, report.summary.accuracy, report.summary.total_samples
            )

    def queue_evaluation(self, step: int) -> None:
        every = self.config.learner.eval_steps
        if every <= 0 or step % every:
            return
        if not self.heldout:
            log.warning("learner.eval_steps is set but the buffer holds no problems out (buffer.heldout_fraction): no eval")
            return
        self.evaluations.put_nowait(step)

    async def resume(self) -> None:
        meta = await asyncio.to_thread(self.trainer.load_checkpoint, self.checkpoint_dir)
        if meta is None:
            return
        done = msgspec.convert(meta.get("trained", []), list[TrainedBatch])
        self.trained = {t.batch_id: t for t in done}
        log.info("resumed at step %d from %s (%d batches trained)", self.trainer.step, self.checkpoint_dir, len(done))
        if done:  # the update may not have reached the bucket before the learner stopped
            await self.bus.put_policy(done[-1].update)

    # ------------------------------------------------------------ one batch

    async def train_batch(self, delivery: Delivery[m.TrainBatch]) -> Outcome:
        batch = delivery.msg
        done = self.trained.get(batch.batch_id)
        if done is not None:  # trained and checkpointed before; its update or summary may not have gone out
            self.counters["batches_redelivered"] += 1
            await self.bus.put_policy(done.update)
            return [(self.bus.subjects.event_step, done.summary)]
        started = time.monotonic()
        trajectories, missing = await self.read_trajectories(batch)
        samples = batch_turns(trajectories)
        # Every batch makes a new version, numbered by its step (kept increasing even if batches come out of order);
        # one with nothing to train (all its groups filtered, its trajectories gone) republishes the same weights.
        version = max(batch.step, self.latest_update().version + 1)
        stats = await asyncio.to_thread(self.trainer.train_step, samples) if samples else NO_STEP
        path = self.weights_dir / f"v{version:06d}"
        sha256 = await asyncio.to_thread(self.trainer.save_policy, path)
        update = m.PolicyUpdate(version=version, path=str(path.resolve()), sha256=sha256, run_id=self.bus.settings.run,
                                step=batch.step, is_lora=self.trainer.is_lora, created_at=time.time())  # fmt: skip
        summary = self.step_summary(batch, stats, update, len(trajectories), missing, time.monotonic() - started)
        self.trained[batch.batch_id] = TrainedBatch(batch_id=batch.batch_id, update=update, summary=summary)
        while len(self.trained) > KEEP_TRAINED:
            del self.trained[next(iter(self.trained))]
        meta = {"trained": msgspec.to_builtins(list(self.trained.values()))}
        await asyncio.to_thread(self.trainer.save_checkpoint, self.checkpoint_dir, meta)
        await self.bus.put_policy(update)
        await asyncio.to_thread(self.prune_versions, version)
        self.counters["steps"] += 1
        self.counters["samples_missing"] += missing
        log.info("step %d: %d trajectories (%d turns, %d missing), loss %.4f → policy v%d", batch.step, len(trajectories),
                 len(samples), missing, stats.loss, update.version)  # fmt: skip
        self.queue_evaluation(batch.step)
        return [(self.bus.subjects.event_step, summary)]

    def prune_versions(self, latest: int) -> None:
        """Delete weight versions older than the last ``learner.keep_versions`` (0: keep every one)."""
        keep = self.config.learner.keep_versions
        if keep <= 0:
            return
        for path in self.weights_dir.glob("v[0-9]*"):
            if path.is_dir() and path.name[1:].isdigit() and int(path.name[1:]) <= latest - keep:
                shutil.rmtree(path, ignore_errors=True)

    def latest_update(self) -> m.PolicyUpdate:
        """The update of the policy trained so far (version 0, the starting policy, before any step)."""
        if self.trained:
            return next(reversed(self.trained.values())).update
        return m.PolicyUpdate(version=0, path="", sha256="", run_id=self.bus.settings.run)

    async def read_trajectories(self, batch: m.TrainBatch) -> tuple[list[tuple[m.TrajectoryEvent, m.BatchSample]], int]:
        found, missing = [], 0
        for named in batch.samples:
            event = await self.bus.stored(self.bus.subjects.event_stream, named.stream_seq)
            if not isinstance(event, m.TrajectoryEvent) or event.trajectory_id != named.trajectory_id:
                missing += 1
                log.warning("batch %s: trajectory %s is not at #%d of the event stream (retention?); trained without it",
                            batch.batch_id, named.trajectory_id, named.stream_seq)  # fmt: skip
                continue
            found.append((event, named))
        return found, missing

    def step_summary(self, batch: m.TrainBatch, stats: TrainStats, update: m.PolicyUpdate, samples: int, missing: int,
                     elapsed_s: float) -> m.StepSummary:  # fmt: skip
        groups = msgspec.structs.replace(batch.groups, training_time_s=round(stats.time_s, 3))
        share = stats.tokens / groups.total_tokens if groups.total_tokens else 0.0
        return m.StepSummary(
            event_id=step_event_id(batch.batch_id),
            step=batch.step,
            timestamp=m.log_timestamp(),
            run_id=self.bus.settings.run,
            total_steps=batch.total_steps,
            policy_version=update.version,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            learning_rate=stats.learning_rate,
            tokens_trained=stats.tokens,
            trainable_token_share=round(share, 4),
            groups=groups,
            batch_id=batch.batch_id,
            samples=samples,
            missing_samples=missing,
            clip_fraction=stats.clip_fraction,
            ratio_mean=stats.ratio_mean,
            ratio_max=stats.ratio_max,
            masked_by_band=int(stats.masked_by_band),
            kl=stats.kl,
            trainable_params=self.trainer.trainable_params,
            train_time_s=round(elapsed_s, 3),
            weights_path=update.path,
            weights_sha256=update.sha256,
        )
