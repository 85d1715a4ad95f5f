"""``kernelrl sample-events``: publish the documented sample event stream (see ``actors.sample_events``).

With ``--evals N`` it also sends N built-in reference solutions (and one candidate that cheats with
torch) to the evaluators and prints their verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from nats.aio.msg import Msg

from kernelrl.actors.sample_events import sample_run
from kernelrl.bin.check import format_result
from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import CheckSettings, Config
from kernelrl.core.consumers import consumer_table
from kernelrl.core.problems import builtin_problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_setting_flag(parser, "--steps", key="sample.steps", type=int, help="steps of sample events")
    add_setting_flag(parser, "--groups", key="sample.groups", type=int, help="groups per step")
    add_setting_flag(parser, "--samples", key="sample.samples", type=int, help="trajectories per group")
    add_setting_flag(parser, "--seed", key="sample.seed", type=int, help="random seed of the sample stream")
    add_setting_flag(parser, "--evals", key="sample.evals", type=int,
                     help="also send this many built-in problems' reference solutions to the evaluators")  # fmt: skip
    add_setting_flag(parser, "--eval-timeout", key="sample.eval_timeout_s", type=float, help="seconds to wait for verdicts")


async def amain(args: argparse.Namespace) -> int:
    config: Config = args.config
    bus = await Bus.connect(config.bus, name="kernelrl-sample-events")
    try:
        await bus.provision(consumer_table(config))
        events = sample_run(config.bus.run, config.sample, config.reward)
        acks = await bus.publish_many(events, window=1)  # in order, so the console reads in order
        print(f"sample-events: published {len(acks)} events to run {config.bus.run}", file=sys.stderr)
        if config.sample.evals > 0:
            await sample_evaluations(bus, config.sample.evals, config.sample.eval_timeout_s, config.check)
    finally:
        await bus.close()
    return 0


async def sample_evaluations(bus: Bus, n: int, timeout_s: float, check: CheckSettings) -> None:
    """Real work for the evaluators: reference solutions, plus one candidate that cheats with torch."""
    problems = builtin_problems().problems[:n]
    reply_to = bus.subjects.eval_result("sample-events")
    results: asyncio.Queue[m.EvalResult] = asyncio.Queue()

    async def on_result(msg: Msg) -> None:
        await results.put(m.codec_for(m.EvalResult).decode(msg.data))

    sub = await bus.nc.subscribe(reply_to, cb=on_result)
    cheat = (problems[0].solution or "").replace("return out", "return torch.relu(x)")
    sources = [(p, p.solution or "") for p in problems] + [(problems[0], cheat)]
    await bus.publish_many(
        (bus.subjects.eval_request, m.EvalRequest(eval_id=m.new_id(), run_id=bus.settings.run, problem_id=p.id,
                                                  candidate_source=src, reply_to=reply_to, settings=check))
        for p, src in sources
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            for _ in sources:
                print(format_result(await results.get()), flush=True)
    finally:
        await sub.unsubscribe()


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl sample-events", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
