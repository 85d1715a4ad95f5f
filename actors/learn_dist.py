"""The learner data-parallel under ``torchrun``: every rank holds the policy and trains its share of each batch.

    torchrun --nproc-per-node 2 -m kernelrl.bin.cli learner ...   # (or any script doing the same)

    info = init_distributed()                    # None when not launched by torchrun
    trainer = DistributedTrainer(PolicyTrainer(settings, model_dir, dist=info))
    if trainer.is_lead:                          # rank 0: talks to NATS, drives the others
        stats = trainer.train_step(samples)      # the whole batch; every rank trains its share
        digest = trainer.save_policy(out_dir)
        trainer.close()                          # the other ranks leave ``follow``
    else:
        follow(trainer)                          # ranks > 0: run rank 0's commands until it closes

Rank 0 broadcasts each command (``broadcast_object_list``) with the whole batch; every rank takes the same
deterministic share (``share``: turns balanced by tokens). The step is the single-process step on the whole batch:
the loss is normalised by the batch's global token (or sequence) count, and the gradient averaging of DDP/FSDP is
undone by scaling each rank's loss by the world size. Ranks with fewer micro-batches run zero-weighted dummy ones,
so that every rank makes the same collective calls.

GPUs (nccl): FSDP2, ``fully_shard`` on each decoder layer and then on the whole model; saving gathers the full
state dict and rank 0 alone writes. CPU (gloo): DDP (FSDP2 needs a GPU). Invariant: only rank 0 calls the
``DistributedTrainer`` methods; a rank that fails in the middle of a collective leaves the others waiting (torchrun
then tears the job down).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from kernelrl.actors.learn_objective import TurnSample
    from kernelrl.actors.learn_trainer import PolicyTrainer, TrainStats


log = logging.getLogger(__name__)
IDLE_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def fsdp(self) -> bool:
        return self.device.type == "cuda"

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard (GPU) or replicate (CPU) ``model``; returns the module to run forward and backward through (FSDP2
        changes ``model`` in place and returns it; DDP wraps it)."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            layer_classes = set(getattr(_hf_model(model), "_no_split_modules", None) or ())
            for module in model.modules():
                if type(module).__name__ in layer_classes:
                    fully_shard(module)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    @contextlib.contextmanager
    def no_sync(self, engine: torch.nn.Module) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside reduces them across ranks."""
        if self.fsdp:
            engine.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                engine.set_requires_gradient_sync(True)  # type: ignore[operator]
        else:
            with engine.no_sync():  # type: ignore[operator]
                yield

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        on_device = values.to(self.device)
        dist.all_reduce(on_device, op=reduce_op)
        return on_device.to(values.device)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.fsdp else None)
        return box[0]


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft model
    return get_base() if callable(get_base) else model


def init_distributed() -> DistInfo | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); None when not under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # Ranks > 0 wait in a broadcast for rank 0's next command for as long as the run waits for its next batch.
        dist.init_process_group(backend=backend, timeout=IDLE_TIMEOUT)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def share(samples: Sequence[TurnSample], rank: int, world_size: int) -> list[TurnSample]:
    """``rank``'s turns of a batch: longest first, each to the rank with the fewest tokens so far (ties: lowest)."""
    loads = [0] * world_size
    mine: list[tuple[int, TurnSample]] = []
    for i in sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += len(samples[i].input_ids)
        if r == rank:
            mine.append((i, samples[i]))
    return [sample for _, sample in sorted(mine, key=lambda pair: pair[0])]


class DistributedTrainer:
    """Drives a ``PolicyTrainer`` on every rank from rank 0; without ``dist`` it is the trainer itself."""

    def __init__(self, trainer: PolicyTrainer) -> None:
        self.trainer = trainer
        self.dist = trainer.dist

    @property
    def is_lead(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def trainable_params(self) -> int:
        return self.trainer.trainable_params

    @property
    def is_lora(self) -> bool:
        return self.trainer.is_lora

    def _command(self, *command: Any) -> None:
        if not self.is_lead:
            raise RuntimeError("only rank 0 drives the learner; the other ranks run follow()")
        if self.dist is not None:
            self.dist.broadcast(command)

    def _share(self, samples: Sequence[TurnSample]) -> list[TurnSample]:
        return list(samples) if self.dist is None else share(samples, self.dist.rank, self.dist.world_size)

    def _lead(self, command: tuple[Any, ...], do: Callable[[], Any]) -> Any:
        """Send ``command`` to the other ranks, then do this rank's share. A failure here, under torchrun, leaves the
        other ranks inside a collective this rank will never join: the process exits so torchrun ends the job (and
        the batch comes back to a restarted learner) instead of hanging it."""
        self._command(*command)
        if self.dist is None:
            return do()
        try:
            return do()
        except BaseException:
            log.exception("rank 0 failed during %r; exiting so that torchrun stops every rank", command[0])
            logging.shutdown()
            os._exit(1)

    def train_step(self, samples: Sequence[TurnSample]) -> TrainStats:
        return self._lead(("train", list(samples)), lambda: self.trainer.train_step(self._share(samples)))

    def sft_step(self, samples: Sequence[TurnSample]) -> TrainStats:
        return self._lead(("sft", list(samples)), lambda: self.trainer.sft_step(self._share(samples)))

    def save_policy(self, out_dir: Path) -> str:
        return self._lead(("save_policy", str(out_dir)), lambda: self.trainer.save_policy(out_dir))

    def save_checkpoint(self, ckpt_dir: Path, meta: dict[str, Any]) -> None:
        self._lead(("save_checkpoint", str(ckpt_dir), meta), lambda: self.trainer.save_checkpoint(ckpt_dir, meta))

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any] | None:
        return self._lead(("load_checkpoint", str(ckpt_dir)), lambda: self.trainer.load_checkpoint(ckpt_dir))

    def close(self) -> None:
        """Rank 0: release the other ranks from ``follow`` and leave the process group."""
        if self.dist is not None:
            self._command("stop")
            dist.destroy_process_group()


def follow(trainer: DistributedTrainer) -> None:
    """Ranks > 0: do rank 0's commands, each on this rank's share, until it closes."""
    info = trainer.dist
    if info is None or info.rank == 0:
        raise RuntimeError("follow() is for ranks > 0 under torchrun")
    inner = trainer.trainer
    while True:
        command, *args = info.broadcast()
        if command == "stop":
            dist.destroy_process_group()
            return
        if command == "train":
            inner.train_step(trainer._share(args[0]))
        elif command == "sft":
            inner.sft_step(trainer._share(args[0]))
        elif command == "save_policy":
            inner.save_policy(Path(args[0]))
        elif command == "save_checkpoint":
            inner.save_checkpoint(Path(args[0]), args[1])
        elif command == "load_checkpoint":
            inner.load_checkpoint(Path(args[0]))
        else:
            raise RuntimeError(f"learner rank {info.rank}: unknown command {command!r}")
