"""The learner's objective, as functions of tensors: what it trains on and the PPO-clip loss.

A turn trains as one sequence: the prompt token ids the generator's model saw, then the response token ids it
sampled. The loss mask covers exactly the response tokens (never the prompt, never re-tokenised text); each
response token carries the behaviour log-prob recorded at sampling time and its turn's advantage.

``ppo_clip_loss``, per token ``−w · min(r·A, clip(r, 1−ε, 1+ε)·A)``:

- without ``truncate_is``: PPO on the behaviour policy, ``r = exp(logp_new − logp_behaviour)``, ``w = 1``;
- with ``truncate_is = C`` (truncated importance sampling, decoupled): the learner takes one optimiser step per batch,
  so the policy before the step, ``π_old``, is ``π_θ`` itself (``logp_old = logp_new`` detached); the PPO ratio is
  ``r = exp(logp_new − logp_old)`` (1 in value, ``∇ log π`` in gradient) and the behaviour-to-learner mismatch (a
  stale sample, an engine that samples in another precision) is corrected by ``w = min(π_old / π_behaviour, C)``,
  detached — never both at once;
- optionally (``ratio_band``), tokens whose ``π_new / π_behaviour`` leaves ``[1/band, band]`` are masked out.

The statistics report ``π_new / π_behaviour`` (mean, max); ``clip_fraction`` is the share of tokens the objective
clipped: outside ``[1−ε, 1+ε]`` without ``truncate_is``, truncated at ``C`` with it. Aggregation:
``token`` (mean over every response token of the batch, the default) or ``sequence`` (mean per sequence, then
over sequences). ``denominator`` replaces the count the aggregate divides by (response tokens for ``token``,
sequences for ``sequence``), so that micro-batches (and data-parallel ranks) of one batch, each divided by the
batch's total count, sum to the loss of the whole batch.
"""

from __future__ import annotations

import msgspec
import torch


class TurnSample(msgspec.Struct, frozen=True, kw_only=True):
    input_ids: list[int]  # prompt + response
    loss_mask: list[int]  # 1 on response tokens
    behaviour_logprobs: list[float]  # per position; 0 where the mask is 0
    advantage: float


def turn_sample(prompt_ids: list[int], response_ids: list[int], response_logprobs: list[float], advantage: float) -> TurnSample:
    if len(response_ids) != len(response_logprobs):
        raise ValueError(f"{len(response_ids)} response tokens but {len(response_logprobs)} behaviour log-probs")
    pad = [0] * len(prompt_ids)
    return TurnSample(input_ids=[*prompt_ids, *response_ids], loss_mask=[*pad, *[1] * len(response_ids)],
                      behaviour_logprobs=[*[0.0] * len(prompt_ids), *response_logprobs], advantage=advantage)  # fmt: skip


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` log-prob of each token given the ones before it (position 0: 0, nothing predicts it)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))


class LossStats(msgspec.Struct, frozen=True, kw_only=True):
    clip_fraction: float
    ratio_mean: float
    ratio_max: float
    masked_by_band: float
    tokens: int


def ppo_clip_loss(
    new_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    truncate_is: float | None = None,
    ratio_band: float | None = None,
    aggregation: str = "token",
    denominator: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """All tensors ``[batch, seq]`` except ``advantages`` ``[batch]``; returns the loss and its statistics."""
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"loss aggregation {aggregation!r}: choose token or sequence")
    mask = mask.float()
    ratio = torch.exp((new_logprobs - behaviour_logprobs) * mask)  # π_new / π_behaviour
    adv = advantages[:, None]
    if truncate_is is None:
        policy_ratio, weight = ratio, torch.ones_like(ratio)
        clipped = ((ratio.detach() - 1).abs() > clip_eps).float()
    else:
        policy_ratio = torch.exp((new_logprobs - new_logprobs.detach()) * mask)  # π_θ / π_old: 1, with its gradient
        behaviour_weight = ratio.detach()
        weight = torch.clamp(behaviour_weight, max=truncate_is)
        clipped = (behaviour_weight > truncate_is).float()
    clipped_ratio = torch.clamp(policy_ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -weight * torch.minimum(policy_ratio * adv, clipped_ratio * adv)
    banded = torch.zeros_like(mask)
    if ratio_band is not None:
        outside = ((ratio < 1 / ratio_band) | (ratio > ratio_band)).float() * mask
        banded = outside
        mask = mask * (1 - outside)
    per_token = per_token * mask
    if aggregation == "token":
        loss = per_token.sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)
    else:
        per_sequence = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_sequence.mean() if denominator is None else per_sequence.sum() / denominator
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = LossStats(
            clip_fraction=float((clipped * mask).sum() / n),
            ratio_mean=float((ratio * mask).sum() / n),
            ratio_max=float((ratio * mask).max()) if mask.any() else 1.0,
            masked_by_band=float(banded.sum()),
            tokens=int(mask.sum()),
        )
    return loss, stats
