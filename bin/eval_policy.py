"""``kernelrl eval``: evaluate a policy without training (see ``kernelrl.actors.eval_policy`` for every number).

K samples per problem (``--samples``) through the real multi-turn loop. The problems: the buffer's held-out split
with ``--heldout`` (``[buffer]`` problems, heldout_fraction, split_seed), else those ``--only`` names (ids or
prefixes such as ``level1/``), else every problem of the set (``--problems DIR``, default the built-in set).

By default the evaluation is a run of its own, like ``kernelrl run --roles logger,evaluator,generator``: an
embedded NATS server and a logger, evaluator(s) and generator as supervised children, in ``<runs-root>/eval-<time>``
(``runs/latest`` is left pointing at the training run); its logger prints the eval block as it writes the summary.
The logs go to ``--output`` (default ``<run dir>/logs``):
``turns.jsonl``, ``trajectories.jsonl``, ``eval_logs/eval_step_XXXX.json`` (written by the logger) and
``eval_logs/eval_step_XXXX.samples.jsonl`` (every trajectory). With ``--nats URL --run ID`` it joins that run's
generators, evaluators and logger instead and starts nothing. ``--wandb`` also logs the eval metrics and a
``full_trajectories`` table to Weights & Biases (``pip install wandb``; WANDB_MODE=offline works without network).

Exit status: 0 when every sample came back, 1 when some did not (the summary covers those that did) or a child
gave up, 2 for a usage error (an empty problem list, wandb not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import msgspec

from kernelrl.actors.console import format_eval_block, summary_value
from kernelrl.actors.eval_policy import EvalReport, evaluate_policy
from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main
from kernelrl.bin.run import child_argv, evaluator_gpus, logger_caught_up, split_roles
from kernelrl.core.bus import Bus
from kernelrl.core.config import Config
from kernelrl.core.config_file import config_toml
from kernelrl.core.consumers import consumer_table
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.run_dirs import CONFIG_FILE, URL_FILE, new_run_id, run_dir_of
from kernelrl.core.supervisor import ChildSpec, RestartBudget, Supervisor

log = logging.getLogger("kernelrl.eval")

PROG = "kernelrl eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, resolve=False)  # no --nats: start a broker; --nats and --run: join that run
    add_setting_flag(parser, "--problems", key="rollout.problem_dir", help="problem set directory (default: built-in)")
    parser.add_argument("--only", type=split_roles, default=[], metavar="IDS",
                        help="comma-separated problem ids or prefixes (level1/) to evaluate (default: all)")  # fmt: skip
    parser.add_argument("--heldout", action="store_true",
                        help="the buffer's held-out split ([buffer] problems, heldout_fraction, split_seed)")  # fmt: skip
    parser.add_argument("--samples", "-k", type=int, default=4, help="samples per problem, K (default 4)")
    add_setting_flag(parser, "--backend", key="generator.backend", help="vllm, openai, hf or replay")
    add_setting_flag(parser, "--model", key="generator.model", help="the policy: a model directory (default: bundled SmolLM2)")
    add_setting_flag(parser, "--replay-log", key="generator.replay_log", help="turns.jsonl to replay (--backend replay)")
    add_setting_flag(parser, "--openai-url", key="generator.openai_url", help="OpenAI-compatible server (--backend openai)")
    add_setting_flag(parser, "--max-turns", key="reward.max_turns", type=int, help="turns per dialogue")
    add_setting_flag(parser, "--runs-root", key="run.runs_root", help="where run directories go (default runs)")
    parser.add_argument("--step", type=int, default=0, help="the step this evaluation is filed under (eval_step_XXXX)")
    parser.add_argument("--output", default="", help="log directory (default <run dir>/logs)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for every sample (default 3600)")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs: pip install wandb)")
    parser.add_argument("--wandb-project", default="kernelrl", help="W&B project (default kernelrl)")


def problem_list(config: Config, only: list[str], heldout: bool) -> list[str]:
    """The problem ids to evaluate; ValueError with a readable reason."""
    from kernelrl.actors.buffer_state import Sampler, select_problems
    from kernelrl.core.problems import problem_set

    problem_dir = config.rollout.problem_dir
    try:
        problems = problem_set(problem_dir)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    ids = [p.id for p in problems.problems]
    if heldout:
        chosen = Sampler(ids, config.buffer).heldout
        if not chosen:
            raise ValueError("--heldout: the buffer holds no problem out (set buffer.heldout_fraction > 0)")
        return chosen
    return select_problems(ids, only)


async def amain(args: argparse.Namespace) -> int:
    config: Config = args.config
    if args.samples < 1:
        print(f"{PROG}: --samples must be at least 1", file=sys.stderr)
        return 2
    try:
        problem_ids = problem_list(config, args.only, args.heldout)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.wandb:
        from kernelrl.actors.wandb_log import WandbMissing, import_wandb

        try:
            import_wandb()
        except WandbMissing as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
    standalone = not config.bus.url
    if standalone:
        report, code = await evaluate_standalone(config, args, problem_ids)
    elif not config.bus.run:
        print(f"{PROG}: --run ID is needed to evaluate on another broker (--nats)", file=sys.stderr)
        return 2
    else:
        report, code = await join_and_evaluate(config, args, problem_ids)
    if report is None:
        return code
    if not (standalone and logger_printed(config, report)):
        print(format_eval_block(report.summary, report.json_file, report.samples_file), flush=True)
    if args.wandb:
        from kernelrl.actors.wandb_log import WandbSink

        wandb_sink = WandbSink(project=args.wandb_project, run_name=config.bus.run or report.summary.run_id,
                               config=msgspec.to_builtins(config), max_turns=config.reward.max_turns,
                               reward=config.reward)  # fmt: skip
        try:
            wandb_sink.log_eval(report.summary, report.trajectories, report.turns)
        finally:
            wandb_sink.finish()
    if summary_value(report.summary, "missing", 0):
        code = code or 1
    return code


def logger_printed(config: Config, report: EvalReport) -> bool:
    """Whether the logger child of a standalone evaluation printed the eval block: it prints each summary it writes,
    to the stdout it shares with this command."""
    return config.logger.console and bool(report.json_file) and Path(report.json_file).exists()


async def join_and_evaluate(config: Config, args: argparse.Namespace, problem_ids: list[str]) -> tuple[EvalReport | None, int]:
    """Use a live run's generators, evaluators and logger; the samples go to ``--output`` or the run's logs."""
    log_dir = Path(args.output) if args.output else run_dir_of(config) / "logs"
    bus = await Bus.connect(config.bus, name="kernelrl-eval")
    try:
        await bus.provision(consumer_table(config))
        report = await evaluate_policy(bus, problem_ids, args.samples, config.reward, step=args.step, timeout_s=args.timeout,
                                       log_dir=log_dir, with_turns=args.wandb)  # fmt: skip
    finally:
        await bus.close()
    return report, 0


async def evaluate_standalone(config: Config, args: argparse.Namespace, problem_ids: list[str]) -> tuple[EvalReport | None, int]:
    """Broker, logger, evaluator(s), generator as children; one evaluation; everything stopped again."""
    runs_root = Path(config.run.runs_root)
    run_id = config.bus.run or f"eval-{new_run_id(runs_root)}"
    run_dir = Path(config.run.run_dir) if config.run.run_dir else runs_root / run_id
    log_dir = (Path(args.output) if args.output else run_dir / "logs").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    budget = RestartBudget(config.run.restart_budget, config.run.restart_window_s)
    gave_up: dict[str, str] = {}
    report: EvalReport | None = None
    async with contextlib.AsyncExitStack() as stack:
        server = EmbeddedNatsServer(run_dir / "nats", sync_interval=config.run.nats_sync)
        await stack.enter_async_context(server)
        (run_dir / URL_FILE).write_text(server.url + "\n")
        config = msgspec.structs.replace(
            config,
            bus=msgspec.structs.replace(config.bus, url=server.url, run=run_id),
            logger=msgspec.structs.replace(config.logger, log_dir=str(log_dir)),
        )
        bus = await Bus.connect(config.bus, name="kernelrl-eval")
        stack.push_async_callback(bus.close)
        await bus.provision(consumer_table(config))
        config_path = run_dir / CONFIG_FILE
        config_path.write_text(config_toml(config))
        common = ["--config", str(config_path), "--log-level", args.log_level]

        def child(name: str, command: str, *extra: str) -> ChildSpec:
            return ChildSpec(name=name, argv=child_argv(command, *common, *extra), max_restarts=budget.max_restarts,
                             window_s=budget.window_s)  # fmt: skip

        gpus = evaluator_gpus(config.evaluator.gpus)
        specs = [child("logger", "logger"), child("generator", "generator")]
        specs += [child(f"evaluator-gpu{g}", "evaluator", "--gpu", g) for g in gpus] or [child("evaluator-cpu", "evaluator")]
        supervisor = Supervisor(specs)
        log.info("eval run %s: %d problems × %d samples, backend %s; logs in %s", run_id, len(problem_ids), args.samples,
                 config.generator.backend, log_dir)  # fmt: skip

        async def evaluate_then_stop() -> None:
            nonlocal report
            try:
                report = await evaluate_policy(bus, problem_ids, args.samples, config.reward, step=args.step,
                                               timeout_s=args.timeout, log_dir=log_dir, stopping=stopping,
                                               with_turns=args.wandb)  # fmt: skip
                for _ in range(600):  # the logger writes the summary (and has every turn) before the children stop
                    if stopping.is_set() or (Path(report.json_file).exists() and await logger_caught_up(bus)):
                        break
                    await asyncio.sleep(0.1)
            finally:
                stopping.set()

        async with asyncio.TaskGroup() as tg:
            supervised = tg.create_task(supervisor.run(stopping))
            tg.create_task(evaluate_then_stop())
            tg.create_task(server.supervise(stopping, budget, gave_up))
        codes = supervised.result()
    gave_up.update(supervisor.gave_up)
    if gave_up:
        log.error("eval run %s stopped because: %s", run_id, "; ".join(f"{name} {why}" for name, why in gave_up.items()))
        return report, 1
    failed = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
    if failed:
        log.error("children exited with errors: %s", failed)
        return report, 1
    return report, 0


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
