"""``kernelrl generator``: the generator role (see ``kernelrl.actors.generator``).

Settings come from the run's configuration (``[generator]``: backend, model, sampling, concurrency, work
consumer; ``[check]``, ``[reward]``). ``--gpu N`` pins the process to GPU N before anything loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core.actor import run_actor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu", default=None, help="GPU index (or UUID) to pin (default: every visible one)")
    add_setting_flag(parser, "--backend", key="generator.backend", help="vllm, openai, hf or replay")
    add_setting_flag(parser, "--model", key="generator.model", help="model directory (default: the bundled SmolLM2-135M)")
    add_setting_flag(parser, "--replay-log", key="generator.replay_log", help="turns.jsonl to replay (--backend replay)")
    add_setting_flag(parser, "--openai-url", key="generator.openai_url", help="OpenAI-compatible server (--backend openai)")
    add_setting_flag(parser, "--concurrency", key="generator.concurrency", type=int, help="dialogues at once")
    add_setting_flag(parser, "--problems", key="rollout.problem_dir", help="problem set directory (default: built-in)")


async def amain(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu  # before the backend (and torch) starts

    from kernelrl.actors.gen_backend import BackendError, make_backend
    from kernelrl.actors.generator import GeneratorActor
    from kernelrl.core.problems import problem_set

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories; never reach for a hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a long-running role's log, not a terminal
    config = args.config
    problem_dir = config.rollout.problem_dir
    problems = problem_set(problem_dir)
    try:
        return await run_actor(lambda bus: GeneratorActor(bus, config, make_backend(config.generator), problems), config)
    except BackendError as exc:
        print(f"kernelrl generator: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl generator", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
