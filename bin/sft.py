"""``kernelrl sft``: the run's starting policy: the base model (``[policy] base``), warm-started by supervised
fine-tuning on (problem, solution) pairs when ``policy.warm_start`` (see ``kernelrl.actors.warm_start``).

Pairs: ``--pairs FILE`` (JSONL of ``{"problem": <PyTorch source>, "solution": <Triton source>}`` or
``{"problem_id": ..., "solution": ...}``), else the reference solutions of the buffer's training problems. The
result is cached by content in ``generator.model_cache_dir``; ``--out DIR`` puts a copy there. Progress goes to
the log (stderr); the last line on stdout is the policy's directory (``kernelrl run`` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, resolve=False)
    add_setting_flag(parser, "--pairs", key="policy.pairs", metavar="FILE",
                     help="JSONL (problem, solution) pairs (default: the training problems' reference solutions)")  # fmt: skip
    add_setting_flag(parser, "--base", key="policy.base", metavar="NAME|DIR",
                     help="auto, smollm2-135m, smollm2-mini or a local model directory")  # fmt: skip
    add_setting_flag(parser, "--epochs", key="policy.epochs", type=int, help="passes over the pairs")
    add_setting_flag(parser, "--problems", key="rollout.problem_dir", help="problem set directory (default: built-in)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="also write the policy here (default: the cache)")


async def amain(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories; never reach for a hub
    from transformers.utils import logging as transformers_logging

    from kernelrl.actors.gen_backend import BackendError
    from kernelrl.actors.policy_init import PolicyInitError
    from kernelrl.actors.warm_start import PairsError, resolve_policy

    transformers_logging.disable_progress_bar()
    try:
        path = await asyncio.to_thread(resolve_policy, args.config, args.out)
    except (PairsError, PolicyInitError, BackendError, ValueError, FileNotFoundError) as exc:
        print(f"kernelrl sft: {exc}", file=sys.stderr)
        return 2
    print(path, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl sft", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
