"""Advantages, the zero-spread filter and staleness, against hand-computed groups."""

from __future__ import annotations

import math

import pytest

from kernelrl.core.advantages import group_turn_advantages, has_spread, is_stale

# Three members of one group; the second ended after one turn (an early success), the third after two.
RETURNS = [[0.5, 1.0, 1.5], [2.0], [0.0, 0.5]]


def test_grpo_per_turn_index_by_hand() -> None:
    adv = group_turn_advantages(RETURNS, "grpo")
    # turn 0: [0.5, 2.0, 0.0], mean 0.8333, population std 0.8498
    mean0, std0 = 2.5 / 3, math.sqrt(((0.5 - 2.5 / 3) ** 2 + (2.0 - 2.5 / 3) ** 2 + (2.5 / 3) ** 2) / 3)
    assert [row[0] for row in adv] == pytest.approx([(r - mean0) / (std0 + 1e-6) for r in (0.5, 2.0, 0.0)])
    # turn 1: members 0 and 2 reached it: [1.0, 0.5] -> mean 0.75, std 0.25 -> +1, -1
    assert (adv[0][1], adv[2][1]) == pytest.approx((1.0, -1.0), abs=1e-5)
    # turn 2: member 0 alone: no one to compare with
    assert adv[0][2] == 0.0
    assert [len(row) for row in adv] == [3, 1, 2]  # the shape of the returns: early exits keep their length


def test_dr_grpo_does_not_divide_by_the_spread() -> None:
    adv = group_turn_advantages(RETURNS, "dr_grpo")
    assert [row[0] for row in adv] == pytest.approx([0.5 - 2.5 / 3, 2.0 - 2.5 / 3, -2.5 / 3])
    assert (adv[0][1], adv[2][1]) == pytest.approx((0.25, -0.25))


def test_rloo_leaves_the_member_out_of_its_own_baseline() -> None:
    adv = group_turn_advantages(RETURNS, "rloo")
    assert [row[0] for row in adv] == pytest.approx([0.5 - 1.0, 2.0 - 0.25, 0.0 - 1.25])
    assert (adv[0][1], adv[2][1]) == pytest.approx((0.5, -0.5))
    assert adv[0][2] == 0.0  # no other member reached turn 3


def test_pooled_statistics_over_every_turn_of_the_group() -> None:
    pooled = [0.5, 1.0, 1.5, 2.0, 0.0, 0.5]
    mean = sum(pooled) / 6
    std = math.sqrt(sum((r - mean) ** 2 for r in pooled) / 6)
    adv = group_turn_advantages(RETURNS, "grpo", per_turn=False)
    assert adv[0] == pytest.approx([(r - mean) / (std + 1e-6) for r in (0.5, 1.0, 1.5)])
    rloo = group_turn_advantages(RETURNS, "rloo", per_turn=False)
    assert rloo[1][0] == pytest.approx(2.0 - (0.5 + 1.0 + 1.5 + 0.0 + 0.5) / 5)


def test_identical_returns_give_zero_advantages_and_the_group_is_filtered() -> None:
    same = [[0.4, 0.4], [0.4, 0.4], [0.4, 0.4]]
    for estimator in ("grpo", "dr_grpo", "rloo"):
        for row in group_turn_advantages(same, estimator):
            assert row == pytest.approx([0.0, 0.0], abs=1e-9)
    assert not has_spread([0.4, 0.4, 0.4], min_group_std=0.0)
    assert not has_spread([0.4, 0.41], min_group_std=0.05)
    assert has_spread([0.5, 2.0, 0.0], min_group_std=0.05)
    assert not has_spread([1.0], min_group_std=0.0)  # one member: nothing to compare


def test_an_unknown_estimator_is_named() -> None:
    with pytest.raises(ValueError, match="'ppo'"):
        group_turn_advantages(RETURNS, "ppo")


def test_staleness_drops_what_is_more_than_max_off_policy_steps_behind() -> None:
    assert not is_stale(policy_version=4, current_version=5, max_off_policy_steps=1)
    assert is_stale(policy_version=3, current_version=5, max_off_policy_steps=1)
    assert is_stale(policy_version=4, current_version=5, max_off_policy_steps=0)  # synchronous: on-policy only
    assert not is_stale(policy_version=5, current_version=5, max_off_policy_steps=0)
