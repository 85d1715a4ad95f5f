"""Learner throughput: tokens/s through ``PolicyTrainer.train_step`` (PPO-clip, AdamW) on synthetic turns shaped like
real ones (prompt ~500 tokens, response ~300), on the CPU default policy shape or, with ``--model``, any local model.

The default model is ``[policy]``'s ``smollm2-mini`` shape: a randomly initialised Llama with SmolLM2's tokenizer
(vocabulary 49,152), ``mini_layers`` layers, ``mini_hidden`` hidden, ``mini_heads`` heads (intermediate 3× hidden,
tied embeddings), built into a temporary directory. Settings are the learner's defaults (float32 on the CPU,
gradient checkpointing, ``max_tokens_per_gpu`` 8,192).

tokens/s counts every token of the turns (prompt and response: each goes through forward and backward). The
baseline, in the same process on the same model and turns (its steps alternate with the learner's): the plain
transformers way, ``model(input_ids, labels=...)`` cross-entropy on the response tokens, one sequence at a time,
then the same AdamW step (``ratio_vs_plain`` = learner tokens/s ÷ baseline tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from kernelrl.actors.learn_objective import TurnSample, turn_sample
from kernelrl.actors.learn_trainer import PolicyTrainer
from kernelrl.core.config import LearnerSettings, PolicySettings


def build_mini_model(out_dir: Path, policy: PolicySettings) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from kernelrl.actors.gen_models import demo_tokenizer

    tokenizer = demo_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=policy.mini_hidden, intermediate_size=3 * policy.mini_hidden,
                         num_hidden_layers=policy.mini_layers, num_attention_heads=policy.mini_heads,
                         max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=pad)  # fmt: skip
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def synthetic_turns(n: int, vocab: int, seed: int = 0) -> list[TurnSample]:
    """``n`` turns of 450–550 prompt and 250–350 response tokens, behaviour log-probs near a sampled token's."""
    g = torch.Generator().manual_seed(seed)
    turns = []
    for i in range(n):
        prompt_len = int(torch.randint(450, 551, (1,), generator=g))
        response_len = int(torch.randint(250, 351, (1,), generator=g))
        ids = torch.randint(0, vocab, (prompt_len + response_len,), generator=g).tolist()
        logprobs = (-10.8 + 0.1 * torch.randn(response_len, generator=g)).tolist()
        turns.append(turn_sample(ids[:prompt_len], ids[prompt_len:], logprobs, advantage=(1.0, -1.0)[i % 2]))
    return turns


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, turns: list[TurnSample]) -> None:
    optimizer.zero_grad(set_to_none=True)
    for turn in turns:
        ids = torch.tensor([turn.input_ids])
        labels = torch.tensor([[t if k else -100 for t, k in zip(turn.input_ids, turn.loss_mask, strict=True)]])
        (model(input_ids=ids, labels=labels, use_cache=False).loss / len(turns)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def measure(model_dir: Path, label: str, steps: int, turns_per_step: int) -> dict[str, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = LearnerSettings(learning_rate=1e-6)
    vocab = AutoConfig.from_pretrained(model_dir, local_files_only=True).vocab_size
    batches = [synthetic_turns(turns_per_step, vocab, seed=s) for s in range(steps + 1)]
    tokens = sum(len(t.input_ids) for b in batches[1:] for t in b)

    trainer = PolicyTrainer(settings, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).train()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    trainer.train_step(batches[0])  # warm-up
    plain_step(model, optimizer, batches[0])
    learner_s = plain_s = 0.0
    stats = []
    for b in batches[1:]:  # alternating, so that load from elsewhere weighs on both alike
        t0 = time.perf_counter()
        stats.append(trainer.train_step(b))
        t1 = time.perf_counter()
        plain_step(model, optimizer, b)
        learner_s, plain_s = learner_s + t1 - t0, plain_s + time.perf_counter() - t1
    trainable, total = trainer.trainable_params, trainer.total_params
    return {
        "model": label,
        "params": total,
        "trainable": trainable,
        "steps": steps,
        "turns_per_step": turns_per_step,
        "tokens_per_step": tokens // steps,
        "tokens_per_s": round(tokens / learner_s, 1),
        "response_tokens_per_s": round(sum(s.tokens for s in stats) / learner_s, 1),
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "ratio_vs_plain": round(plain_s / learner_s, 3),
        "step_s": round(learner_s / steps, 3),
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller steps: under 30 s on the default model")
    parser.add_argument("--model", default="", help="a local transformers model directory (default: the mini policy)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 2 with --quick, else 5)")
    parser.add_argument("--turns", type=int, default=0, help="turns per step (default 2 with --quick, else 8)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's, one per core); on a shared "
        "machine 1 avoids the stalls of a thread waiting for a core another process holds",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (2 if args.quick else 5)
    turns = args.turns or (2 if args.quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, label = Path(args.model).expanduser(), Path(args.model).name
        else:
            policy = PolicySettings()
            model_dir = build_mini_model(Path(tmp) / "mini", policy)
            label = f"smollm2-mini ({policy.mini_layers} layers, hidden {policy.mini_hidden})"
        figures = measure(model_dir, label, steps, turns)
    print(f"learner on {figures['model']}: {figures['tokens_per_s']:,} tokens/s ({figures['step_s']} s per "
          f"{figures['tokens_per_step']}-token step); plain transformers: {figures['plain_tokens_per_s']:,} tokens/s",
          file=sys.stderr)  # fmt: skip
    print(json.dumps({"bench": "learner", **figures, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
