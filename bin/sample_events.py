"""``kernelrl sample-events``: publish the documented sample event stream (see ``actors.sample_events``)."""

from __future__ import annotations

import argparse
import sys

from kernelrl.actors.sample_events import sample_run
from kernelrl.bin.common import add_bus_arguments, bus_settings, setup_logging
from kernelrl.core.actor import run_main
from kernelrl.core.bus import Bus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


async def amain(args: argparse.Namespace) -> int:
    bus = await Bus.connect(bus_settings(args), name="kernelrl-sample-events")
    try:
        await bus.provision()
        events = sample_run(args.run, args.steps, args.groups, args.samples, args.seed)
        acks = await bus.publish_many(events, window=1)  # in order, so the console reads in order
        print(f"sample-events: published {len(acks)} events to run {args.run}", file=sys.stderr)
    finally:
        await bus.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelrl sample-events", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return run_main(amain(args))


if __name__ == "__main__":
    sys.exit(main())
