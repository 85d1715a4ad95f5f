"""The warm start: supervised fine-tuning of the base policy on (PyTorch problem, Triton solution) pairs.

A pair trains as one turn exactly as the generator would produce it: the prompt is the first turn's chat
(``prompts.turn_messages`` through the tokenizer's chat template with the generation prompt, the ids
``HFBackend.prompt_ids`` builds), the response is the answer the generator would have to sample (the solution
in a ```python block) tokenised on its own, then the end-of-sequence token. The loss covers the response
tokens only, and the optimiser step and checkpoint are the learner's (``learn_trainer.PolicyTrainer.sft_step``,
``save_policy``), so the warm-started policy is a directory the generator and the learner load like any other.

Training: up to ``policy.epochs`` passes over the pairs, each in an order shuffled from ``policy.seed``, in batches
of at most ``policy.batch_tokens`` padded tokens, one optimiser step each; the learning rate warms up linearly and
decays on a cosine. It stops after the first epoch whose mean loss per answer token is at most
``policy.target_loss``: a policy that has not quite memorised its answers writes, sampled at temperature 1, a
correct kernel some of the time and a broken one otherwise (about exp(-loss x answer tokens) of the answers come
out clean), the reward spread GRPO learns from; trained to the end it would nearly always write the same answer.

Invariant: the result is cached by content in ``<generator.model_cache_dir>/warm-<key>``, where the key hashes
the base model (its config and weights), the training samples' token ids (so the problems, solutions, prompt
and tokenizer), the SFT settings and ``FORMAT_VERSION``. The directory is written into a temporary sibling and
renamed into place: found, it is complete and is returned without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from kernelrl.actors.buffer_state import Sampler
from kernelrl.actors.gen_models import weights_sha256
from kernelrl.actors.learn_objective import TurnSample, turn_sample
from kernelrl.actors.policy_init import resolve_base
from kernelrl.core.config import Config, LearnerSettings, PolicySettings
from kernelrl.core.problems import ProblemSet, problem_set
from kernelrl.core.prompts import turn_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what a sample holds or how it trains changes
# A small model trained from scratch on a few pairs learns in a few hundred steps only with a warm-up, a decay and
# Adam's second moment averaged over fewer steps than the learner's default.
SFT_BETAS = (0.9, 0.95)
WARMUP_STEPS = 10
FINAL_LR_SHARE = 0.1


Progress = Callable[[int, float, float], None]  # (epoch, mean loss per answer token, seconds so far)


class Pair(msgspec.Struct, frozen=True, kw_only=True):
    problem: str  # the PyTorch reference program
    solution: str  # the Triton program the answer holds
    problem_id: str = ""  # for messages only


class PairsError(ValueError):
    """A pairs file that cannot be read, or no pairs at all."""


class _PairLine(msgspec.Struct, forbid_unknown_fields=True):
    solution: str
    problem: str | None = None
    problem_id: str | None = None


def load_pairs(path: str, problems: ProblemSet, problem_ids: Sequence[str]) -> list[Pair]:
    """``path`` "": the reference solutions of ``problem_ids`` (those that have one); else a JSONL file of
    ``{"problem": <source>, "solution": ...}`` or ``{"problem_id": <id in problems>, "solution": ...}`` lines."""
    if not path:
        pairs = [
            Pair(problem=p.source, solution=p.solution, problem_id=p.id)
            for p in (problems.get(i) for i in problem_ids)
            if p.solution
        ]
        if not pairs:
            raise PairsError(f"none of the {len(problem_ids)} training problems under {problems.root} has a reference solution")
        return pairs
    file = Path(path).expanduser()
    try:
        lines = file.read_text().splitlines()
    except OSError as exc:
        raise PairsError(f"policy.pairs: cannot read {file}: {exc}") from exc
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = msgspec.json.decode(line, type=_PairLine)
            if (entry.problem is None) == (entry.problem_id is None):
                raise ValueError('give exactly one of "problem" (a source) and "problem_id"')
            if not entry.solution.strip():
                raise ValueError('"solution" is empty')
            if entry.problem_id is not None:
                pairs.append(Pair(problem=problems.get(entry.problem_id).source, solution=entry.solution,
                                  problem_id=entry.problem_id))  # fmt: skip
            else:
                pairs.append(Pair(problem=entry.problem or "", solution=entry.solution, problem_id=f"{file.name}:{number}"))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError) as exc:
            raise PairsError(f"{file}:{number}: {exc}") from exc
    if not pairs:
        raise PairsError(f"{file}: no pairs")
    return pairs


def answer_text(solution: str) -> str:
    """What the generator would have to write: the solution in one python block."""
    return f"```python\n{solution.strip()}\n```"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem_source: str) -> list[int]:
    """The first turn's prompt, as ``HFBackend.prompt_ids`` builds it from ``turn_messages``."""
    messages = [msgspec.structs.asdict(message) for message in turn_messages(problem_source, [])]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def sft_sample(tokenizer: PreTrainedTokenizerBase, pair: Pair) -> TurnSample:
    """One turn: the first-turn prompt, then the answer's tokens and the end-of-sequence token (the loss mask)."""
    if tokenizer.eos_token_id is None:
        raise PairsError("the base model's tokenizer names no end-of-sequence token")
    response = [*tokenizer(answer_text(pair.solution), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return turn_sample(prompt_ids(tokenizer, pair.problem), response, [0.0] * len(response), 0.0)


def training_problems(config: Config) -> tuple[ProblemSet, list[str]]:
    """The problem set of ``rollout.problem_dir`` and the buffer's training problems in it (``buffer.problems``,
    less the held-out ones)."""
    problem_dir = config.rollout.problem_dir
    problems = problem_set(problem_dir)
    return problems, Sampler([p.id for p in problems.problems], config.buffer).train


def sft_learner_settings(config: Config) -> LearnerSettings:
    """The learner's optimiser and checkpoint settings, with the warm start's learning rate and batch size."""
    policy = config.policy
    return LearnerSettings(
        device=config.learner.device,
        dtype=config.learner.dtype,
        learning_rate=policy.learning_rate,
        adam_betas=SFT_BETAS,
        max_tokens_per_gpu=policy.batch_tokens,
        gradient_checkpointing=False,
    )


def lr_factor(step: int, total: int) -> float:
    """The learning rate's share at optimiser step ``step`` (from 0) of ``total``: a linear warm-up over the first
    tenth (at most ``WARMUP_STEPS``), then a cosine decay to ``FINAL_LR_SHARE``."""
    warmup = max(1, min(WARMUP_STEPS, total // 10))
    cosine = 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    return min(1.0, (step + 1) / warmup) * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * cosine)


def batches(samples: Sequence[TurnSample], batch_tokens: int, rng: random.Random) -> list[list[TurnSample]]:
    """One epoch: the samples shuffled, cut into consecutive batches of at most ``batch_tokens`` padded tokens
    (rows x longest row; a longer sample is a batch of its own)."""
    order = list(samples)
    rng.shuffle(order)
    out: list[list[TurnSample]] = []
    width = 0
    for sample in order:
        wider = max(width, len(sample.input_ids))
        if out and wider * (len(out[-1]) + 1) <= batch_tokens:
            out[-1].append(sample)
            width = wider
        else:
            out.append([sample])
            width = len(sample.input_ids)
    return out


def cache_key(base: Path, samples: Sequence[TurnSample], policy: PolicySettings) -> str:
    digest = hashlib.sha256()
    header = {
        "format": FORMAT_VERSION,
        "base_config": (base / "config.json").read_text(),
        "base_weights": weights_sha256(base),
        "sft": [policy.epochs, policy.learning_rate, policy.batch_tokens, policy.seed, policy.target_loss],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for sample in samples:
        digest.update(msgspec.json.encode([sample.input_ids, sample.loss_mask]))
    return digest.hexdigest()[:16]


def train(
    base: Path,
    samples: Sequence[TurnSample],
    config: Config,
    out_dir: Path,
    progress: Progress | None = None,
) -> str:
    """Fine-tune ``base`` on ``samples`` for up to ``policy.epochs`` epochs and save it to ``out_dir``; its weights'
    sha256. ``progress(epoch, mean loss per response token, seconds so far)`` after each epoch."""
    import torch

    from kernelrl.actors.learn_trainer import PolicyTrainer

    policy = config.policy
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(policy.seed)
        trainer = PolicyTrainer(sft_learner_settings(config), base)
        rng = random.Random(policy.seed)
        plan = [batches(samples, policy.batch_tokens, rng) for _ in range(policy.epochs)]
        total = sum(len(epoch) for epoch in plan)
        for epoch, epoch_batches in enumerate(plan, start=1):
            loss_sum = tokens = 0.0
            for batch in epoch_batches:
                for group in trainer.optimizer.param_groups:
                    group["lr"] = policy.learning_rate * lr_factor(trainer.step, total)
                stats = trainer.sft_step(batch)
                loss_sum += stats.loss * stats.tokens
                tokens += stats.tokens
            loss = loss_sum / max(tokens, 1)
            if progress is not None:
                progress(epoch, loss, time.perf_counter() - t0)
            if loss <= policy.target_loss:
                break
        return trainer.save_policy(out_dir)


def warm_start(config: Config, out_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The warm-started policy's directory: from the cache, else trained now and cached (or saved to ``out_dir``).
    ``progress`` is called after each epoch of a training (default: a log line)."""
    from transformers import AutoTokenizer

    policy = config.policy
    cache_dir = Path(config.generator.model_cache_dir).expanduser()
    base = resolve_base(policy, cache_dir, _device_type(config))
    problems, problem_ids = training_problems(config)
    pairs = load_pairs(policy.pairs, problems, problem_ids)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    samples = [sft_sample(tokenizer, pair) for pair in pairs]
    target = cache_dir / f"warm-{cache_key(base, samples, policy)}"
    if (target / "config.json").is_file():
        log.info("warm start: cached in %s", target)
        return _copy_to(target, out_dir) if out_dir is not None else target
    tokens = sum(sum(s.loss_mask) for s in samples)
    log.info("warm start: %s on %d pairs (%d answer tokens), %d epochs, lr %g", base.name, len(samples), tokens,
             policy.epochs, policy.learning_rate)  # fmt: skip

    def log_progress(epoch: int, loss: float, elapsed: float) -> None:
        log.info("warm start: epoch %d/%d  loss %.4f  %.1fs", epoch, policy.epochs, loss, elapsed)

    sha = train(base, samples, config, target, progress or log_progress)
    log.info("warm start: saved %s (sha256 %s)", target, sha[:12])
    return _copy_to(target, out_dir) if out_dir is not None else target


def resolve_policy(config: Config, out_dir: Path | None = None) -> Path:
    """The run's starting policy: the base model, warm-started when ``policy.warm_start``."""
    if config.policy.warm_start:
        return warm_start(config, out_dir)
    base = resolve_base(config.policy, Path(config.generator.model_cache_dir).expanduser(), _device_type(config))
    return _copy_to(base, out_dir) if out_dir is not None else base


def _device_type(config: Config) -> str:
    import torch

    device = config.learner.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.partition(":")[0]


def _copy_to(source: Path, out_dir: Path) -> Path:
    """``source`` copied to ``out_dir`` (through a temporary sibling renamed into place; one there is replaced)."""
    out_dir = out_dir.expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{time.monotonic_ns()}")
    try:
        shutil.copytree(source, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
