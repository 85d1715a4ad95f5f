"""Reading a run's logs for ``kernelrl analyze``: find the files, stream their records, feed ``RunStats``.

Each file is read in large chunks and decoded with a msgspec ``Decoder`` of a small Struct that declares only
the fields the analysis uses (msgspec skips the rest: prompts, kernels, token ids). Invariants: memory is one
chunk plus the accumulators, whatever the log's size; a line that is not a valid record (a torn last line, bad
JSON, a wrong type, a missing field) is skipped and counted in ``records.skipped``, never fatal. A large file is
cut into parts of whole lines, summed by worker processes and merged in file order: decoding is most of the time,
and msgspec holds the GIL while it decodes.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import msgspec

from kernelrl.actors.analysis import Analysis, RunStats, StepTrend, progression_marks, sampled_at_step
from kernelrl.actors.analysis_workers import WorkerDied, can_fork, default_jobs, in_workers
from kernelrl.core.config import RewardConfig
from kernelrl.core.subjects import is_eval_group

LOG_FILES = ("turns.jsonl", "trajectories.jsonl", "steps.jsonl")
CHUNK_BYTES = 1 << 20
PART_BYTES = 32 << 20  # a file is read by several workers only from twice this size


class AnalysisError(Exception):
    """A LOGDIR that cannot be analysed (missing, or holding no log files); one line for the user."""


# ---------------------------------------------------------------- the fields read (the rest is skipped)


class _Eval(msgspec.Struct, gc=False):
    compiled: bool = False
    correctness: bool = False
    speedup: float | None = 0.0
    error_kind: str = ""
    interpreter: bool = False


class _TurnData(msgspec.Struct, gc=False):
    reward: float = 0.0
    eval_result: _Eval = msgspec.field(default_factory=_Eval)


class TurnRow(msgspec.Struct, gc=False):
    turn_idx: int
    turn_data: _TurnData
    group_id: str = ""


class _HistEval(msgspec.Struct, gc=False):
    correctness: bool = False


class _Hist(msgspec.Struct, gc=False):
    eval_result: _HistEval = msgspec.field(default_factory=_HistEval)


class _Exec(msgspec.Struct, gc=False):
    final_correctness: bool = False
    final_speedup: float | None = 0.0


class TrajectoryRow(msgspec.Struct, gc=False):
    instance_id: str
    num_turns: int
    turn_rewards: list[float]
    aggregated_return: float
    history: list[_Hist] = []
    execution_details: _Exec = msgspec.field(default_factory=_Exec)
    trajectory_id: str = ""
    event_id: str = ""
    policy_version: int = 0
    group_id: str = ""
    extra_info: Any = None  # the generator's dict with an int "step"; anything else (another tool's) falls back


class _Groups(msgspec.Struct, gc=False):
    total_groups: int = 0
    groups_kept: int = 0
    groups_filtered: int = 0
    num_early_exit: int = 0
    num_rollouts: int = 0
    reward_mean: float = 0.0


class StepRow(msgspec.Struct, gc=False):
    step: int
    policy_version: int = 0
    loss: float | None = 0.0
    groups: _Groups = msgspec.field(default_factory=_Groups)


# ---------------------------------------------------------------- streaming

T = TypeVar("T")


def _decode_each(decoder: msgspec.json.Decoder[T], block: bytes | memoryview, bad: list[int]) -> list[T]:
    out: list[T] = []
    for line in bytes(block).split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(decoder.decode(line))
        except (msgspec.DecodeError, UnicodeDecodeError):  # DecodeError covers ValidationError (wrong type, missing field)
            bad[0] += 1
    return out


def stream_records(
    path: Path,
    decoder: msgspec.json.Decoder[T],
    bad: list[int],
    chunk_bytes: int = CHUNK_BYTES,
    start: int = 0,
    end: int | None = None,
) -> Iterator[list[T]]:
    """The records of the file's bytes ``[start, end)`` (whole lines: see ``line_ranges``), a chunk's worth at a
    time; ``bad[0]`` counts the lines skipped. A chunk of whole lines is decoded in one call (the file is read up
    to the chunk's last newline, then seeks back to it: no copy); only a chunk holding a bad line is decoded line
    by line."""
    size = chunk_bytes
    with path.open("rb", buffering=0) as f:
        if start:
            f.seek(start)
        left = (end if end is not None else path.stat().st_size) - start
        while left > 0 and (chunk := f.read(min(size, left))):
            cut = chunk.rfind(b"\n") + 1
            if not cut:  # a record longer than the chunk, or a last line without its newline
                if len(chunk) < min(size, left) and f.read(1):  # a short read that is not the file's end
                    f.seek(-1, 1)
                elif len(chunk) < size:  # the range's end, or the file's (cut back since): a torn or unfinished line
                    yield _decode_each(decoder, chunk, bad)
                    return
                f.seek(-len(chunk), 1)
                size *= 2
                continue
            if cut < len(chunk):
                f.seek(cut - len(chunk), 1)
            left -= cut
            size = chunk_bytes
            block = memoryview(chunk)[:cut]
            try:
                yield decoder.decode_lines(block)
            except (msgspec.DecodeError, UnicodeDecodeError):
                yield _decode_each(decoder, block, bad)


def line_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges that cover the file in about ``parts`` equal pieces, each cut just after a
    newline, so every line lies whole in exactly one range."""
    size = path.stat().st_size
    targets = [size * k // parts for k in range(1, parts)] + [size]
    cuts = [0]
    with path.open("rb", buffering=0) as f:
        for target, next_target in itertools.pairwise(targets):
            if target < cuts[-1]:
                continue
            if (cut := _next_line_start(f, target, next_target)) is not None and cut < size:
                cuts.append(cut)
    return list(zip(cuts, [*cuts[1:], size], strict=True))


def _next_line_start(f: BinaryIO, start: int, limit: int, block: int = 1 << 16) -> int | None:
    """The offset just after the first newline in ``[start, limit)``; None if there is none (a line longer than
    the part: the cut is dropped). Reads in blocks, never more than ``limit - start`` bytes."""
    pos = start
    while pos < limit:
        f.seek(pos)
        data = f.read(min(block, limit - pos))
        if not data:
            return None
        if (i := data.find(b"\n")) >= 0:
            return pos + i + 1
        pos += len(data)
    return None


# ---------------------------------------------------------------- one run


def resolve_log_dir(path: Path) -> Path:
    """A run's logs directory given it or the run directory holding ``logs/``."""
    if not path.exists():
        raise AnalysisError(f"{path}: no such directory")
    if not path.is_dir():
        raise AnalysisError(f"{path}: not a directory")
    if any((path / f).is_file() for f in LOG_FILES):
        return path
    if (path / "logs").is_dir() and any((path / "logs" / f).is_file() for f in LOG_FILES):
        return path / "logs"
    raise AnalysisError(f"{path}: no {', '.join(LOG_FILES)} here or in {path / 'logs'}")


def run_reward_config(log_dir: Path, default: RewardConfig) -> RewardConfig:
    """The ``[reward]`` table of the run's ``config.toml`` beside the logs (or in them), else ``default``."""
    for candidate in (log_dir.parent / "config.toml", log_dir / "config.toml"):
        if candidate.is_file():
            try:
                table = tomllib.loads(candidate.read_text()).get("reward", {})
                return msgspec.convert(table, RewardConfig)
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
                raise AnalysisError(f"{candidate}: cannot read [reward]: {exc}") from None
    return default


def run_name(log_dir: Path) -> str:
    """The run's id: the run directory's name (through a ``latest`` link), else the logs directory's."""
    real = log_dir.resolve()
    return real.parent.name if real.name == "logs" else real.name


def progression(history: Sequence[_Hist]) -> str:
    return progression_marks(h.eval_result.correctness for h in history)


class LogPart(NamedTuple):
    """Whole lines ``[start, end)`` of one log file: what one worker reads."""

    file_name: str
    start: int
    end: int


def plan_parts(log_dir: Path, jobs: int, part_bytes: int = PART_BYTES) -> list[LogPart]:
    """The run's log files as parts: a file of at least ``2 · part_bytes`` is cut into up to ``2 · jobs`` parts
    (more parts than workers, so a worker that finishes early takes another); ``steps.jsonl`` and small files
    are one part each."""
    parts: list[LogPart] = []
    for file_name in LOG_FILES:
        path = log_dir / file_name
        if not path.is_file():
            continue
        size = path.stat().st_size
        pieces = max(1, min(2 * jobs, size // part_bytes)) if jobs > 1 and file_name != "steps.jsonl" else 1
        parts.extend(LogPart(file_name, start, end) for start, end in line_ranges(path, pieces))
    return parts


def read_part(log_dir: Path, part: LogPart, reward: RewardConfig, top_n: int, name: str) -> RunStats:
    """One part's sums (a worker's job); ``RunStats.merge`` adds the parts up in order."""
    stats = RunStats(name, [], reward, top_n)
    bad = [0]
    _READERS[part.file_name](stats, log_dir / part.file_name, bad, part.start, part.end)
    stats.skipped(part.file_name, bad[0])
    return stats


def _read_turns(stats: RunStats, path: Path, bad: list[int], start: int, end: int) -> None:
    add, records = stats.add_turn, stats.records
    for rows in stream_records(path, msgspec.json.Decoder(TurnRow), bad, start=start, end=end):
        for row in rows:
            if is_eval_group(row.group_id):
                records.eval_turns += 1
                continue
            td = row.turn_data
            ev = td.eval_result
            add(row.turn_idx, td.reward, ev.compiled, ev.correctness, ev.speedup or 0.0, ev.interpreter, ev.error_kind)


def _read_trajectories(stats: RunStats, path: Path, bad: list[int], start: int, end: int) -> None:
    add, run, records = stats.add_trajectory, stats.name, stats.records
    for rows in stream_records(path, msgspec.json.Decoder(TrajectoryRow), bad, start=start, end=end):
        for row in rows:
            if is_eval_group(row.group_id):
                records.eval_trajectories += 1
                continue
            rewards = row.turn_rewards
            ret = row.aggregated_return
            ex = row.execution_details
            add(
                run,
                row.trajectory_id or row.event_id,
                row.instance_id,
                row.num_turns,
                ret,
                rewards[0] if rewards else 0.0,
                rewards[-1] if rewards else 0.0,
                ex.final_correctness,
                ex.final_speedup or 0.0,
                progression(row.history) if ret > stats.top_floor else "",
                row.policy_version,
                sampled_at_step(row.extra_info, row.policy_version),
            )


def _read_steps(stats: RunStats, path: Path, bad: list[int], start: int, end: int) -> None:
    for rows in stream_records(path, msgspec.json.Decoder(StepRow), bad, start=start, end=end):
        for row in rows:
            g = row.groups
            stats.add_step(
                StepTrend(
                    run=stats.name,
                    step=row.step,
                    policy_version=row.policy_version,
                    total_groups=g.total_groups,
                    groups_kept=g.groups_kept,
                    groups_filtered=g.groups_filtered,
                    num_early_exit=g.num_early_exit,
                    num_rollouts=g.num_rollouts,
                    reward_mean=g.reward_mean,
                    loss=row.loss or 0.0,
                )
            )


_READERS: dict[str, Callable[[RunStats, Path, list[int], int, int], None]] = {
    "turns.jsonl": _read_turns,
    "trajectories.jsonl": _read_trajectories,
    "steps.jsonl": _read_steps,
}


# ---------------------------------------------------------------- several runs


def analyze(
    paths: Sequence[Path],
    default_reward: RewardConfig | None = None,
    top_n: int = 5,
    jobs: int | None = None,
    part_bytes: int = PART_BYTES,
) -> Analysis:
    """Every LOGDIR (a logs directory or a run directory), each with its run's reward weights, and all together.
    ``AnalysisError`` for a path that is not a run's logs, before anything is read. Large files are read by
    ``jobs`` worker processes (default: one per CPU; 1 reads in this process), each summing whole lines of its
    part; the parts are merged in file order, so the summary is the sequential one up to float rounding."""
    default_reward = default_reward or RewardConfig()
    jobs = default_jobs() if jobs is None else max(1, jobs)
    log_dirs = [resolve_log_dir(Path(p)) for p in paths]
    plans: list[tuple[Path, str, RewardConfig, list[LogPart]]] = []
    names: set[str] = set()
    for log_dir in log_dirs:
        name = run_name(log_dir)
        if name in names:  # two runs of the same name (e.g. runs/a/logs and runs/b/a): name them by path
            name = str(log_dir)
        names.add(name)
        plans.append((log_dir, name, run_reward_config(log_dir, default_reward), plan_parts(log_dir, jobs, part_bytes)))
    runs = _read_plans(plans, top_n, jobs)
    if len(runs) == 1:
        only = runs[0].summary()
        return Analysis(combined=only, runs=[only])
    combined = RunStats("combined", [], runs[0].reward, top_n)
    for stats in runs:
        combined.merge(stats)
    return Analysis(combined=combined.summary(), runs=[s.summary() for s in runs])


def _read_plans(plans: list[tuple[Path, str, RewardConfig, list[LogPart]]], top_n: int, jobs: int) -> list[RunStats]:
    runs = [RunStats(name, [str(log_dir)], reward, top_n) for log_dir, name, reward, _ in plans]
    workers = min(jobs, sum(len(parts) for *_, parts in plans))
    split = any(part.start > 0 for *_, parts in plans for part in parts)  # else every file is small: one part each
    if not split or workers <= 1 or not can_fork():
        for stats, (log_dir, name, reward, parts) in zip(runs, plans, strict=True):
            for part in parts:
                stats.merge(read_part(log_dir, part, reward, top_n, name))
        return runs
    part_jobs = [(d, part, reward, top_n, name) for d, name, reward, parts in plans for part in parts]
    run_of_job = [stats for stats, (*_, parts) in zip(runs, plans, strict=True) for _ in parts]
    try:
        for stats, part_stats in zip(run_of_job, in_workers(read_part, part_jobs, workers), strict=True):
            stats.merge(part_stats)
    except WorkerDied as exc:
        raise AnalysisError(str(exc)) from None
    return runs
