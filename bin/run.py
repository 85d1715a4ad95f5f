"""``kernelrl run``: the whole system on this machine.

Each run gets a fresh time-based run id and its own directory ``runs/<id>`` (``runs/latest`` points at
it; ``--run ID`` continues that run). Starts the embedded NATS server unless ``--nats`` is given — on
port 4222 when that is free, else on a free port — writes its URL to ``runs/<id>/nats.url`` and
supervises it like any child (restarted on the same port and store if it dies); provisions the run,
starts the roles that exist as child processes (the logger; one evaluator per visible GPU, or one CPU
evaluator) and supervises them; Ctrl-C stops everything cleanly. Exit status: 0 after a clean stop, 1
if a child or the broker exhausted its restart budget (the summary names who and how often). Until the
generator, buffer and learner roles land, the documented sample event stream (``kernelrl
sample-events``) stands in for them, and the run ends once the logger has written every sample event.
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
from kernelrl.core.nats_server import NATS_PORT, EmbeddedNatsServer, port_is_free
from kernelrl.core.run_dirs import RUNS_ROOT, URL_FILE, RunDirectory, new_run_id
from kernelrl.core.supervisor import ChildSpec, RestartBudget, Supervisor

log = logging.getLogger("kernelrl.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bus_arguments(parser, resolve=False)  # no --nats: start a broker; no --run: a new run
    parser.add_argument(
        "--nats-listen",
        default="127.0.0.1",
        help="interface the embedded broker listens on (default %(default)s; 0.0.0.0 lets other hosts join)",
    )
    parser.add_argument("--runs-root", default=str(RUNS_ROOT), help="where run directories go (default %(default)s)")
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help="the roles this process runs, comma-separated (default: all of %(default)s); with --nats and --run, "
        "join a run whose broker is on another host",
    )
    parser.add_argument("--run-dir", help="this run's directory (default <runs-root>/<run id>)")
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


ROLES = ("logger", "evaluator", "sample")


def parse_roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        named = ", ".join(unknown) or "(none given)"
        raise ValueError(f"--roles {text!r}: unknown role(s) {named}; choose from {', '.join(ROLES)}")
    return roles


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
    try:
        roles = parse_roles(args.roles)
    except ValueError as exc:
        print(f"kernelrl run: {exc}", file=sys.stderr)
        return 2
    args.nats = args.nats or os.environ.get("KRL_NATS") or None
    if args.nats and not (args.run or os.environ.get("KRL_RUN")):
        print("kernelrl run: --run ID is needed to join a run on another broker (--nats)", file=sys.stderr)
        return 2
    runs_root = Path(args.runs_root)
    args.run = args.run or os.environ.get("KRL_RUN") or new_run_id(runs_root)
    run = RunDirectory(root=str(runs_root), run_id=args.run)
    run_dir = Path(args.run_dir) if args.run_dir else run.path
    log_dir = run_dir / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.run_dir:
        run.create()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    gave_up: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        server: EmbeddedNatsServer | None = None
        if args.nats is None:
            port = NATS_PORT if port_is_free(NATS_PORT) else None
            server = EmbeddedNatsServer(run_dir / "nats", port=port, sync_interval=args.nats_sync, host=args.nats_listen)
            await stack.enter_async_context(server)
            args.nats = server.url
            log.info("embedded NATS server at %s (store %s)", server.url, server.store_dir)
        (run_dir / URL_FILE).write_text(args.nats + "\n")
        bus = await Bus.connect(bus_settings(args), name="kernelrl-run")
        stack.push_async_callback(bus.close)
        await bus.provision()
        common = ["--nats", args.nats, "--run", args.run, "--log-level", args.log_level, "--replicas", str(args.replicas)]
        logger_args = ["--log-dir", str(log_dir), *(["--verbose"] if args.verbose else [])]
        specs = []
        if "logger" in roles:
            specs.append(ChildSpec(name="logger", argv=child_argv("logger", *common, *logger_args)))
        if "evaluator" in roles:
            gpus = visible_gpus()
            for gpu in gpus:
                specs.append(ChildSpec(name=f"evaluator-gpu{gpu}", argv=child_argv("evaluator", *common, "--gpu", gpu)))
            if not gpus:
                specs.append(ChildSpec(name="evaluator-cpu", argv=child_argv("evaluator", *common)))
            log.info("evaluators: %s", ", ".join(f"GPU {g}" for g in gpus) or "one on the CPU (Triton interpreter)")
        if "sample" not in roles or "logger" not in roles:  # the sample stream ends once the logger has it all
            args.sample_steps = 0
        if args.sample_steps > 0:
            sample = ["--steps", str(args.sample_steps), "--evals", str(args.sample_evals)]
            specs.append(ChildSpec(name="sample-events", argv=child_argv("sample-events", *common, *sample), restart=False))
        supervisor = Supervisor(specs)
        log.info("run %s: directory %s, logs in %s, NATS at %s; Ctrl-C stops", args.run, run_dir, log_dir, args.nats)

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
            if server is not None:
                tg.create_task(server.supervise(stopping, RestartBudget(5, 600.0), gave_up))
        codes = supervised.result()
    gave_up.update(supervisor.gave_up)
    if gave_up:
        log.error("run %s stopped because: %s", args.run, "; ".join(f"{name} {why}" for name, why in gave_up.items()))
        return 1
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
