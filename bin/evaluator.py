"""``kernelrl evaluator``: the evaluator role (see ``kernelrl.actors.evaluator``).

``--gpu N`` pins the process to GPU N (``CUDA_VISIBLE_DEVICES``) before anything loads torch; without
it the evaluator checks on the CPU with Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kernelrl.bin.common import add_bus_arguments, bus_settings, command_main
from kernelrl.core.actor import run_actor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--gpu", default=None, help="GPU index (or UUID) to pin (default: CPU interpreter)")
    parser.add_argument("--problems", type=Path, default=None, help="problem set for requests without source")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per correctness/benchmark phase")
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="worker address space (CPU only)")


async def amain(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu  # before the worker (and torch) starts
    import msgspec

    from kernelrl.actors.eval_sandbox import WorkerLimits
    from kernelrl.actors.evaluator import EvaluatorActor, EvaluatorSettings
    from kernelrl.core.problems import builtin_problems, load_problem_set

    limits = WorkerLimits()
    if args.time_limit is not None:
        limits = msgspec.structs.replace(limits, correctness_time_s=args.time_limit, benchmark_time_s=args.time_limit)
    if args.memory_limit_gb is not None:
        limits = msgspec.structs.replace(limits, address_space_gb=args.memory_limit_gb)
    settings = EvaluatorSettings(device="cpu" if args.gpu is None else "cuda", limits=limits)
    problems = load_problem_set(args.problems) if args.problems else builtin_problems()
    return await run_actor(lambda bus: EvaluatorActor(bus, settings, problems), bus_settings(args))


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl evaluator", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
