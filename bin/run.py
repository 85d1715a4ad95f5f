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

import msgspec
import nats.errors
import orjson

from kernelrl.actors.rollouts import rollout_requests
from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.config import ROLES, Config
from kernelrl.core.config_file import config_toml
from kernelrl.core.consumers import consumer_table
from kernelrl.core.nats_server import NATS_PORT, EmbeddedNatsServer, port_is_free
from kernelrl.core.run_dirs import CONFIG_FILE, URL_FILE, RunDirectory, new_run_id
from kernelrl.core.supervisor import ChildSpec, RestartBudget, Supervisor

log = logging.getLogger("kernelrl.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, resolve=False)  # no --nats: start a broker; no --run: a new run
    add_setting_flag(parser, "--nats-listen", key="run.nats_listen",
                     help="interface the embedded broker listens on (0.0.0.0 lets other hosts join)")  # fmt: skip
    add_setting_flag(parser, "--runs-root", key="run.runs_root", help="where run directories go (default runs)")
    add_setting_flag(parser, "--roles", key="run.roles", type=split_roles,
                     help=f"the roles this process runs, comma-separated (default: all of {','.join(ROLES)}); with --nats "
                     "and --run, join a run whose broker is on another host")  # fmt: skip
    add_setting_flag(parser, "--run-dir", key="run.run_dir", help="this run's directory (default <runs-root>/<run id>)")
    add_setting_flag(parser, "--verbose", key="logger.verbose", action="store_true",
                     help="detailed console output (or VERBOSE=true)")  # fmt: skip
    add_setting_flag(parser, "--nats-sync", key="run.nats_sync",
                     help="embedded server's JetStream sync_interval: 'always' (no acknowledged event lost if it is killed) "
                     "or a duration such as 1s or 2m (faster, loses up to that much on a crash)")  # fmt: skip
    add_setting_flag(parser, "--sample-steps", key="sample.steps", type=int,
                     help="steps of the sample event stream to publish (0: none, wait for Ctrl-C)")  # fmt: skip
    add_setting_flag(parser, "--sample-evals", key="sample.evals", type=int,
                     help="built-in reference solutions the sample sends to the evaluators")  # fmt: skip


def split_roles(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def evaluator_gpus(setting: str) -> list[str]:
    """``evaluator.gpus``: "auto" (every visible GPU), "cpu" (none), or a comma-separated list."""
    if setting == "auto":
        return visible_gpus()
    if setting in ("cpu", ""):
        return []
    return [g.strip() for g in setting.split(",") if g.strip()]


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


class SettledRequests:
    """Which of ``ids`` have a trajectory (or were parked) in the run's logs; each poll reads only new lines."""

    FILES = (("trajectories.jsonl", "request_id"), ("parked.jsonl", "message_id"))

    def __init__(self, log_dir: Path, ids: set[str]) -> None:
        self.log_dir = log_dir
        self.ids = ids
        self.done: set[str] = set()
        self._offsets = {name: 0 for name, _ in self.FILES}

    def poll(self) -> set[str]:
        for name, field in self.FILES:
            with contextlib.suppress(FileNotFoundError), (self.log_dir / name).open("rb") as f:
                f.seek(self._offsets[name])
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a record still being written: read it next time
                    self._offsets[name] += len(line)
                    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                        value = orjson.loads(line).get(field)
                        if value in self.ids:
                            self.done.add(value)
        return self.done


async def amain(args: argparse.Namespace) -> int:
    config: Config = args.config
    roles = config.run.roles
    url, run_id = config.bus.url, config.bus.run  # flags, --set, the file, then $KRL_NATS / $KRL_RUN
    if url and not run_id:
        print("kernelrl run: --run ID is needed to join a run on another broker (--nats)", file=sys.stderr)
        return 2
    runs_root = Path(config.run.runs_root)
    run_id = run_id or new_run_id(runs_root)
    run = RunDirectory(root=str(runs_root), run_id=run_id)
    run_dir = Path(config.run.run_dir) if config.run.run_dir else run.path
    log_dir = Path(config.logger.log_dir) if config.logger.log_dir else run_dir / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.run.run_dir:
        run.create()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    gave_up: dict[str, str] = {}
    budget = RestartBudget(config.run.restart_budget, config.run.restart_window_s)
    async with contextlib.AsyncExitStack() as stack:
        server: EmbeddedNatsServer | None = None
        if not url:
            port = NATS_PORT if port_is_free(NATS_PORT) else None
            server = EmbeddedNatsServer(run_dir / "nats", port=port, sync_interval=config.run.nats_sync,
                                        host=config.run.nats_listen)  # fmt: skip
            await stack.enter_async_context(server)
            url = server.url
            log.info("embedded NATS server at %s (store %s)", server.url, server.store_dir)
        (run_dir / URL_FILE).write_text(url + "\n")
        # The effective configuration, complete, is the run's record and what every child reads.
        config = msgspec.structs.replace(
            config,
            bus=msgspec.structs.replace(config.bus, url=url, run=run_id),
            logger=msgspec.structs.replace(config.logger, log_dir=str(log_dir.resolve())),
        )
        bus = await Bus.connect(config.bus, name="kernelrl-run")
        stack.push_async_callback(bus.close)
        await bus.provision(consumer_table(config))
        config_path = run_dir / CONFIG_FILE  # once the run is provisioned as it says
        config_path.write_text(config_toml(config))
        common = ["--config", str(config_path), "--log-level", args.log_level]

        def child(name: str, command: str, *extra: str, restart: bool = True) -> ChildSpec:
            return ChildSpec(name=name, argv=child_argv(command, *common, *extra), restart=restart,
                             max_restarts=budget.max_restarts, window_s=budget.window_s)  # fmt: skip

        specs = []
        if "logger" in roles:
            specs.append(child("logger", "logger"))
        if "evaluator" in roles:
            gpus = evaluator_gpus(config.evaluator.gpus)
            for gpu in gpus:
                specs.append(child(f"evaluator-gpu{gpu}", "evaluator", "--gpu", gpu))
            if not gpus:
                specs.append(child("evaluator-cpu", "evaluator"))
            log.info("evaluators: %s", ", ".join(f"GPU {g}" for g in gpus) or "one on the CPU (Triton interpreter)")
        if "generator" in roles:
            specs.append(child("generator", "generator"))
            log.info(
                "generator: backend %s, model %s", config.generator.backend, config.generator.model or "SmolLM2-135M (bundled)"
            )
        sample_steps = config.sample.steps
        if "sample" not in roles or "logger" not in roles:  # the sample stream ends once the logger has it all
            sample_steps = 0
        if sample_steps > 0:
            specs.append(child("sample-events", "sample-events", restart=False))
        supervisor = Supervisor(specs)
        log.info("run %s: directory %s, logs in %s, NATS at %s; Ctrl-C stops", run_id, run_dir, log_dir, url)

        async def finish_when_sample_logged() -> None:
            if sample_steps <= 0:
                return
            await supervisor.finished["sample-events"].wait()
            while not stopping.is_set():
                if supervisor.exit_codes.get("sample-events") != 0 or await logger_caught_up(bus):
                    stopping.set()
                    return
                await asyncio.sleep(0.2)

        async def rollouts_then_finish() -> None:
            if "rollouts" not in roles:
                return
            requests = rollout_requests(run_id, config.rollout, config.reward)
            await bus.publish_many((bus.subjects.rollout_request, r) for r in requests)
            log.info("published %d rollout requests (%s × %d samples)", len(requests), ", ".join(config.rollout.problems),
                     config.rollout.n_samples)  # fmt: skip
            if "logger" not in roles:
                return  # the logger runs elsewhere: this run cannot see the trajectories land, so it runs until Ctrl-C
            ids = {r.request_id for r in requests}
            settled = SettledRequests(log_dir, ids)
            while not stopping.is_set():
                if len(settled.poll()) == len(ids) and await logger_caught_up(bus):
                    log.info("all %d dialogues are in %s", len(ids), log_dir / "trajectories.jsonl")
                    stopping.set()
                    return
                await asyncio.sleep(1.0)

        async with asyncio.TaskGroup() as tg:
            supervised = tg.create_task(supervisor.run(stopping))
            tg.create_task(finish_when_sample_logged())
            tg.create_task(rollouts_then_finish())
            if server is not None:
                tg.create_task(server.supervise(stopping, budget, gave_up))
        codes = supervised.result()
    gave_up.update(supervisor.gave_up)
    if gave_up:
        log.error("run %s stopped because: %s", run_id, "; ".join(f"{name} {why}" for name, why in gave_up.items()))
        return 1
    failed = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
    if failed:
        log.error("children exited with errors: %s", failed)
        return 1
    log.info("run %s stopped cleanly; logs in %s", run_id, log_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl run", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
