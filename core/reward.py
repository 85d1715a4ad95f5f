"""Reward maths, as pure functions: per-turn score, discounted returns, early termination (advantages:
``core/advantages.py``).

``s = w_compile·compiled + w_correct·correct + correct·min(max(speedup − 1, 0), cap)``;
``R_t = Σ_{i≥t} γ^(i−t)·s_i``; a trajectory's ``aggregated_return`` is ``R_0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kernelrl.core.config import RewardConfig
from kernelrl.core.messages import EvalResult


class TerminationReason:
    SUCCESS = "success"
    ALL_FAILED = "all_failed"
    MAX_TURNS = "max_turns"


def turn_score(compiled: bool, correct: bool, speedup: float, config: RewardConfig) -> float:
    score = config.compile_weight * compiled + config.correct_weight * correct
    if correct and math.isfinite(speedup):
        score += min(max(speedup - 1.0, 0.0), config.speedup_cap)
    return score


def result_score(result: EvalResult, config: RewardConfig) -> float:
    """The score of one evaluated turn. An interpreter (CPU) timing is not a real timing: its speedup counts
    only with ``reward_interpreter_speedup``."""
    speedup = result.speedup if (config.reward_interpreter_speedup or not result.interpreter) else 0.0
    return turn_score(result.compiled, result.correctness, speedup, config)


def discounted_returns(scores: Sequence[float], gamma: float) -> list[float]:
    returns = [0.0] * len(scores)
    running = 0.0
    for t in range(len(scores) - 1, -1, -1):
        running = scores[t] + gamma * running
        returns[t] = running
    return returns


def termination_reason(scores: Sequence[float], config: RewardConfig) -> str | None:
    """Why the dialogue stops after these turns, or None to go on."""
    if scores and scores[-1] >= config.success_score:
        return TerminationReason.SUCCESS
    if len(scores) >= 2 and all(s == 0.0 for s in scores):
        return TerminationReason.ALL_FAILED
    if len(scores) >= config.max_turns:
        return TerminationReason.MAX_TURNS
    return None


def dialogue_termination(results: Sequence[EvalResult], scores: Sequence[float], config: RewardConfig) -> str | None:
    """``termination_reason``, and one rule for timings that earn nothing: a correct kernel timed on the CPU
    interpreter (speedup not rewarded) has reached the best score this device can give, so it is a success."""
    if results and results[-1].correctness and results[-1].interpreter and not config.reward_interpreter_speedup:
        return TerminationReason.SUCCESS
    return termination_reason(scores, config)
