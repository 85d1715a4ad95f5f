"""Reward maths as specified in ARCHITECTURE.md."""

from __future__ import annotations

import pytest

from kernelrl.core.config import RewardConfig
from kernelrl.core.reward import (
    TerminationReason,
    discounted_returns,
    termination_reason,
    turn_score,
)

CFG = RewardConfig()


def test_turn_score_weights_compile_correct_and_capped_speedup() -> None:
    assert turn_score(False, False, 0.0, CFG) == 0.0
    assert turn_score(True, False, 5.0, CFG) == pytest.approx(0.1)
    assert turn_score(True, True, 0.8, CFG) == pytest.approx(0.4)
    assert turn_score(True, True, 1.5, CFG) == pytest.approx(0.9)
    assert turn_score(True, True, 50.0, CFG) == pytest.approx(2.4)


def test_speedup_without_correctness_earns_nothing() -> None:
    assert turn_score(True, False, 3.0, CFG) == pytest.approx(0.1)


def test_discounted_returns_with_gamma_0_4() -> None:
    assert discounted_returns([0.1, 0.4, 1.9], 0.4) == pytest.approx([0.1 + 0.4 * 0.4 + 0.16 * 1.9, 0.4 + 0.4 * 1.9, 1.9])
    assert discounted_returns([], 0.4) == []


def test_stops_after_a_clearly_faster_correct_turn() -> None:
    assert termination_reason([0.1, 1.3], CFG) == TerminationReason.SUCCESS


def test_stops_when_two_turns_scored_nothing() -> None:
    assert termination_reason([0.0], CFG) is None
    assert termination_reason([0.0, 0.0], CFG) == TerminationReason.ALL_FAILED


def test_stops_at_max_turns() -> None:
    assert termination_reason([0.1, 0.4], CFG) is None
    assert termination_reason([0.1, 0.4, 0.4], CFG) == TerminationReason.MAX_TURNS
    assert termination_reason([0.4], RewardConfig(max_turns=1)) == TerminationReason.MAX_TURNS
