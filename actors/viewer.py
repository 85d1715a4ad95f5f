"""The trajectory viewer behind ``kernelrl view``: one self-contained HTML report of a run's logs.

Streams ``turns.jsonl``, ``trajectories.jsonl`` and ``steps.jsonl`` one record at a time (typed msgspec decoding of
the fields the page shows; a torn or malformed line is skipped and counted, never fatal) and writes one HTML file
that needs no server and no network: the page (``viewer_page.html``: its CSS, and the JS that draws the curves,
filters and pages the trajectory table and renders a trajectory's turns only when it is expanded) with the data as
JSON in ``<script type="application/json">`` tags — the table's rows in one index tag, the turn bodies one JSON line
each in chunks of ``CHUNK_LINES`` lines, parsed only when a row that needs them is opened.

Invariants: log text never reaches the page as markup — every ``<`` in the embedded JSON is written ``\\u003c``
(no ``</script>`` or ``<!--`` can end a data tag or change how it is parsed), the page inserts text only through
``textContent``, and its Content-Security-Policy lets only the page's own script (by hash) run and nothing load.
Memory grows with the number of trajectories (one small row each), never with the size of a turn: a turn's body goes
to the output as soon as it is read.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.resources
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from kernelrl.actors.analysis import sampled_at_step
from kernelrl.core.config import RewardConfig
from kernelrl.core.messages import ChatMessage, EvalResult
from kernelrl.core.subjects import is_eval_group

CHUNK_LINES = 1000  # turn bodies per data tag: a page parses one chunk's text when a row in it is opened
PAGE_SIZE = 100  # table rows per page
MAX_TEXT = 100_000  # characters kept of one kernel, feedback or response; the rest is cut with a marker
MAX_RESPONSE = 8_000  # a response is kept only when it held no kernel (to show why), and only this much of it
HISTORY_MARKER = "Your earlier attempts and their results:"  # core.prompts.history_section
ATTEMPT_HEADER = "### Attempt "
CODE_BLOCK = re.compile(r"```[A-Za-z0-9_+-]*\n.*?```", re.DOTALL)
OUTCOMES = ("correct", "incorrect", "incomplete")  # incomplete: turns logged, no trajectory (e.g. a killed generator)
SPLITS = ("training", "held-out eval")  # held-out eval: `kernelrl eval` and the learner's eval_steps; not in the curves


# ---------------------------------------------------------------- what is read (subsets of core.messages' records)


class _TurnData(msgspec.Struct, kw_only=True):
    prompt: list[ChatMessage] = []
    response: str = ""
    kernel_code: str = ""
    eval_result: EvalResult = msgspec.field(default_factory=EvalResult)
    reward: float = 0.0
    extra_info: dict[str, Any] = {}


class _Turn(msgspec.Struct, kw_only=True):
    """A ``TurnEvent`` line, without the token ids the page never shows (they are skipped, not decoded)."""

    event_id: str = ""
    timestamp: str = ""
    instance_id: str
    turn_idx: int
    turn_data: _TurnData
    trajectory_id: str = ""
    group_id: str = ""
    sample_idx: int = 0
    policy_version: int = 0


class _History(msgspec.Struct, kw_only=True):
    turn_idx: int
    kernel_code: str = ""
    eval_result: EvalResult = msgspec.field(default_factory=EvalResult)
    reward: float = 0.0


class _Execution(msgspec.Struct, kw_only=True):
    final_correctness: bool = False
    final_speedup: float = 0.0


class _Trajectory(msgspec.Struct, kw_only=True):
    """A ``TrajectoryEvent`` line: what the table shows, and the history for turns missing from ``turns.jsonl``."""

    event_id: str = ""
    timestamp: str = ""
    instance_id: str
    num_turns: int = 0
    aggregated_return: float = 0.0
    history: list[_History] = []
    execution_details: _Execution = msgspec.field(default_factory=_Execution)
    extra_info: dict[str, Any] = {}
    trajectory_id: str = ""
    group_id: str = ""
    sample_idx: int = 0
    policy_version: int = 0
    termination_reason: str = ""


class _Groups(msgspec.Struct, kw_only=True):
    reward_mean: float = 0.0
    groups_kept: int = 0
    groups_filtered: int = 0


class _Step(msgspec.Struct, kw_only=True):
    step: int
    loss: float = 0.0
    groups: _Groups = msgspec.field(default_factory=_Groups)


# ---------------------------------------------------------------- what is written


class TurnBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One turn as the page renders it (one JSON line of a data chunk; short names keep 100k turns small)."""

    t: int  # turn_idx
    k: str = ""  # kernel
    f: str | None = None  # the evaluator feedback this turn's prompt carried (None: see ``fr``)
    fr: int = -1  # else a body line holding the prompt text, shared by every turn that read the same one
    c: bool = False  # compiled
    ok: bool = False  # correct
    rt: float = -1.0  # runtime (ms)
    bl: float = -1.0  # baseline runtime (ms)
    sp: float = 0.0  # speedup
    ek: str = ""  # error kind
    em: str = ""  # error message
    r: float = 0.0  # logged reward
    ip: bool = False  # timed on the CPU interpreter
    fx: bool = False  # speedup flagged as implausible
    dev: str = ""  # device
    resp: str = ""  # the response, when it held no kernel
    fin: str = ""  # the generation's finish reason
    pv: int = 0  # policy version
    ts: str = ""  # timestamp
    src: str = "turn"  # "turn" (turns.jsonl) or "history" (the trajectory's history: no prompt, no response)


class SharedText(msgspec.Struct, kw_only=True):
    text: str


class Row(msgspec.Struct, array_like=True):
    """One trajectory in the table (a JSON array: 100k turns make tens of thousands of rows)."""

    id: str
    problem: int  # index into tables.problems
    step: int  # the rollout's step (extra_info["step"]), else its policy version
    outcome: int  # index into OUTCOMES
    end: int  # index into tables.ends (termination reason)
    errors: list[int]  # indices into tables.errors, the distinct error kinds of its turns in turn order
    turns: list[int]  # body line numbers, in turn order
    ret: float | None  # aggregated return (None: incomplete)
    speedup: float  # final speedup
    sample: int
    version: int
    split: int  # index into SPLITS: 0 training, 1 held-out evaluation (group id eval-…)


class TurnStat(msgspec.Struct, array_like=True):
    turn: int
    n: int = 0
    reward: float = 0.0
    compiled: int = 0
    correct: int = 0


class StepStat(msgspec.Struct, array_like=True):
    step: int
    n: int = 0
    ret: float = 0.0
    correct: int = 0


class TrainStep(msgspec.Struct, array_like=True):
    step: int
    reward_mean: float
    loss: float
    groups_kept: int
    groups_filtered: int


class ReportStats(msgspec.Struct, kw_only=True):
    """What a report holds, and what was skipped on the way."""

    output: str
    trajectories: int = 0
    turns: int = 0
    steps: int = 0
    incomplete: int = 0  # trajectories seen only through their turns
    skipped: dict[str, int] = {}  # file name -> torn or malformed lines
    duplicates: int = 0  # records seen twice (same trajectory and turn, same trajectory)
    bytes: int = 0


class Index(msgspec.Struct, kw_only=True):
    meta: dict[str, Any]
    tables: dict[str, list[str]]
    rows: list[Row]
    by_turn: list[TurnStat]
    by_step: list[StepStat]
    train: list[TrainStep]


# ---------------------------------------------------------------- reading


def log_directory(path: Path) -> Path:
    """The directory holding the JSONL: ``path`` itself, or a run directory's ``logs/``."""
    if not (path / "turns.jsonl").exists() and not (path / "trajectories.jsonl").exists() and (path / "logs").is_dir():
        return path / "logs"
    return path


def read_records(path: Path, type_: type[Any], skipped: dict[str, int]) -> Iterator[Any]:
    """Decode ``path`` line by line; a line that does not decode (torn, malformed, wrong shape) is counted in
    ``skipped[path.name]`` and passed over. A missing file is an empty log."""
    if not path.exists():
        return
    decoder = msgspec.json.Decoder(type_)
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                skipped[path.name] = skipped.get(path.name, 0) + 1


def cut(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… ({len(text) - limit} more characters not kept in this report)"


def feedback_text(prompt: list[ChatMessage]) -> tuple[str, bool]:
    """The evaluator feedback a turn's prompt carried, and whether it is one (else: the whole last user message, e.g.
    the first turn's reference program). Feedback is the last ``### Attempt`` section of the history the generator
    wrote (``core.prompts.history_section``), its kernel replaced by a pointer (the previous panel shows it)."""
    user = next((msg.content for msg in reversed(prompt) if msg.role == "user"), "")
    at = user.find(HISTORY_MARKER)
    if at < 0:
        return user, False
    section = user[at:]
    last = section.rfind(ATTEMPT_HEADER)
    if last >= 0:
        section = section[last:]
    return CODE_BLOCK.sub("[the kernel of this attempt: the previous turn's panel]", section), True


def _finite(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def body_from_result(turn_idx: int, kernel: str, result: EvalResult, reward: float) -> TurnBody:
    return TurnBody(
        t=turn_idx,
        k=cut(kernel),
        c=result.compiled,
        ok=result.correctness,
        rt=_finite(result.runtime, -1.0),
        bl=_finite(result.baseline_runtime, -1.0),
        sp=_finite(result.speedup, 0.0),
        ek=result.error_kind,
        em=cut(result.error_message),
        r=_finite(reward, 0.0),
        ip=result.interpreter,
        fx=result.speedup_flagged,
        dev=result.device,
    )


# ---------------------------------------------------------------- writing


def _json(obj: Any) -> bytes:
    """JSON with every ``<`` escaped: safe inside a ``<script>`` element whatever the strings hold."""
    return msgspec.json.encode(obj).replace(b"<", b"\\u003c")


class _BodyWriter:
    """Appends body lines to the output, ``CHUNK_LINES`` per data tag; a line's number is its reference."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.lines = 0

    def write(self, obj: Any) -> int:
        n = self.lines
        if n % CHUNK_LINES == 0:
            if n:
                self.out.write(b"</script>\n")
            self.out.write(b'<script type="application/json" class="krl-bodies" id="krl-b%d">\n' % (n // CHUNK_LINES))
        self.out.write(_json(obj) + b"\n")
        self.lines += 1
        return n

    def close(self) -> None:
        if self.lines:
            self.out.write(b"</script>\n")


class _Interned:
    """Strings to small integers (problems, error kinds, termination reasons)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        return self.ids.setdefault(s, len(self.ids))

    def table(self) -> list[str]:
        return list(self.ids)


class _Pending(msgspec.Struct):
    """A trajectory's turns read from ``turns.jsonl``, waiting for its trajectory record."""

    problem: str
    version: int
    sample: int
    turns: dict[int, tuple[int, int, bool]] = {}  # turn_idx -> (body line, error kind id or -1, correct)
    held_out: bool = False


def page_template() -> tuple[str, str, str]:
    """The page split around its data (head, tail) and the CSP hash of its script."""
    page = importlib.resources.files("kernelrl.actors").joinpath("viewer_page.html").read_text(encoding="utf-8")
    script = re.search(r'<script id="krl-app">(.*?)</script>', page, re.DOTALL)
    if script is None:
        raise RuntimeError("viewer_page.html has no krl-app script")
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode("utf-8")).digest()).decode("ascii")
    head, tail = page.split("<!--KRL-DATA-->", 1)
    return head.replace("{{SCRIPT_HASH}}", f"sha256-{digest}"), tail, digest


def build_report(logs: Path, output: Path, reward: RewardConfig | None = None, page_size: int = PAGE_SIZE) -> ReportStats:
    """Write the report of the logs in ``logs`` (a log directory or a run directory) to ``output``, atomically."""
    logs = log_directory(logs)
    reward = reward or RewardConfig()
    head, tail, _ = page_template()
    stats = ReportStats(output=str(output))
    skipped: dict[str, int] = {}
    problems, errors, ends = _Interned(), _Interned(), _Interned()
    by_turn: dict[int, TurnStat] = {}
    by_step: dict[int, StepStat] = {}
    pending: dict[str, _Pending] = {}
    shared: dict[bytes, int] = {}  # digest of a prompt text -> its body line
    rows: list[Row] = []
    seen: set[str] = set()

    def count_turn(body: TurnBody) -> None:
        s = by_turn.setdefault(body.t, TurnStat(body.t))
        s.n += 1
        s.reward += body.r
        s.compiled += body.c
        s.correct += body.ok

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(head.encode("utf-8"))
            bodies = _BodyWriter(out)
            for turn in read_records(logs / "turns.jsonl", _Turn, skipped):
                key = _key(turn.trajectory_id, turn.group_id, turn.instance_id, turn.sample_idx, turn.event_id)
                p = pending.get(key)
                if p is None:
                    held_out = is_eval_group(turn.group_id)
                    p = pending[key] = _Pending(turn.instance_id, turn.policy_version, turn.sample_idx, {}, held_out)
                if turn.turn_idx in p.turns:
                    stats.duplicates += 1
                    continue
                data, result = turn.turn_data, turn.turn_data.eval_result
                body = body_from_result(turn.turn_idx, data.kernel_code, result, data.reward)
                text, is_feedback = feedback_text(data.prompt)
                if is_feedback:
                    body.f = cut(text)
                elif text:  # the reference program: the same for every first turn of a problem, stored once
                    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                    if digest not in shared:
                        shared[digest] = bodies.write(SharedText(text=cut(text)))
                    body.fr = shared[digest]
                if not data.kernel_code.strip():
                    body.resp = cut(data.response, MAX_RESPONSE)
                body.fin = str(data.extra_info.get("finish_reason", ""))
                body.pv, body.ts = turn.policy_version, turn.timestamp
                if not p.held_out:
                    count_turn(body)
                line = bodies.write(body)
                p.turns[turn.turn_idx] = (line, errors(result.error_kind) if result.error_kind else -1, result.correctness)
                stats.turns += 1

            for traj in read_records(logs / "trajectories.jsonl", _Trajectory, skipped):
                key = _key(traj.trajectory_id, traj.group_id, traj.instance_id, traj.sample_idx, traj.event_id)
                if key in seen:
                    stats.duplicates += 1
                    continue
                seen.add(key)
                p = pending.pop(key, None)
                logged = p.turns if p else {}
                held_out = is_eval_group(traj.group_id)
                lines: dict[int, int] = {i: v[0] for i, v in logged.items()}
                kinds: dict[int, str] = {}
                for h in traj.history:  # turns missing from turns.jsonl come from the trajectory's own history
                    if h.eval_result.error_kind:
                        kinds[h.turn_idx] = h.eval_result.error_kind
                    if h.turn_idx not in lines:
                        body = body_from_result(h.turn_idx, h.kernel_code, h.eval_result, h.reward)
                        body.pv, body.ts, body.src = traj.policy_version, traj.timestamp, "history"
                        if not held_out:
                            count_turn(body)
                        lines[h.turn_idx] = bodies.write(body)
                        stats.turns += 1
                for i, v in logged.items():
                    if v[1] >= 0 and i not in kinds:
                        kinds[i] = errors.table()[v[1]]
                step = sampled_at_step(traj.extra_info, traj.policy_version)
                correct = traj.execution_details.final_correctness
                ret = _finite(traj.aggregated_return, 0.0)
                if not held_out:
                    s = by_step.setdefault(step, StepStat(step))
                    s.n, s.ret, s.correct = s.n + 1, s.ret + ret, s.correct + correct
                rows.append(
                    Row(
                        id=key,
                        problem=problems(traj.instance_id),
                        step=step,
                        outcome=0 if correct else 1,
                        end=ends(traj.termination_reason),
                        errors=_distinct(errors(kinds[i]) for i in sorted(kinds)),
                        turns=[lines[i] for i in sorted(lines)],
                        ret=ret,
                        speedup=_finite(traj.execution_details.final_speedup, 0.0),
                        sample=traj.sample_idx,
                        version=traj.policy_version,
                        split=int(held_out),
                    )
                )
                stats.trajectories += 1

            for key, p in pending.items():  # turns whose trajectory never arrived
                order = sorted(p.turns)
                rows.append(
                    Row(
                        id=key,
                        problem=problems(p.problem),
                        step=p.version,
                        outcome=2,
                        end=ends(""),
                        errors=_distinct(p.turns[i][1] for i in order if p.turns[i][1] >= 0),
                        turns=[p.turns[i][0] for i in order],
                        ret=None,
                        speedup=0.0,
                        sample=p.sample,
                        version=p.version,
                        split=int(p.held_out),
                    )
                )
                stats.incomplete += 1
            bodies.close()

            train = [
                TrainStep(
                    s.step,
                    _finite(s.groups.reward_mean, 0.0),
                    _finite(s.loss, 0.0),
                    s.groups.groups_kept,
                    s.groups.groups_filtered,
                )
                for s in read_records(logs / "steps.jsonl", _Step, skipped)
            ]
            train.sort(key=lambda s: s.step)
            stats.steps = len(train)
            rows.sort(key=lambda r: (r.step, r.problem, r.sample, r.id))
            stats.skipped = skipped
            index = Index(
                meta={
                    "logs": str(logs),
                    "generated": dt.datetime.now().isoformat(timespec="seconds"),
                    "page_size": page_size,
                    "chunk": CHUNK_LINES,
                    "outcomes": list(OUTCOMES),
                    "splits": list(SPLITS),
                    "reward": {
                        "compile": reward.compile_weight,
                        "correct": reward.correct_weight,
                        "cap": reward.speedup_cap,
                        "interpreter_speedup": reward.reward_interpreter_speedup,
                    },
                    "stats": msgspec.to_builtins(stats),
                },
                tables={"problems": problems.table(), "errors": errors.table(), "ends": ends.table()},
                rows=rows,
                by_turn=[by_turn[k] for k in sorted(by_turn)],
                by_step=[by_step[k] for k in sorted(by_step)],
                train=train,
            )
            out.write(b'<script type="application/json" id="krl-index">')
            out.write(_json(index))
            out.write(b"</script>\n")
            out.write(tail.encode("utf-8"))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    stats.bytes = output.stat().st_size
    return stats


def _key(trajectory_id: str, group_id: str, problem: str, sample: int, event_id: str) -> str:
    """What joins a turn to its trajectory: the trajectory id; for older records without one, the group, problem
    and sample; a record with neither stands alone."""
    if trajectory_id:
        return trajectory_id
    return f"{group_id}/{problem}/{sample}" if group_id else f"event:{event_id}"


def _distinct(ids: Any) -> list[int]:
    return list(dict.fromkeys(ids))
