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
from kernelrl.bin.common import add_bus_arguments, bus_settings, command_main
from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.problems import builtin_problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evals", type=int, default=0, help="also send this many built-in problems' reference solutions to the evaluators"
    )
    parser.add_argument("--eval-timeout", type=float, default=600.0)


async def amain(args: argparse.Namespace) -> int:
    bus = await Bus.connect(bus_settings(args), name="kernelrl-sample-events")
    try:
        await bus.provision()
        events = sample_run(args.run, args.steps, args.groups, args.samples, args.seed)
        acks = await bus.publish_many(events, window=1)  # in order, so the console reads in order
        print(f"sample-events: published {len(acks)} events to run {args.run}", file=sys.stderr)
        if args.evals > 0:
            await sample_evaluations(bus, args.evals, args.eval_timeout)
    finally:
        await bus.close()
    return 0


async def sample_evaluations(bus: Bus, n: int, timeout_s: float) -> None:
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
                                                  candidate_source=src, reply_to=reply_to))
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
