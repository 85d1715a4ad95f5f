"""``kernelrl evaluator``: the evaluator role (see ``kernelrl.actors.evaluator``).

Settings come from the run's configuration (``[evaluator]``: limits, work consumer, problem set).
``--gpu N`` pins the process to GPU N (``CUDA_VISIBLE_DEVICES``) before anything loads torch; without
it the evaluator checks on the CPU with Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core.actor import run_actor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu", default=None, help="GPU index (or UUID) to pin (default: CPU interpreter)")
    add_setting_flag(parser, "--problems", key="evaluator.problems", help="problem set for requests without source")
    add_setting_flag(parser, "--memory-limit-gb", key="evaluator.limits.address_space_gb", type=float,
                     help="worker address space (CPU only)")  # fmt: skip
    add_setting_flag(parser, "--time-limit", key=("evaluator.limits.correctness_time_s", "evaluator.limits.benchmark_time_s"),
                     type=float, help="seconds the correctness and the benchmark phase may each take")  # fmt: skip


async def amain(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu  # before the worker (and torch) starts

    from kernelrl.actors.evaluator import EvaluatorActor
    from kernelrl.core.problems import problem_set

    settings = args.config.evaluator
    problems = problem_set(settings.problems)
    device = "cpu" if args.gpu is None else "cuda"
    return await run_actor(lambda bus: EvaluatorActor(bus, settings, device, problems), args.config)


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl evaluator", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
