"""``kernelrl run``: the whole system on this machine.

Each run gets a fresh time-based run id and its own directory ``runs/<id>`` (``runs/latest`` points at
it; ``--run ID`` continues that run). Starts the embedded NATS server unless ``--nats`` is given — on
port 4222 when that is free, else on a free port — writes its URL to ``runs/<id>/nats.url`` and
supervises it like any child (restarted on the same port and store if it dies); provisions the run,
resolves the starting policy (``[policy]``: the base model and its warm start, cached for later runs), starts
the roles as child processes (logger; one evaluator per visible GPU, or one CPU evaluator; generator; buffer;
learner) and supervises them; Ctrl-C stops everything cleanly. A training run ends once the buffer has
published its last batch and the learner has trained it; it then prints where the logs are, the reward by step
and what to run next. Exit status: 0 after a clean stop, 1 if a child or the broker exhausted its restart
budget (the summary names who and how often). ``--roles`` picks other shapes: ``rollouts`` in place of buffer
and learner runs fixed dialogues without training; ``sample`` the documented sample event stream.
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
from kernelrl.core import messages as m
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
    add_setting_flag(parser, "--wandb", key="logger.wandb", action="store_true",
                     help="the logger also logs metrics and trajectories to W&B (pip install 'kernelrl[wandb]')")  # fmt: skip
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


async def training_done(bus: Bus) -> bool:
    """The buffer has published its last batch, the learner has trained it, and the logger has every event."""
    from kernelrl.actors.buffer import read_buffer_state

    try:
        state = await read_buffer_state(bus)
        policy = await bus.latest_policy()
    except (nats.errors.Error, TimeoutError, m.DecodeError) as exc:
        log.debug("training state not read: %r", exc)
        return False
    if state is None or not state.finished:
        return False
    trained = policy.step if policy is not None else 0
    if trained < state.batches_published:
        return False
    # the learner acks a batch after its step summary is stored: then the logger must have it
    info = await bus.js.consumer_info(bus.subjects.batch_stream, s.LEARNER_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0 and await logger_caught_up(bus)


def training_report(run_id: str, log_dir: Path) -> str:
    """What a finished training run prints: where its logs are, the reward by step, what to run next."""
    steps = []
    with contextlib.suppress(FileNotFoundError):
        for line in (log_dir / "steps.jsonl").read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                steps.append(orjson.loads(line))
    steps.sort(key=lambda r: r.get("step", 0))
    lines = [f"Run {run_id}: {len(steps)} training steps", f"  logs: {log_dir} (turns.jsonl, trajectories.jsonl, steps.jsonl)"]
    if steps:
        lines.append("  reward by step (mean aggregated return of the step's groups; kept/total groups; policy version):")
        for r in steps:
            g = r.get("groups", {})
            lines.append(f"    step {r.get('step'):3d}: reward {g.get('reward_mean', 0.0):.3f}  groups {g.get('groups_kept', 0)}/"
                         f"{g.get('total_groups', 0)} kept  → policy v{r.get('policy_version')}")  # fmt: skip
    lines += [
        "  next:",
        f"    kernelrl status --run {run_id}          live actors and their counters (while a run is up)",
        f"    kernelrl analyze runs/{run_id}          what the policy did, turn by turn (--plot FILE.png)",
        f"    kernelrl view runs/{run_id}             every trajectory in one HTML page",
        "    kernelrl run --set buffer.num_rollout=20  a longer run; --config FILE for a whole configuration",
    ]
    return "\n".join(lines)


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


def needs_policy(config: Config) -> bool:
    """Whether this run starts the learner, or a generator that loads a local model without being told which."""
    roles = config.run.roles
    generator_loads = "generator" in roles and config.generator.backend in ("hf", "vllm") and not config.generator.model
    return generator_loads or ("learner" in roles and not config.learner.model)


async def warm_start(config_path: Path, args: argparse.Namespace, stopping: asyncio.Event) -> Path | None:
    """The run's starting policy, from ``kernelrl sft`` in a child process (so Ctrl-C stops it); its last stdout line
    is the policy's directory. None when it failed or was stopped."""
    proc = await asyncio.create_subprocess_exec(*child_argv("sft", "--config", str(config_path), "--log-level", args.log_level),
                                                stdout=asyncio.subprocess.PIPE)  # fmt: skip

    async def terminate_on_stop() -> None:
        await stopping.wait()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(terminate_on_stop())
        out, _ = await proc.communicate()
        watcher.cancel()
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        if not stopping.is_set():
            log.error("the warm start (kernelrl sft) exited with status %s", proc.returncode)
        return None
    return Path(lines[-1])


async def amain(args: argparse.Namespace) -> int:
    config: Config = args.config
    roles = config.run.roles
    if config.logger.wandb and "logger" in roles:
        from kernelrl.actors.wandb_log import WandbMissing, import_wandb

        try:
            import_wandb()
        except WandbMissing as exc:
            print(f"kernelrl run: {exc}", file=sys.stderr)
            return 2
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
        if {"generator", "learner"} <= set(roles) and bool(config.generator.model) != bool(config.learner.model):
            log.warning("only one of generator.model and learner.model is set: the other starts from [policy], so the "
                        "learner may train a model other than the one the generator samples")  # fmt: skip
        if needs_policy(config):
            log.info("starting policy: %s%s (cached for later runs)", config.policy.base,
                     " with its warm start" if config.policy.warm_start else "")  # fmt: skip
            policy = await warm_start(config_path, args, stopping)
            if policy is None:
                return 0 if stopping.is_set() else 1
            config = msgspec.structs.replace(
                config,
                generator=msgspec.structs.replace(config.generator, model=config.generator.model or str(policy)),
                learner=msgspec.structs.replace(config.learner, model=config.learner.model or str(policy)),
            )
            config_path.write_text(config_toml(config))
            log.info("starting policy: %s", policy)
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
        if "buffer" in roles:
            specs.append(child("buffer", "buffer"))
        if "learner" in roles:
            specs.append(child("learner", "learner"))
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

        async def finish_when_trained() -> None:
            if not {"buffer", "learner", "logger"} <= set(roles):
                return  # a role runs elsewhere: this run cannot see the end, so it runs until Ctrl-C
            while not stopping.is_set():
                if await training_done(bus):
                    log.info("the last batch is trained")
                    stopping.set()
                    return
                await asyncio.sleep(1.0)

        async with asyncio.TaskGroup() as tg:
            supervised = tg.create_task(supervisor.run(stopping))
            tg.create_task(finish_when_sample_logged())
            tg.create_task(rollouts_then_finish())
            tg.create_task(finish_when_trained())
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
    if "learner" in roles:
        print(training_report(run_id, log_dir), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl run", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
