"""``kernelrl learner``: the learner role (see ``kernelrl.actors.learner``).

Settings come from the run's configuration (``[learner]``: model, LoRA, objective, optimiser, micro-batching,
where weights and checkpoints go, work consumer). With ``learner.model`` empty it trains the run's starting policy
(``[policy]``: the base model and its cached warm start). Under ``torchrun`` it trains data-parallel: rank 0 talks
to NATS and publishes; the other ranks only train their share of each batch.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core.actor import run_actor
from kernelrl.core.bus import Bus
from kernelrl.core.config import Config

log = logging.getLogger("kernelrl.learner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu", default=None, help="GPU index (or UUID) to pin (default: every visible one)")
    add_setting_flag(parser, "--model", key="learner.model", help="model directory to train (default: the run's policy)")
    add_setting_flag(parser, "--lora-rank", key="learner.lora_rank", type=int, help="train a LoRA adapter of this rank")
    add_setting_flag(parser, "--lr", key="learner.learning_rate", type=float, help="AdamW learning rate")


async def amain(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu  # before torch starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories; never reach for a hub
    import asyncio

    from transformers.utils import logging as transformers_logging

    from kernelrl.actors.learn_dist import DistributedTrainer, follow, init_distributed
    from kernelrl.actors.learn_trainer import PolicyTrainer
    from kernelrl.actors.learner import LearnerActor
    from kernelrl.actors.warm_start import resolve_policy
    from kernelrl.core.run_dirs import run_dir_of

    transformers_logging.disable_progress_bar()  # a long-running role's log, not a terminal
    config = args.config
    settings = config.learner
    info = init_distributed()  # None unless launched by torchrun
    model_dir: Path | None = None
    if info is None or info.rank == 0:  # one warm start (and one cache entry), then every rank loads it
        model_dir = Path(settings.model) if settings.model else await asyncio.to_thread(resolve_policy, config)
    if info is not None:
        model_dir = Path(info.broadcast(str(model_dir) if model_dir else None))
    sampling = config.generator.sampling
    if sampling.top_p < 1.0 or sampling.top_k > 0:
        log.warning("generator.sampling top_p/top_k cut the distribution the behaviour log-probs come from; the learner "
                    "scores the whole one, so importance ratios are not 1 even on-policy")  # fmt: skip
    make_trainer = functools.partial(PolicyTrainer, settings, model_dir, dist=info, sampling_temperature=sampling.temperature)
    trainer = DistributedTrainer(await asyncio.to_thread(make_trainer))
    if not trainer.is_lead:
        await asyncio.to_thread(follow, trainer)  # ranks > 0 never touch NATS
        return 0
    run_dir = run_dir_of(config)
    weights_dir = Path(settings.weights_dir) if settings.weights_dir else run_dir / "policy"
    checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else run_dir / "learner"
    device = str(trainer.trainer.device)
    heldout = heldout_problems(config)

    def make(bus: Bus) -> LearnerActor:
        return LearnerActor(bus, config, trainer, weights_dir, checkpoint_dir, device=device, heldout=heldout)

    try:
        return await run_actor(make, config)
    finally:
        trainer.close()


def heldout_problems(config: Config) -> list[str]:
    """The buffer's held-out problems (what ``learner.eval_steps`` evaluates), from the run's problem set."""
    from kernelrl.actors.buffer_state import Sampler
    from kernelrl.core.problems import problem_set

    problems = problem_set(config.rollout.problem_dir)
    return list(Sampler([p.id for p in problems.problems], config.buffer).heldout)


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl learner", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
