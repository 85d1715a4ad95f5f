"""``kernelrl replay LOGDIR --to eval|buffer``: a run's log through today's system (see ``kernelrl.actors.replay``).

``--to eval`` re-evaluates every logged kernel (``turns.jsonl``: turns with code) through the run's eval queue, so
evaluators must serve that run: a live run, or one started for the purpose, e.g. ``kernelrl run --roles
logger,evaluator`` (then ``--run`` names it, or it is the latest local run). The problem of each turn comes from
``--problems DIR`` (default: the built-in set); a turn whose problem is not there is counted and skipped. The verdict
changes are printed as a table and written as JSONL to ``--output`` (default ``LOGDIR/replay_eval.jsonl``): one line
per changed verdict, then a summary line. ``--device NAME`` compares only verdicts from evaluators whose device names
``NAME`` (e.g. ``H100``, ``cpu``): the eval queue is shared, so a job cannot be sent to one device; start the run's
evaluators on the device you want. Exit status: 0, or 1 when some kernels got no verdict (time-out, evaluator lost).

``--to buffer`` publishes the logged trajectories (``trajectories.jsonl``) unchanged onto the run's trajectory
subject, for offline RL or a reproduction: the run's buffer adopts another run's groups and never counts a trajectory
twice (same event ids: JetStream stores a second replay once; the buffer knows its members by trajectory id).

The broker and run resolve like every command's: ``--nats``/``--run``, ``$KRL_NATS``/``$KRL_RUN``, the latest local run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from kernelrl.bin.common import add_config_arguments, add_setting_flag, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", metavar="LOGDIR", help="a run's log directory (runs/<id>/logs, or runs/<id>)")
    parser.add_argument("--to", required=True, choices=("eval", "buffer"), help="re-evaluate kernels, or feed a buffer")
    add_config_arguments(parser)
    add_setting_flag(parser, "--problems", key="rollout.problem_dir", help="problem set directory (default: built-in)")
    parser.add_argument("--device", default="", help="compare only verdicts from evaluators whose device names this")
    parser.add_argument("--output", default=None, help="JSONL of changed verdicts (default: LOGDIR/replay_eval.jsonl)")
    parser.add_argument("--replay-id", default=None, help="names this replay's eval ids and inbox (default: a fresh one)")
    parser.add_argument("--max-in-flight", type=int, default=16, help="evaluation requests outstanding at most")
    parser.add_argument("--eval-timeout", type=float, default=900.0, help="seconds to wait for one verdict")
    parser.add_argument("--source-run", default=None, help="run id for trajectories that carry none (default: LOGDIR's)")


def find_log(logdir: Path, name: str) -> Path | None:
    for candidate in (logdir / name, logdir / "logs" / name):
        if candidate.is_file():
            return candidate
    return None


def source_run_of(log: Path) -> str:
    """The run a log file belongs to: ``runs/<id>/logs/<file>`` → ``<id>``."""
    logs = log.parent
    return (logs.parent.name if logs.name == "logs" else logs.name) or "replay"


def format_changes(changes: list[object]) -> str:
    from kernelrl.actors.replay import Verdict, VerdictChange

    def verdict(v: Verdict) -> str:
        state = "correct" if v.correctness else (v.error_kind or "wrong") if v.compiled else f"no-compile:{v.error_kind}"
        return f"{state} x{v.speedup:.2f}" if v.correctness and v.speedup > 0 else state

    rows = [("PROBLEM", "TURN", "EVENT", "CHANGE", "LOGGED", "NOW")]
    for c in changes:
        assert isinstance(c, VerdictChange)
        rows.append((c.problem_id, str(c.turn_idx), c.event_id, ",".join(c.changes), verdict(c.old), verdict(c.new)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_summary(summary: msgspec.Struct) -> str:
    fields = msgspec.structs.asdict(summary)
    fields.pop("record", None)
    return "\n".join(f"  {k}: {v}" for k, v in fields.items() if v not in ({}, [], "", None))


async def amain(args: argparse.Namespace) -> int:
    from kernelrl.actors.replay import EvalReplay, replay_trajectories
    from kernelrl.core.bus import Bus
    from kernelrl.core.consumers import consumer_table
    from kernelrl.core.messages import new_id
    from kernelrl.core.problems import problem_set

    config = args.config
    logdir = Path(args.logdir)
    name = "turns.jsonl" if args.to == "eval" else "trajectories.jsonl"
    log = find_log(logdir, name)
    if log is None:
        print(f"kernelrl replay: no {name} in {logdir} or {logdir / 'logs'}", file=sys.stderr)
        return 2
    if args.to == "eval":
        try:
            problems = problem_set(config.rollout.problem_dir)
        except FileNotFoundError as exc:
            print(f"kernelrl replay: {exc}", file=sys.stderr)
            return 2
    bus = await Bus.connect(config.bus, name="kernelrl-replay")
    try:
        await bus.provision(consumer_table(config))
        if args.to == "buffer":
            summary = await replay_trajectories(bus, log, args.source_run or source_run_of(log))
            print(f"replayed {log} to the buffer of run {bus.settings.run}:\n{format_summary(summary)}")
            if summary.own_run:
                print(f"  ({summary.own_run} trajectories are run {bus.settings.run}'s own: its buffer has them already)")
            return 0
        await warn_without_evaluators(args)
        replay = EvalReplay(bus, problems, config.check, args.replay_id or new_id()[:12], max_in_flight=args.max_in_flight,
                            eval_timeout_s=args.eval_timeout, device=args.device)  # fmt: skip
        output = Path(args.output) if args.output else log.parent / "replay_eval.jsonl"
        encoder = msgspec.json.Encoder()
        with output.open("wb") as out:
            summary = await replay.run(log, lambda change: out.write(encoder.encode(change) + b"\n"))
            out.write(encoder.encode(summary) + b"\n")
    finally:
        await bus.close()
    changes = replay.table()
    print(format_changes(changes) if changes else "no verdict changed")  # type: ignore[arg-type]
    if summary.changed > len(changes):
        print(f"({len(changes)} of {summary.changed} changes shown; all in {output})")
    print(f"replay {summary.replay_id} of {log} on run {summary.run_id}:\n{format_summary(summary)}\nwritten to {output}")
    return 1 if summary.errors else 0


async def warn_without_evaluators(args: argparse.Namespace) -> None:
    from kernelrl.bin.status import read_heartbeats

    try:
        beats = await read_heartbeats(args.nats, args.run, args.config.bus.connect_timeout_s)
    except ConnectionError:
        return
    if not any(b.role == "evaluator" for b in beats):
        print(f"kernelrl replay: no live evaluator in run {args.run} yet; requests wait in its eval queue "
              "(start one, e.g. `kernelrl run --roles logger,evaluator`)", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl replay", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
