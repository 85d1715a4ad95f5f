"""A documented sample event stream: what a run publishes, without a model or a GPU.

Until the generator, buffer and learner roles exist, ``kernelrl run`` drives the logger with this
stream: per step, ``groups`` GRPO groups of ``samples`` dialogues of up to 3 turns over a handful of
KernelBench-style problems, scored with the real reward maths (``core.reward``), then a step summary
with the group statistics and turn-advantage table, and an eval summary. Records are realistic in
size (about 5 KB per turn: prompt, response, kernel, eval result). Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from kernelrl.core import messages as m
from kernelrl.core import reward
from kernelrl.core.advantages import group_turn_advantages, has_spread
from kernelrl.core.config import RewardConfig, SampleSettings
from kernelrl.core.subjects import RunSubjects

PROBLEMS = ("level1/19_ReLU", "level1/23_Softmax", "level1/40_LayerNorm", "level2/12_Gemm_Multiply_LeakyReLU")

REFERENCE = '''import torch
import torch.nn as nn


class Model(nn.Module):
    """Reference program: applies the operation to a batch of activations."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


batch_size = 16
dim = 16384


def get_inputs():
    x = torch.randn(batch_size, dim)
    return [x]


def get_init_inputs():
    return []
'''

KERNEL = """import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(axis=0)
    block_start = pid * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    out = tl.where(x > 0, x, 0.0)
    tl.store(out_ptr + offsets, out, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n_elements = out.numel()
        grid = lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)
        relu_kernel[grid](x, out, n_elements, BLOCK_SIZE=1024)
        return out
"""

SYSTEM_PROMPT = (
    "You write Triton kernels. Given a PyTorch reference program, write a class ModelNew with the same "
    "interface whose forward launches one or more @triton.jit kernels. Answer with one ```python block."
)

ERRORS = (
    (
        "compile",
        "triton.compiler.errors.CompilationError: at 12:8:\n    x = tl.load(x_ptr + offsets)\n"
        "        ^\nValueError: Mask argument cannot be block type if pointer argument is not a block",
    ),
    ("mismatch", "Output mismatch in trial 2/5: max_abs_error=0.8731 rel_error=0.4122 (atol=0.01, rtol=0.01)"),
    ("runtime", "RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered"),
)


def _eval_result(rng: random.Random, problem_id: str, quality: float) -> m.EvalResult:
    compiled = rng.random() < 0.5 + 0.5 * quality
    correct = compiled and rng.random() < 0.3 + 0.6 * quality
    baseline = round(rng.uniform(0.5, 6.0), 3)
    speedup = round(rng.uniform(0.5, 1.0 + 2.5 * quality), 3) if correct else 0.0
    kind, message = ("", "") if correct else rng.choice(ERRORS[:1] if not compiled else ERRORS[1:])
    return m.EvalResult(
        compiled=compiled,
        correctness=correct,
        runtime=round(baseline / speedup, 3) if correct else -1.0,
        speedup=speedup,
        error_message=message,
        eval_id=m.new_id(),
        problem_id=problem_id,
        baseline_runtime=baseline,
        error_kind=kind,
        max_abs_error=0.0 if correct else None,
        timings={"compile_s": round(rng.uniform(0.5, 3.0), 3), "check_s": round(rng.uniform(0.1, 1.0), 3)},
        device="sample",
        evaluator_id="sample-evaluator",
    )


def sample_trajectory(
    rng: random.Random,
    run_id: str,
    problem_id: str,
    group_id: str,
    sample_idx: int,
    n_samples: int,
    policy_version: int,
    config: RewardConfig,
) -> tuple[list[m.TurnEvent], m.TrajectoryEvent]:
    trajectory_id = m.new_id()
    quality = rng.random()
    user_prompt = f"Problem {problem_id}. Reference program:\n```python\n{REFERENCE}```"
    messages = [m.ChatMessage("system", SYSTEM_PROMPT), m.ChatMessage("user", user_prompt)]
    results: list[m.EvalResult] = []
    scores: list[float] = []
    responses: list[str] = []
    reason: str | None = None
    while reason is None:
        quality = min(1.0, quality + 0.2 * len(scores))
        result = _eval_result(rng, problem_id, quality)
        response = f"Turn {len(scores) + 1}: a vectorised elementwise kernel.\n```python\n{KERNEL}```"
        results.append(result)
        responses.append(response)
        scores.append(reward.turn_score(result.compiled, result.correctness, result.speedup, config))
        reason = reward.termination_reason(scores, config)
    returns = reward.discounted_returns(scores, config.gamma)
    turns = []
    for t, (result, response) in enumerate(zip(results, responses, strict=True)):
        prompt = list(messages)
        messages += [m.ChatMessage("assistant", response)]
        if t + 1 < len(results):
            feedback = f"Attempt {t + 1}: compiled={result.compiled} correct={result.correctness} {result.error_message}"
            messages += [m.ChatMessage("user", feedback)]
        n_prompt = sum(len(c.content) for c in prompt) // 4
        n_resp = len(response) // 4
        turns.append(
            m.TurnEvent(
                event_id=m.new_id(),
                timestamp=m.log_timestamp(),
                instance_id=problem_id,
                turn_idx=t,
                turn_data=m.TurnData(
                    prompt=prompt,
                    response=response,
                    kernel_code=KERNEL,
                    eval_result=result,
                    reward=scores[t],
                    turn_return=returns[t],
                    extra_info={"sample": True},
                    prompt_token_ids=list(range(n_prompt % 64)),
                    response_token_ids=[rng.randrange(32000) for _ in range(n_resp % 64)],
                    response_logprobs=[round(-rng.random(), 4) for _ in range(n_resp % 64)],
                ),
                run_id=run_id,
                trajectory_id=trajectory_id,
                group_id=group_id,
                sample_idx=sample_idx,
                policy_version=policy_version,
                generator_id="sample-generator",
            )
        )
    last = results[-1]
    trajectory = m.TrajectoryEvent(
        event_id=m.new_id(),
        timestamp=m.log_timestamp(),
        instance_id=problem_id,
        final_reward=scores[-1],
        num_turns=len(scores),
        turn_rewards=scores,
        aggregated_return=returns[0],
        history=[
            m.HistoryEntry(turn_idx=t, kernel_code=KERNEL, eval_result=r, reward=sc)
            for t, (r, sc) in enumerate(zip(results, scores, strict=True))
        ],
        messages=messages,
        execution_details=m.ExecutionDetails(
            final_compiled=last.compiled,
            final_correctness=last.correctness,
            final_runtime=last.runtime,
            final_speedup=last.speedup,
        ),
        run_id=run_id,
        trajectory_id=trajectory_id,
        group_id=group_id,
        sample_idx=sample_idx,
        n_samples=n_samples,
        policy_version=policy_version,
        turn_returns=returns,
        termination_reason=reason,
        rollout_time_s=round(rng.uniform(5, 60), 2),
        generator_id="sample-generator",
    )
    return turns, trajectory


def sample_run(
    run_id: str, sample: SampleSettings | None = None, config: RewardConfig | None = None
) -> Iterator[tuple[str, m.Message]]:
    """(subject, message) pairs in publication order."""
    sample = sample or SampleSettings()
    config = config or RewardConfig()
    steps, groups, samples = sample.steps, sample.groups, sample.samples
    rng = random.Random(sample.seed)
    subjects = RunSubjects(run_id)
    for step in range(1, steps + 1):
        kept, filtered, early, advantage_rows = 0, 0, 0, []
        rollout_time = 0.0
        for g in range(groups):
            problem_id = PROBLEMS[(step * groups + g) % len(PROBLEMS)]
            group_id = f"step{step}-g{g}-{m.new_id()[:8]}"
            trajectories = []
            for i in range(samples):
                turns, trajectory = sample_trajectory(rng, run_id, problem_id, group_id, i, samples, step - 1, config)
                for turn in turns:
                    yield subjects.event_turn, turn
                trajectories.append(trajectory)
                early += trajectory.num_turns < config.max_turns
                rollout_time = max(rollout_time, trajectory.rollout_time_s)
            if not has_spread([t.aggregated_return for t in trajectories], min_group_std=1e-6):
                filtered += 1
            else:
                kept += 1
                # the table's cells: each rollout's advantage at each of its turns
                advantage_rows += group_turn_advantages([t.turn_returns for t in trajectories])
            for t in trajectories:
                yield subjects.event_trajectory, t
        total_tokens = groups * samples * 2400
        yield (
            subjects.event_step,
            m.StepSummary(
                event_id=m.new_id(),
                step=step,
                timestamp=m.log_timestamp(),
                run_id=run_id,
                total_steps=steps,
                policy_version=step,
                loss=round(rng.uniform(-0.05, 0.05), 4),
                grad_norm=round(rng.uniform(0.2, 1.2), 4),
                learning_rate=1e-6,
                tokens_trained=total_tokens // 4,
                trainable_token_share=0.25,
                groups=m.GroupSummary(
                    total_groups=groups,
                    groups_kept=kept,
                    groups_filtered=filtered,
                    num_early_exit=early,
                    num_rollouts=groups * samples,
                    rollout_time_s=rollout_time,
                    training_time_s=round(rng.uniform(1, 3), 2),
                    total_tokens=total_tokens,
                    trainable_tokens=total_tokens // 4,
                    turn_advantages=advantage_rows,
                ),
            ),
        )
    yield (
        subjects.event_eval,
        m.EvalSummary(
            event_id=m.new_id(),
            step=steps,
            accuracy=0.5,
            correct_answers=groups,
            total_samples=2 * groups,
            timestamp=m.log_timestamp(),
            run_id=run_id,
            policy_version=steps,
            compiled=2 * groups - 1,
            attempted_answer=2 * groups - 1,
            avg_reward=0.62,
            median_reward=0.4,
            std_reward=0.55,
            max_reward=1.9,
            fast_p={"0.0": 0.5, "1.0": 0.25, "1.5": 0.125},
            avg_turns_correct=1.75,
            extra={"sample": True},
        ),
    )
