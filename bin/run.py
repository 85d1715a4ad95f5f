"""``kernelrl run``: the whole system on this machine.

Starts the embedded NATS server unless ``--nats`` is given, provisions the run, starts the roles that
exist as child processes (the logger; one evaluator per visible GPU, or one CPU evaluator) and
supervises them; Ctrl-C stops everything cleanly. Until the generator,
buffer and learner roles land, the documented sample event stream (``kernelrl sample-events``) stands
in for them, and the run ends once the logger has written every sample event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import nats.errors

from kernelrl.bin.common import add_bus_arguments, bus_settings, command_main
from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.supervisor import ChildSpec, Supervisor

log = logging.getLogger("kernelrl.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser)
    parser.set_defaults(nats=None)
    parser.add_argument("--run-dir", help="where the NATS store and logs go (default runs/<run>)")
    parser.add_argument("--verbose", action="store_true", help="detailed console output (or VERBOSE=true)")
    parser.add_argument(
        "--nats-sync",
        default="always",
        help="embedded server's JetStream sync_interval: 'always' (no acknowledged event lost if it is killed) "
        "or a duration such as 1s or 2m (faster, loses up to that much on a crash)",
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=2,
        help="steps of the sample event stream to publish (0: none, wait for Ctrl-C)",
    )
    parser.add_argument(
        "--sample-evals", type=int, default=4, help="built-in reference solutions the sample sends to the evaluators"
    )


def visible_gpus() -> list[str]:
    """The GPUs this machine lets us use, as values for ``CUDA_VISIBLE_DEVICES``."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    pinned = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return pinned[:count] if pinned else [str(i) for i in range(count)]


def child_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kernelrl.bin.cli", command, *args]


async def logger_caught_up(bus: Bus) -> bool:
    try:
        info = await bus.js.consumer_info(bus.subjects.event_stream, s.LOGGER_CONSUMER)
    except (nats.errors.Error, TimeoutError):
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


async def amain(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir or f"runs/{args.run}")
    log_dir = run_dir / "logs"
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with contextlib.AsyncExitStack() as stack:
        if args.nats is None:
            server = await stack.enter_async_context(EmbeddedNatsServer(run_dir / "nats", sync_interval=args.nats_sync))
            args.nats = server.url
            log.info("embedded NATS server at %s (store %s)", server.url, server.store_dir)
        bus = await Bus.connect(bus_settings(args), name="kernelrl-run")
        stack.push_async_callback(bus.close)
        await bus.provision()
        common = ["--nats", args.nats, "--run", args.run, "--log-level", args.log_level]
        logger_args = ["--log-dir", str(log_dir), *(["--verbose"] if args.verbose else [])]
        specs = [ChildSpec(name="logger", argv=child_argv("logger", *common, *logger_args))]
        gpus = visible_gpus()
        for gpu in gpus:
            specs.append(ChildSpec(name=f"evaluator-gpu{gpu}", argv=child_argv("evaluator", *common, "--gpu", gpu)))
        if not gpus:
            specs.append(ChildSpec(name="evaluator-cpu", argv=child_argv("evaluator", *common)))
        log.info("evaluators: %s", ", ".join(f"GPU {g}" for g in gpus) or "one on the CPU (Triton interpreter)")
        if args.sample_steps > 0:
            sample = ["--steps", str(args.sample_steps), "--evals", str(args.sample_evals)]
            specs.append(ChildSpec(name="sample-events", argv=child_argv("sample-events", *common, *sample), restart=False))
        supervisor = Supervisor(specs)
        log.info("run %s: logs in %s; Ctrl-C stops", args.run, log_dir)

        async def finish_when_sample_logged() -> None:
            if args.sample_steps <= 0:
                return
            await supervisor.finished["sample-events"].wait()
            while not stopping.is_set():
                if supervisor.exit_codes.get("sample-events") != 0 or await logger_caught_up(bus):
                    stopping.set()
                    return
                await asyncio.sleep(0.2)

        async with asyncio.TaskGroup() as tg:
            supervised = tg.create_task(supervisor.run(stopping))
            tg.create_task(finish_when_sample_logged())
        codes = supervised.result()
    failed = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
    if failed:
        log.error("children exited with errors: %s", failed)
        return 1
    log.info("run %s stopped cleanly; logs in %s", args.run, log_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl run", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
