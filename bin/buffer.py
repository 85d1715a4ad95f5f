"""``kernelrl buffer``: the buffer role (see ``kernelrl.actors.buffer``).

Settings come from the run's configuration (``[buffer]``: sampler, rounds, groups, batches, policy lag;
``[rollout] problem_dir``: the problem set; ``[reward]``: max_turns and gamma of each rollout request).
"""

from __future__ import annotations

import argparse
import sys

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core.actor import run_actor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_setting_flag(parser, "--problems", key="rollout.problem_dir", help="problem set directory (default: built-in)")
    add_setting_flag(parser, "--num-rollout", key="buffer.num_rollout", type=int, help="rollout rounds (0: until stopped)")
    add_setting_flag(parser, "--rollout-batch-size", key="buffer.rollout_batch_size", type=int, help="prompts per round")
    add_setting_flag(parser, "--n-samples", key="buffer.n_samples_per_prompt", type=int, help="rollouts per prompt (group)")
    add_setting_flag(parser, "--global-batch-size", key="buffer.global_batch_size", type=int,
                     help="samples per train batch, at least (0: rollout_batch_size x n_samples)")  # fmt: skip
    add_setting_flag(parser, "--max-off-policy-steps", key="buffer.max_off_policy_steps", type=int,
                     help="policy versions a rollout may lag the policy being trained (0: synchronous)")  # fmt: skip


async def amain(args: argparse.Namespace) -> int:

    from kernelrl.actors.buffer import BufferActor
    from kernelrl.actors.buffer_state import Sampler
    from kernelrl.core.problems import problem_set

    config = args.config
    problem_dir = config.rollout.problem_dir
    try:
        problems = problem_set(problem_dir)
        Sampler([p.id for p in problems.problems], config.buffer)  # buffer.problems must name something, before NATS
    except (FileNotFoundError, ValueError) as exc:
        print(f"kernelrl buffer: {exc}", file=sys.stderr)
        return 2
    return await run_actor(lambda bus: BufferActor(bus, config, problems), config)


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl buffer", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
