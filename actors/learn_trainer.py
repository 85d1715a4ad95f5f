"""The learner's optimiser step on a transformers causal LM (optionally a peft LoRA adapter on it), with no bus.

``train_step``: one AdamW step of the PPO-clip objective (``learn_objective.ppo_clip_loss``) on a batch of turns,
against the behaviour log-probs the generator recorded, plus ``kl_coef`` × the k3 estimate of KL(policy ‖ initial
policy) when set (the initial policy: the model with its adapter disabled, or a frozen copy for a full fine-tune).
``sft_step``: one AdamW step of cross-entropy on the loss-mask tokens (token mean), for the warm start.

Micro-batches: the turns, longest first, are packed into padded (right, with an attention mask) micro-batches of
at most ``max_tokens_per_gpu`` tokens (rows × longest row); a longer turn is a micro-batch of its own. Gradients
accumulate over them, and each micro-batch's loss is divided by the *batch's* response-token count (``token``
aggregation; tokens masked by the ratio band still count) or turn count (``sequence``), so a step does not depend
on how the batch is cut, nor, under ``learn_dist``, on how it is split across ranks.

Weights: float32 on the CPU, bfloat16 on a GPU (log-probs in float32 either way). ``save_policy`` writes a full
model (safetensors, tokenizer, generation config) or the adapter alone, into a temporary sibling directory renamed
into place (a directory already there is replaced); it returns ``weights_sha256`` of the result, the
``PolicyUpdate`` hash. ``save_checkpoint`` / ``load_checkpoint``: trainable weights, optimiser state, step, RNG
and the caller's ``meta``, written the same way, so a resumed trainer takes exactly the step it would have taken.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from kernelrl.actors.gen_models import DTYPES, weights_sha256
from kernelrl.actors.learn_objective import TurnSample, ppo_clip_loss, token_logprobs
from kernelrl.core.config import LearnerSettings

if TYPE_CHECKING:
    from kernelrl.actors.learn_dist import DistInfo

CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "meta.json"
LORA_SEED = 0  # the adapter's initial weights: the same on every rank and every run


class TrainStats(msgspec.Struct, frozen=True, kw_only=True):
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int  # response tokens trained
    sequences: int
    clip_fraction: float
    ratio_mean: float
    ratio_max: float
    masked_by_band: int
    kl: float  # mean k3 KL to the initial policy per response token (0 when kl_coef is 0)
    time_s: float


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [rows, width], right-padded
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behaviour: torch.Tensor
    advantages: torch.Tensor  # [rows]
    first_scored: int  # positions before this one need no logits: no loss-mask token follows them


def pack(samples: Sequence[TurnSample], max_tokens: int) -> list[list[int]]:
    """Indices of ``samples`` per micro-batch: longest first, at most ``max_tokens`` padded tokens each."""
    batches: list[list[int]] = []
    width = 0
    for i in sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i)):
        if batches and width * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
            width = len(samples[i].input_ids)
    return batches


def collate(samples: Sequence[TurnSample], device: torch.device) -> MicroBatch:
    width = max(len(s.input_ids) for s in samples)

    def rows(get: Callable[[TurnSample], list[Any]], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(len(samples), width, dtype=dtype)
        for r, sample in enumerate(samples):
            values = get(sample)
            out[r, : len(values)] = torch.tensor(values, dtype=dtype)
        return out.to(device)

    starts = [s.loss_mask.index(1) for s in samples if 1 in s.loss_mask]
    return MicroBatch(
        first_scored=max(min(starts) - 1, 0) if starts else 0,
        input_ids=rows(lambda s: s.input_ids, torch.long),
        attention_mask=rows(lambda s: [1] * len(s.input_ids), torch.long),
        loss_mask=rows(lambda s: s.loss_mask, torch.float32),
        behaviour=rows(lambda s: s.behaviour_logprobs, torch.float32),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
    )


# a micro-batch's loss (already divided by the batch's count), its summed statistics (clipped tokens, ratio sum,
# tokens kept by the band, tokens masked by it, KL sum) and its largest ratio
LossParts = tuple[torch.Tensor, torch.Tensor, float]

_DUMMY = TurnSample(input_ids=[0, 0], loss_mask=[0, 0], behaviour_logprobs=[0.0, 0.0], advantage=0.0)


class PolicyTrainer:
    def __init__(
        self,
        settings: LearnerSettings,
        model_dir: Path,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        dist: DistInfo | None = None,
        sampling_temperature: float = 1.0,
    ) -> None:
        """``sampling_temperature``: the generators' (``generator.sampling.temperature``); the behaviour log-probs are
        of the logits divided by it, so the learner's are too (greedy, 0: the plain logits)."""
        from transformers import AutoModelForCausalLM

        self.temperature = sampling_temperature if sampling_temperature > 0 else 1.0
        if settings.loss_aggregation not in ("token", "sequence"):
            raise ValueError(f"learner.loss_aggregation {settings.loss_aggregation!r}: choose token or sequence")
        self.settings = settings
        self.model_dir = Path(model_dir)
        self.dist = dist
        self.device = dist.device if dist is not None else device or _pick_device(settings.device)
        self.dtype = dtype or _pick_dtype(settings.dtype, self.device)
        self.step = 0
        self._tokenizer: Any = None
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        model.config.use_cache = False
        model.to(self.device)
        self.is_lora = settings.lora_rank > 0
        self._reference: torch.nn.Module | None = None
        if settings.kl_coef > 0 and not self.is_lora:
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.is_lora:
            from peft import LoraConfig, get_peft_model

            if settings.gradient_checkpointing:
                model.enable_input_require_grads()
            config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                target_modules=list(settings.lora_target_modules), task_type="CAUSAL_LM")  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(LORA_SEED)
                model = get_peft_model(model, config)
        model.train()
        self.model: Any = model  # the (peft) model; under FSDP2 sharded in place
        self.engine: Any = dist.parallelize(model) if dist is not None else model  # what forward/backward go through
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        self.total_params = sum(p.numel() for p in model.parameters())
        if dist is not None and dist.fsdp:  # sharded: numel() counts this rank's shard
            counts = dist.all_reduce(torch.tensor([self.trainable_params, self.total_params], dtype=torch.float64))
            self.trainable_params, self.total_params = int(counts[0]), int(counts[1])
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                           betas=tuple(settings.adam_betas), eps=settings.adam_eps)  # fmt: skip

    # ---- steps

    def train_step(self, samples: Sequence[TurnSample]) -> TrainStats:
        """One optimiser step of the PPO-clip objective (+ KL) on ``samples`` (under ``dist``: this rank's share)."""
        s = self.settings
        token_level = s.loss_aggregation == "token"

        def loss_fn(batch: MicroBatch, tokens: float, sequences: float) -> LossParts:
            denominator = tokens if token_level else sequences
            new = self._logprobs(self.engine, batch)
            loss, ls = ppo_clip_loss(new, batch.behaviour, batch.advantages, batch.loss_mask, clip_eps=s.clip_eps,
                                     truncate_is=s.truncate_is or None, ratio_band=s.ratio_band or None,
                                     aggregation=s.loss_aggregation, denominator=denominator)  # fmt: skip
            kl_sum = torch.zeros((), device=self.device)
            if s.kl_coef > 0:
                with torch.no_grad():
                    ref = self._reference_logprobs(batch)
                delta = (ref - new) * batch.loss_mask
                k3 = (torch.exp(delta) - delta - 1) * batch.loss_mask
                per_row = k3.sum(-1) if token_level else k3.sum(-1) / batch.loss_mask.sum(-1).clamp(min=1)
                kl_loss = per_row.sum() / denominator
                loss = loss + s.kl_coef * kl_loss
                kl_sum = k3.sum().detach()
            kept = float(ls.tokens)
            parts = torch.tensor([ls.clip_fraction * kept, ls.ratio_mean * kept, kept, ls.masked_by_band], device=self.device)
            return loss, torch.cat([parts, kl_sum.float().reshape(1)]), ls.ratio_max if kept else 0.0

        return self._step(samples, loss_fn)

    def sft_step(self, samples: Sequence[TurnSample]) -> TrainStats:
        """One optimiser step of cross-entropy on the loss-mask tokens, averaged over the batch's tokens."""

        def loss_fn(batch: MicroBatch, tokens: float, sequences: float) -> LossParts:
            logp = self._logprobs(self.engine, batch)
            loss = -(logp * batch.loss_mask).sum() / tokens
            n = batch.loss_mask.sum()
            return loss, torch.stack([torch.zeros_like(n), n, n, torch.zeros_like(n), torch.zeros_like(n)]), 1.0

        return self._step(samples, loss_fn)

    def _step(self, samples: Sequence[TurnSample], loss_fn: Callable[[MicroBatch, float, float], LossParts]) -> TrainStats:
        t0 = time.perf_counter()
        groups = pack(samples, self.settings.max_tokens_per_gpu)
        counts = torch.tensor([sum(sum(x.loss_mask) for x in samples), len(samples), len(groups)], dtype=torch.float64)
        if self.dist is not None:
            counts = torch.cat([self.dist.all_reduce(counts[:2]), self.dist.all_reduce(counts[2:], op="max")])
        tokens, sequences, rounds = int(counts[0]), int(counts[1]), int(counts[2])
        if sequences == 0:
            raise ValueError("a training step needs at least one turn")
        scale = 1.0 if self.dist is None else float(self.dist.world_size)  # undo DDP/FSDP's gradient averaging
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        sums = torch.zeros(5, device=self.device)  # clipped, ratio sum, kept tokens, masked by band, kl sum
        ratio_max = 0.0
        for r in range(rounds):
            real = r < len(groups)
            batch = collate([samples[i] for i in groups[r]] if real else [_DUMMY], self.device)
            with self._sync(last=r == rounds - 1):
                loss, parts, batch_ratio_max = loss_fn(batch, max(tokens, 1), sequences)
                (loss * (scale if real else 0.0)).backward()
            if real:
                loss_sum += float(loss.detach())
                sums += parts.detach()
                ratio_max = max(ratio_max, batch_ratio_max)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.step += 1
        totals = torch.cat([torch.tensor([loss_sum], device=self.device), sums.float()]).double()
        if self.dist is not None:
            totals = self.dist.all_reduce(totals)
            ratio_max = float(self.dist.all_reduce(torch.tensor([ratio_max]), op="max")[0])
        loss_total, clipped, ratio_sum, kept, banded, kl_sum = (float(x) for x in totals)
        return TrainStats(
            loss=loss_total,
            grad_norm=grad_norm,
            learning_rate=float(self.optimizer.param_groups[0]["lr"]),
            tokens=tokens,
            sequences=sequences,
            clip_fraction=clipped / kept if kept else 0.0,
            ratio_mean=ratio_sum / kept if kept else 1.0,
            ratio_max=ratio_max if kept else 1.0,
            masked_by_band=int(banded),
            kl=kl_sum / tokens if tokens else 0.0,
            time_s=time.perf_counter() - t0,
        )

    def _logprobs(self, module: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
        """``[rows, width]`` log-probs of the tokens; the output head runs only from ``first_scored`` on (a turn's
        prompt is mostly before it: on a small model with a large vocabulary the head is most of the compute)."""
        first, width = batch.first_scored, batch.input_ids.shape[1]
        out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                     logits_to_keep=width - first)  # fmt: skip
        logits = out.logits if self.temperature == 1.0 else out.logits.float() / self.temperature
        return torch.nn.functional.pad(token_logprobs(logits, batch.input_ids[:, first:]), (first, 0))

    def _reference_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        if self._reference is not None:
            return self._logprobs(self._reference, batch)
        with self.model.disable_adapter():
            return self._logprobs(self.model, batch)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Gradients are reduced across ranks on the last micro-batch's backward only."""
        if self.dist is None or last:
            return contextlib.nullcontext()
        return self.dist.no_sync(self.engine)

    def _clip_gradients(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
        return float(full() if callable(full) else norm)

    # ---- weights and checkpoints

    def _lead(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The full state dict, gathered on every rank under FSDP2 (a collective); None where the model's own is whole."""
        if self.dist is None or not self.dist.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_policy(self, out_dir: Path) -> str:
        """Write the policy (the adapter alone with LoRA) to ``out_dir``; its ``weights_sha256`` ("" on ranks > 0)."""
        state = self._full_model_state()
        if not self._lead():
            return ""
        out_dir = Path(out_dir)
        with _staged(out_dir) as tmp:
            kwargs = {} if state is None else {"state_dict": state}
            self.model.save_pretrained(tmp, safe_serialization=True, **kwargs)
            if not self.is_lora:
                self.tokenizer.save_pretrained(tmp)
        return weights_sha256(out_dir)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        return self._tokenizer

    def _state_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        distributed = self.dist is not None
        return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed, ignore_frozen_params=self.is_lora)

    def save_checkpoint(self, ckpt_dir: Path, meta: dict[str, Any]) -> None:
        """Trainable weights, optimiser state, step, RNG and ``meta`` (JSON) into ``ckpt_dir`` (rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options())
        if not self._lead():
            return
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"model": model_state, "optimizer": optim_state, "step": self.step, "rng": rng}
        with _staged(Path(ckpt_dir)) as tmp:
            torch.save(state, tmp / CHECKPOINT_STATE)
            (tmp / CHECKPOINT_META).write_text(json.dumps(meta))

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any] | None:
        """Restore what ``save_checkpoint`` wrote (every rank reads it); its ``meta``, or None when there is none."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = Path(ckpt_dir) / CHECKPOINT_STATE
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        options = self._state_options()
        options = type(options)(**{**vars(options), "strict": not self.is_lora})
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)  # fmt: skip
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return json.loads((Path(ckpt_dir) / CHECKPOINT_META).read_text())


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` to fill; on success it replaces ``target`` (old one renamed away, then
    deleted), so a reader finds the old directory or the new one, complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 would hide it from other users
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}") if target.exists() else None
        if old is not None:
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"learner.dtype {name!r}: choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]
