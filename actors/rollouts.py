"""Rollout requests for the configured problems: what ``kernelrl run`` publishes itself until the buffer lands.

One GRPO group per problem: ``n_samples`` requests sharing a group id. Request ids are fresh per call, so a
continued run (``--run ID``) asks again rather than being deduplicated against the first time.
"""

from __future__ import annotations

import time

from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig, RolloutSettings


def rollout_requests(run_id: str, settings: RolloutSettings, reward: RewardConfig, step: int = 0) -> list[m.RolloutRequest]:
    task_type = "kernelbench" if reward.max_turns == 1 else "kernelbench_multiturn"
    requests = []
    for problem_id in settings.problems:
        group_id = f"g-{m.new_id()[:12]}"
        for i in range(settings.n_samples):
            requests.append(
                m.RolloutRequest(
                    request_id=f"{group_id}-s{i}",
                    run_id=run_id,
                    problem_id=problem_id,
                    group_id=group_id,
                    sample_idx=i,
                    n_samples=settings.n_samples,
                    max_turns=reward.max_turns,
                    gamma=reward.gamma,
                    task_type=task_type,
                    step=step,
                    created_at=time.time(),
                )
            )
    return requests
