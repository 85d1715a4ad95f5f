"""Group-relative advantages over per-turn returns, the zero-spread filter and the staleness rule: pure functions.

A group is the ``n_samples`` dialogues of one prompt; member ``i`` has per-turn returns ``R[i][0..T_i-1]`` (its
dialogue may have ended early, so lengths differ). Estimators:

- ``grpo`` (default, as the replaced system): ``(R − mean) / (std + eps)``;
- ``dr_grpo``: ``R − mean`` (no division by the spread, "Dr. GRPO");
- ``rloo``: ``R − mean of the other members`` (leave-one-out: a member is not its own baseline, which removes
  GRPO's self-inclusion bias).

The statistics are taken per turn index by default — turn ``t`` of a member is compared with turn ``t`` of the
members that reached it — or over all the group's turns pooled (``per_turn=False``). A group whose members'
aggregated returns ``R_0`` spread less than ``min_group_std`` carries no learning signal and is filtered.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _std(values: Sequence[float]) -> float:
    """Population standard deviation (GRPO's), computed exactly: identical returns spread exactly 0."""
    return statistics.pstdev(values)


def _relative(own: float, peers: Sequence[float], others: Sequence[float], estimator: str, eps: float) -> float:
    """One return against its peers (all members including itself) or the others (excluding it, for rloo)."""
    if estimator == "rloo":
        return own - _mean(others) if others else 0.0
    centred = own - _mean(peers)
    if estimator == "dr_grpo":
        return centred
    return centred / (_std(peers) + eps)


def group_turn_advantages(returns: Sequence[Sequence[float]], estimator: str = "grpo", per_turn: bool = True,
                          eps: float = 1e-6) -> list[list[float]]:  # fmt: skip
    """Per member, per turn: the advantage of that turn's return within the group (same shape as ``returns``)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r}: choose from {', '.join(ESTIMATORS)}")
    out: list[list[float]] = []
    pooled = [r for member in returns for r in member]
    for i, member in enumerate(returns):
        row = []
        for t, own in enumerate(member):
            if per_turn:
                peers = [other[t] for other in returns if t < len(other)]
                others = [other[t] for j, other in enumerate(returns) if j != i and t < len(other)]
            else:
                peers = pooled
                others = [r for j, other in enumerate(returns) if j != i for r in other]
            row.append(_relative(own, peers, others, estimator, eps))
        out.append(row)
    return out


def has_spread(aggregated_returns: Sequence[float], min_group_std: float) -> bool:
    """Whether a group is kept: its members' ``R_0`` spread at least ``min_group_std`` (identical returns: no)."""
    if len(aggregated_returns) < 2:
        return False
    spread = _std(aggregated_returns)
    return spread > 0 and spread >= min_group_std


def is_stale(policy_version: int, current_version: int, max_off_policy_steps: int) -> bool:
    """A trajectory sampled more than ``max_off_policy_steps`` policy versions ago is dropped."""
    return current_version - policy_version > max_off_policy_steps
