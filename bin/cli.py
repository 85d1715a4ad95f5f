"""``kernelrl``: one command, a subcommand per role and tool."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from kernelrl.bin import (
    analyze,
    buffer,
    check,
    eval_policy,
    evaluator,
    generator,
    learner,
    logger,
    replay,
    run,
    sample_events,
    server,
    sft,
    status,
    tap,
    view,
)
from kernelrl.bin.common import run_command

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "run": (run, "the whole system on this machine (embedded NATS unless --nats)"),
    "server": (server, "only the broker (embedded nats-server), for runs across hosts and NATS clusters"),
    "generator": (generator, "the generator role: multi-turn kernel dialogues with a vllm, openai, hf or replay backend"),
    "buffer": (buffer, "the buffer role: schedules rollouts, groups trajectories for GRPO, publishes train batches"),
    "learner": (learner, "the learner role: trains the policy on train batches, publishes versioned weights"),
    "evaluator": (evaluator, "the evaluator role: compile, check and time candidates on one GPU or the CPU"),
    "logger": (logger, "the logger role: JSONL logs and console summaries"),
    "sft": (sft, "the run's starting policy: the base model, warm-started on (problem, solution) pairs (cached)"),
    "analyze": (analyze, "summaries, top trajectories and plots from one or several runs' logs"),
    "eval": (eval_policy, "evaluate a policy without training: K samples per problem → eval_logs/eval_step_XXXX.json + samples"),
    "replay": (replay, "re-evaluate a run's logged kernels with today's evaluator, or feed its trajectories to a buffer"),
    "view": (view, "one self-contained HTML report of a run's logs: curves, trajectories, turns and diffs"),
    "check": (check, "the evaluator's verdict on one candidate, without NATS"),
    "status": (status, "live actors and their counters"),
    "tap": (tap, "decoded messages as they pass"),
    "sample-events": (sample_events, "publish the documented sample event stream"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    return run_command(f"kernelrl {args.command}", COMMANDS[args.command][0].amain, args)


if __name__ == "__main__":
    sys.exit(main())
