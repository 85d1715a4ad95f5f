"""The learner's objective against hand-computed values: the loss mask, on-policy ratios, clipping, aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from kernelrl.actors.learn_objective import ppo_clip_loss, token_logprobs, turn_sample


def test_the_loss_mask_covers_exactly_the_response_tokens_of_every_turn() -> None:
    turns = [([1, 2, 3], [7, 8], [-0.5, -0.25]), ([1, 2, 3, 7, 8, 4, 5], [9], [-1.0])]  # turn 2's prompt holds turn 1
    samples = [turn_sample(p, r, lp, advantage=a) for (p, r, lp), a in zip(turns, (0.5, -0.5), strict=True)]
    assert samples[0].input_ids == [1, 2, 3, 7, 8] and samples[0].loss_mask == [0, 0, 0, 1, 1]
    assert samples[0].behaviour_logprobs == [0.0, 0.0, 0.0, -0.5, -0.25]
    assert samples[1].loss_mask == [0] * 7 + [1]  # turn 1's answer inside turn 2's prompt is not trained again
    with pytest.raises(ValueError, match="2 response tokens but 1 behaviour log-probs"):
        turn_sample([1], [2, 3], [-0.1], 0.0)


def test_token_logprobs_are_those_of_each_token_given_the_ones_before() -> None:
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[1, 0, 1]])
    got = token_logprobs(logits, ids)[0]
    assert got[0] == 0.0
    assert got[1] == pytest.approx(math.log(1 / (1 + math.e)))  # token 0 under logits [0, 1]: e^0 / (e^0 + e^1)
    assert got[2] == pytest.approx(math.log(1 / (math.e**2 + 1)))  # token 1 under logits [2, 0]: e^0 / (e^2 + e^0)


def test_on_policy_ratios_are_one_and_the_loss_is_minus_the_mean_advantage() -> None:
    behaviour = torch.tensor([[0.0, -0.5, -0.25], [0.0, -1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    advantages = torch.tensor([0.6, -0.3])
    loss, stats = ppo_clip_loss(behaviour.clone(), behaviour, advantages, mask)
    assert stats.ratio_mean == pytest.approx(1.0) and stats.ratio_max == pytest.approx(1.0)
    assert stats.clip_fraction == 0.0 and stats.tokens == 3
    assert loss.item() == pytest.approx(-(0.6 + 0.6 - 0.3) / 3)  # token-level: every response token counts once
    seq_loss, _ = ppo_clip_loss(behaviour.clone(), behaviour, advantages, mask, aggregation="sequence")
    assert seq_loss.item() == pytest.approx(-(0.6 + -0.3) / 2)  # sequence-level: each sequence counts once


def test_clipping_stops_the_gradient_beyond_the_trust_region() -> None:
    behaviour = torch.tensor([[0.0, math.log(0.5)]])
    mask = torch.tensor([[0, 1]])
    new = torch.tensor([[0.0, math.log(0.9)]], requires_grad=True)  # ratio 1.8, beyond 1 + 0.2
    loss, stats = ppo_clip_loss(new, behaviour, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and stats.clip_fraction == 1.0
    assert new.grad is not None and float(new.grad.abs().sum()) == 0.0  # positive advantage, ratio clipped: no push
    new2 = torch.tensor([[0.0, math.log(0.9)]], requires_grad=True)
    loss2, _ = ppo_clip_loss(new2, behaviour, torch.tensor([-1.0]), mask, clip_eps=0.2)
    loss2.backward()
    assert loss2.item() == pytest.approx(1.8)  # negative advantage: the unclipped (pessimistic) term
    assert new2.grad is not None and float(new2.grad[0, 1]) == pytest.approx(1.8)  # d(r·1)/dlogp = r


def test_truncated_importance_weights_and_the_ratio_band() -> None:
    behaviour = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.0, math.log(3.0), math.log(1.1)]])
    mask = torch.tensor([[0, 1, 1]])
    new.requires_grad_(True)
    loss, stats = ppo_clip_loss(new, behaviour, torch.tensor([-1.0]), mask, truncate_is=2.0)
    # the importance weight min(π/π_b, 2) (2 and 1.1) applies once, to the plain policy gradient: -w·A·∇log π
    assert loss.item() == pytest.approx((2.0 + 1.1) / 2)
    loss.backward()
    assert new.grad is not None and new.grad[0].tolist() == pytest.approx([0.0, 2.0 / 2, 1.1 / 2])
    assert stats.clip_fraction == pytest.approx(0.5)  # one of the two tokens had its weight truncated
    assert (stats.ratio_mean, stats.ratio_max) == (pytest.approx((3.0 + 1.1) / 2), pytest.approx(3.0))
    new = new.detach()
    banded, stats = ppo_clip_loss(new, behaviour, torch.tensor([-1.0]), mask, ratio_band=2.0)
    assert stats.masked_by_band == 1.0 and stats.tokens == 1  # the token with ratio 3 leaves [1/2, 2]
    assert banded.item() == pytest.approx(1.1)
