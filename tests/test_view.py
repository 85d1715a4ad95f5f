"""``kernelrl view``: the HTML report of a run's logs, checked in Python and in a real headless Chromium.

The fixture log is hand-written from ``core.messages`` Structs (prompts from ``core.prompts``), with a torn and a
malformed line, a trajectory seen only through its turns, a kernel and a problem name that try to inject markup.
Browser tests need Debian's ``chromium`` and the ``playwright`` package (never a downloaded browser).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelrl.core import messages as m
from kernelrl.core.prompts import turn_messages

EVIL_KERNEL = 'x = "</script><script>alert(1)</script>"\n<!--<script>alert(4)</script>\n<img src=x onerror=alert(3)>'
EVIL_PROBLEM = "level2/<img src=x onerror=alert(2)>"
PROBLEM_SOURCE = "import torch\nclass Model(torch.nn.Module):\n    pass\n"


def result(
    compiled: bool = False, correct: bool = False, speedup: float = 0.0, kind: str = "", message: str = ""
) -> m.EvalResult:
    return m.EvalResult(
        compiled=compiled,
        correctness=correct,
        speedup=speedup,
        runtime=2.0 if compiled else -1.0,
        error_kind=kind,
        error_message=message,
        baseline_runtime=3.0,
    )


def reward_of(r: m.EvalResult) -> float:
    return 0.1 * r.compiled + 0.3 * r.correctness + r.correctness * min(max(r.speedup - 1, 0), 2)


# trajectory id -> (problem, step, termination reason, [(kernel, verdict)]); "inc" has no trajectory record
DIALOGUES: dict[str, tuple[str, int, str, list[tuple[str, m.EvalResult]]]] = {
    "t1": (
        "level1/1_ReLU",
        1,
        "max_turns",
        [
            ("a\nb\nc", result(kind="syntax", message="line 2: invalid syntax")),
            ("a\nB\nc", result(compiled=True, kind="mismatch", message="max abs error 3.0")),
            ("a\nB\nc\nd", result(compiled=True, correct=True, speedup=1.5)),
        ],
    ),
    "t2": ("level1/1_ReLU", 1, "success", [("relu", result(compiled=True, correct=True, speedup=2.0))]),
    "t3": (
        "level1/2_GELU",
        2,
        "all_failed",
        [
            (EVIL_KERNEL, result(compiled=True, kind="runtime", message="<b>boom</b></script>")),
            ("", result(kind="no_code", message="no code")),
        ],
    ),
    "t4": (EVIL_PROBLEM, 2, "success", [("evil problem kernel", result(compiled=True, correct=True, speedup=0.5))]),
    "inc": ("level1/2_GELU", 2, "", [("g1", result(kind="syntax")), ("g2", result(compiled=True))]),
}


def write_logs(logs: Path) -> None:
    """The fixture log: 5 dialogues, 9 turns (8 in turns.jsonl), 4 trajectory records, 2 train steps, 1 torn and 1
    malformed line."""
    logs.mkdir(parents=True)
    turn_codec, traj_codec, step_codec = m.codec_for(m.TurnEvent), m.codec_for(m.TrajectoryEvent), m.codec_for(m.StepSummary)
    with open(logs / "turns.jsonl", "wb") as turns, open(logs / "trajectories.jsonl", "wb") as trajs:
        for tid, (problem, step, end, dialogue) in DIALOGUES.items():
            history: list[m.HistoryEntry] = []
            for i, (kernel, verdict) in enumerate(dialogue):
                data = m.TurnData(
                    prompt=turn_messages(PROBLEM_SOURCE, history),
                    response=f"```python\n{kernel}\n```" if kernel else "I cannot",
                    kernel_code=kernel,
                    eval_result=verdict,
                    reward=reward_of(verdict),
                )
                event = m.TurnEvent(
                    event_id=f"{tid}-{i}",
                    timestamp="20250101_000000_000000",
                    instance_id=problem,
                    turn_idx=i,
                    turn_data=data,
                    trajectory_id=tid,
                    policy_version=step,
                )
                if tid != "t4":  # t4's turn is only in its trajectory's history
                    turns.write(turn_codec.encode(event) + b"\n")
                history.append(m.HistoryEntry(turn_idx=i, kernel_code=kernel, eval_result=verdict, reward=data.reward))
            if tid == "inc":
                continue
            rewards = [h.reward for h in history]
            last = history[-1].eval_result
            trajs.write(
                traj_codec.encode(
                    m.TrajectoryEvent(
                        event_id=f"traj-{tid}",
                        timestamp="20250101_000001_000000",
                        instance_id=problem,
                        final_reward=rewards[-1],
                        num_turns=len(history),
                        turn_rewards=rewards,
                        aggregated_return=sum(rewards),
                        history=history,
                        execution_details=m.ExecutionDetails(
                            final_compiled=last.compiled, final_correctness=last.correctness, final_speedup=last.speedup
                        ),
                        extra_info={"step": step},
                        trajectory_id=tid,
                        policy_version=step - 1,
                        termination_reason=end,
                    )
                )
                + b"\n"
            )
        trajs.write(b'{"instance_id": 5, "this is": "not a trajectory"}\n')
        turns.write(b'{"event_id":"torn","timestamp":"2025')  # a writer killed mid-line
    with open(logs / "steps.jsonl", "wb") as steps:
        for step, mean in ((1, 0.5), (2, 0.25)):
            groups = m.GroupSummary(reward_mean=mean, groups_kept=1)
            steps.write(step_codec.encode(m.StepSummary(event_id=f"s{step}", step=step, groups=groups)) + b"\n")


def run_view(*args: str) -> subprocess.CompletedProcess[str]:
    """The command, in its own process (Playwright's sync API holds an event loop in this one)."""
    return subprocess.run([sys.executable, "-m", "kernelrl.bin.view", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def report(tmp_path: Path) -> Path:
    write_logs(tmp_path / "run" / "logs")
    done = run_view(str(tmp_path / "run"))  # a run directory: its logs/ is read, the report lands there
    assert done.returncode == 0, done.stderr
    assert "4 trajectories, 9 turns, 2 steps, 1 incomplete, 2 torn or malformed lines skipped" in done.stdout
    return tmp_path / "run" / "logs" / "report.html"


def embedded(html: str, tag_id: str) -> Any:
    found = re.search(rf'<script type="application/json"[^>]*id="{tag_id}">(.*?)</script>', html, re.DOTALL)
    assert found, tag_id
    return json.loads(found.group(1))


# ---------------------------------------------------------------- in Python


def test_report_holds_every_trajectory_and_counts_what_it_skipped(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    index = embedded(html, "krl-index")
    stats = index["meta"]["stats"]
    assert (stats["trajectories"], stats["incomplete"], stats["turns"], stats["steps"]) == (4, 1, 9, 2)
    assert stats["skipped"] == {"turns.jsonl": 1, "trajectories.jsonl": 1}
    rows = {r[0]: r for r in index["rows"]}
    assert sorted(rows) == ["inc", "t1", "t2", "t3", "t4"]
    problems, errors, ends = index["tables"]["problems"], index["tables"]["errors"], index["tables"]["ends"]
    t1 = rows["t1"]
    assert (problems[t1[1]], t1[2], index["meta"]["outcomes"][t1[3]], ends[t1[4]]) == ("level1/1_ReLU", 1, "correct", "max_turns")
    assert [errors[k] for k in t1[5]] == ["syntax", "mismatch"] and len(t1[6]) == 3
    assert t1[7] == pytest.approx(0.0 + 0.1 + 0.9)
    assert index["meta"]["outcomes"][rows["inc"][3]] == "incomplete" and rows["inc"][7] is None
    # by turn: turn 0 of all 5 dialogues, turn 1 of t1, t3, inc, turn 2 of t1
    assert [(s[0], s[1], s[3], s[4]) for s in index["by_turn"]] == [(0, 5, 3, 2), (1, 3, 2, 0), (2, 1, 1, 1)]
    assert [(s[0], s[1]) for s in index["train"]] == [(1, 0.5), (2, 0.25)]
    # markup in the logs never ends a tag: "</script>" appears only as the closing tags the report wrote itself
    assert html.count("</script>") == html.count("<script") == 3  # 1 body chunk, the index, the page's script
    assert "<img" not in html and "\\u003c/script>\\u003cscript>alert(1)" in html


def test_feedback_is_the_last_attempt_without_its_kernel(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    chunk = re.search(r'id="krl-b0">\n(.*?)</script>', html, re.DOTALL)
    assert chunk
    bodies = [json.loads(line) for line in chunk.group(1).splitlines()]
    t1 = [b for b in bodies if b.get("k") in ("a\nb\nc", "a\nB\nc", "a\nB\nc\nd")]
    assert [b["t"] for b in t1] == [0, 1, 2]
    assert "f" not in t1[0] and bodies[t1[0]["fr"]]["text"].startswith("Here is the PyTorch reference program")
    assert t1[2]["f"].startswith("### Attempt 2\n[the kernel of this attempt")
    assert "Error (mismatch): max abs error 3.0" in t1[2]["f"] and "a\nB\nc" not in t1[2]["f"]
    shared = [b for b in bodies if "text" in b]
    assert len(shared) == 1  # every first turn read the same reference program: stored once


def test_a_missing_log_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_view(str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("kernelrl view: no turns.jsonl") and done.stderr.count("\n") == 1


def synthetic_log(logs: Path, trajectories: int, turns_each: int) -> None:
    logs.mkdir(parents=True)
    turn_codec, traj_codec = m.codec_for(m.TurnEvent), m.codec_for(m.TrajectoryEvent)
    prompt = [m.ChatMessage("system", "system"), m.ChatMessage("user", "Here is the PyTorch reference program")]
    with open(logs / "turns.jsonl", "wb") as turns, open(logs / "trajectories.jsonl", "wb") as trajs:
        for n in range(trajectories):
            tid, problem = f"r{n:06d}", f"level1/{n % 50}_Op"
            for i in range(turns_each):
                verdict = result(compiled=i > 0, correct=i == turns_each - 1, speedup=1.0 + i / 4)
                data = m.TurnData(
                    prompt=prompt,
                    kernel_code=f"@triton.jit\ndef k{n}_{i}(x):\n    return x * {i}\n" * 4,
                    eval_result=verdict,
                    reward=reward_of(verdict),
                )
                turns.write(
                    turn_codec.encode(
                        m.TurnEvent(
                            event_id=f"{tid}-{i}",
                            timestamp="t",
                            instance_id=problem,
                            turn_idx=i,
                            turn_data=data,
                            trajectory_id=tid,
                        )
                    )
                    + b"\n"
                )
            trajs.write(
                traj_codec.encode(
                    m.TrajectoryEvent(
                        event_id=f"traj-{tid}",
                        timestamp="t",
                        instance_id=problem,
                        final_reward=0.0,
                        num_turns=turns_each,
                        turn_rewards=[],
                        aggregated_return=0.4,
                        trajectory_id=tid,
                        extra_info={"step": n // 1000},
                        execution_details=m.ExecutionDetails(final_correctness=True),
                    )
                )
                + b"\n"
            )


@pytest.fixture(scope="module")
def big_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 turns: 25,000 trajectories of 4 turns, 25 steps."""
    logs = tmp_path_factory.mktemp("big") / "logs"
    synthetic_log(logs, 25_000, 4)
    out = logs.parent / "big.html"
    done = run_view(str(logs), "--output", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_a_100k_turn_log_is_paged_and_chunked(big_report: Path) -> None:
    html = big_report.read_text(encoding="utf-8")
    index = embedded(html, "krl-index")
    assert (index["meta"]["stats"]["turns"], len(index["rows"]), index["meta"]["page_size"]) == (100_000, 25_000, 100)
    # bodies in chunks of 1000 lines: 100,000 turns and 1 shared prompt text
    assert html.count('class="krl-bodies"') == 101
    assert index["rows"][-1][6] == [99_997, 99_998, 99_999, 100_000]  # line 0 is the shared prompt, then the turns


# ---------------------------------------------------------------- in headless Chromium


def chromium_path() -> str | None:
    candidates = (os.environ.get("KRL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium: apt-get install -y chromium (Debian's package; Playwright's browser downloads are not used)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--headless", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A page on a report, with every page error, console error and dialog it raised."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)

    def rows(self) -> list[str]:
        return self.page.locator("#rows tr.row td:last-child").all_text_contents()

    def select(self, which: str, label: str) -> None:
        self.page.select_option(f"#f-{which}", label=label)


def test_the_page_filters_expands_and_escapes(browser: Any, report: Path, tmp_path: Path) -> None:
    page = Page(browser, report)
    p = page.page
    assert sorted(page.rows()) == ["inc", "t1", "t2", "t3", "t4"]
    assert p.locator("#match-count").text_content() == "5 of 5 trajectories match"
    assert p.locator("svg circle.pt").count() == 2 + 2 + 2 + 3 * 3  # by step: 3 series of 2 steps; by turn: 3 × 3 turns

    page.select("problem", "level1/1_ReLU")
    assert sorted(page.rows()) == ["t1", "t2"]
    page.select("outcome", "correct")
    assert sorted(page.rows()) == ["t1", "t2"]
    p.click("#f-reset")
    page.select("outcome", "incorrect")
    assert page.rows() == ["t3"]
    page.select("outcome", "incomplete")
    assert page.rows() == ["inc"]
    p.click("#f-reset")
    page.select("error", "syntax")
    assert sorted(page.rows()) == ["inc", "t1"]
    page.select("error", "(no error in any turn)")
    assert sorted(page.rows()) == ["t2", "t4"]
    p.click("#f-reset")
    page.select("step", "2")
    assert sorted(page.rows()) == ["inc", "t3", "t4"]  # inc: no trajectory record, so its policy version
    page.select("end", "all_failed")
    assert page.rows() == ["t3"]
    p.click("#f-reset")

    # t1 expands into its three turns side by side, each kernel diffed against the one before
    p.locator("#rows tr.row", has_text="t1").click()
    panels = p.locator("tr.detail .turn")
    assert panels.count() == 3
    titles = p.locator("tr.detail .kernel-title").all_text_contents()
    assert titles == ["kernel", "kernel (diff against turn 1: +1 −1)", "kernel (diff against turn 2: +1 −0)"]
    assert panels.nth(1).locator(".dl.del").all_text_contents() == ["- b"]
    assert panels.nth(1).locator(".dl.add").all_text_contents() == ["+ B"]
    assert panels.nth(2).locator(".dl.add").all_text_contents() == ["+ d"]
    assert "reward 0.900 = compile 0.100 + correct 0.300 + speed 0.500" in panels.nth(2).text_content()
    assert "Error (mismatch): max abs error 3.0" in panels.nth(2).locator("details.feedback pre").text_content()
    p.locator("#rows tr.row", has_text="t1").click()
    assert p.locator("tr.detail").count() == 0

    # markup in a kernel, an error message and a problem name shows as text and runs nothing
    p.locator("#rows tr.row", has_text="t3").click()
    kernel = p.locator("tr.detail .turn").nth(0).locator("pre.kernel").text_content()
    assert kernel == "".join(f"  {line}" for line in EVIL_KERNEL.split("\n"))
    assert p.locator("tr.detail .turn pre.em").nth(0).text_content() == "<b>boom</b></script>"
    no_kernel = p.locator("tr.detail .turn").nth(1).locator(".kernel-title").text_content()
    assert no_kernel == "no kernel (the answer held no code block)"
    assert EVIL_PROBLEM in p.locator("#rows td.problem").all_text_contents()
    p.locator("#rows tr.row", has_text="t4").click()
    t4 = p.locator("tr.detail .turn").last
    assert t4.locator("h4").text_content() == "Turn 1 (from the trajectory's history)"
    assert t4.locator("details.feedback summary").text_content() == "prompt not logged"
    assert "reward 0.400 = compile 0.100 + correct 0.300 + speed 0.000" in t4.text_content()
    assert p.evaluate("document.querySelectorAll('script').length") == 3
    assert p.evaluate("document.querySelectorAll('img, b').length") == 0
    assert page.dialogs == [] and page.errors == []

    shot = p.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "report.png").stat().st_size > 10_000
    p.close()


def test_a_100k_turn_report_renders_one_page(browser: Any, big_report: Path) -> None:
    page = Page(browser, big_report)
    p = page.page
    assert p.locator("#rows tr.row").count() == 100  # the first page only, not 25,000 rows
    assert p.locator("#match-count").text_content() == "25000 of 25000 trajectories match"
    assert p.locator("#page-info").text_content() == "page 1 of 250"
    p.click("#next")
    assert p.locator("#rows tr.row td:first-child").first.text_content() == "101"
    page.select("step", "24")  # the last 1000 trajectories; their turns sit in the last body chunk
    assert p.locator("#page-info").text_content() == "page 1 of 10"
    p.locator("#rows tr.row").last.click()
    assert p.locator("tr.detail .turn").count() == 4
    assert p.locator("tr.detail .turn").nth(3).locator(".dl.add").count() == 8  # "def k…_3" and "return x * 3", four times
    assert page.errors == [] and page.dialogs == []
    p.close()


def write_split_logs(logs: Path) -> None:
    """Two training dialogues (a: correct, b: not) and two held-out eval ones (e: correct; ei: turns only), one turn
    each, all at step 1."""
    logs.mkdir(parents=True)
    turn_codec, traj_codec = m.codec_for(m.TurnEvent), m.codec_for(m.TrajectoryEvent)
    with open(logs / "turns.jsonl", "wb") as turns, open(logs / "trajectories.jsonl", "wb") as trajs:
        held_out = "eval-0001-heldout-p"
        dialogues = (("a", "g1", True), ("b", "g1", False), ("e", f"{held_out}0", True), ("ei", f"{held_out}1", False))
        for tid, group, correct in dialogues:
            verdict = result(compiled=True, correct=correct, speedup=2.0 if correct else 0.0, kind="" if correct else "mismatch")
            prompt = turn_messages(PROBLEM_SOURCE, [])
            data = m.TurnData(prompt=prompt, kernel_code=tid, eval_result=verdict, reward=reward_of(verdict))
            turn = m.TurnEvent(event_id=f"{tid}-0", timestamp="t", instance_id="level1/1_ReLU", turn_idx=0, turn_data=data,
                               trajectory_id=tid, group_id=group, policy_version=1)  # fmt: skip
            turns.write(turn_codec.encode(turn) + b"\n")
            if tid == "ei":
                continue
            trajectory = m.TrajectoryEvent(
                event_id=f"traj-{tid}",
                timestamp="t",
                instance_id="level1/1_ReLU",
                final_reward=data.reward,
                num_turns=1,
                turn_rewards=[data.reward],
                aggregated_return=data.reward,
                history=[m.HistoryEntry(turn_idx=0, kernel_code=tid, eval_result=verdict, reward=data.reward)],
                execution_details=m.ExecutionDetails(final_correctness=correct, final_speedup=verdict.speedup),
                extra_info={"step": 1},
                trajectory_id=tid,
                group_id=group,
                policy_version=1,
            )
            trajs.write(traj_codec.encode(trajectory) + b"\n")


def test_held_out_eval_dialogues_are_marked_filterable_and_not_in_the_curves(browser: Any, tmp_path: Path) -> None:
    write_split_logs(tmp_path / "logs")
    done = run_view(str(tmp_path / "logs"))
    assert done.returncode == 0, done.stderr
    report = tmp_path / "logs" / "report.html"
    index = embedded(report.read_text(encoding="utf-8"), "krl-index")
    assert index["meta"]["splits"] == ["training", "held-out eval"]
    assert {r[0]: index["meta"]["splits"][r[11]] for r in index["rows"]} == {
        "a": "training",
        "b": "training",
        "e": "held-out eval",
        "ei": "held-out eval",
    }
    assert [(s[0], s[1], s[3]) for s in index["by_step"]] == [(1, 2, 1)]  # step 1: a and b, one correct; e is not counted
    assert [(s[0], s[1], s[4]) for s in index["by_turn"]] == [(0, 2, 1)]  # turn 0 of a and b only

    page = Page(browser, report)
    page.select("split", "held-out eval")
    assert sorted(page.rows()) == ["e", "ei"]
    assert page.page.locator("#rows tr.row td:nth-child(2)").all_text_contents() == ["eval 1", "eval 1"]
    page.select("split", "training")
    assert sorted(page.rows()) == ["a", "b"]
    assert page.errors == [] and page.dialogs == []
    page.page.close()


def test_the_report_uses_the_runs_own_reward_weights(tmp_path: Path) -> None:
    write_split_logs(tmp_path / "run" / "logs")
    (tmp_path / "run" / "config.toml").write_text("[reward]\ncompile_weight = 0.2\nspeedup_cap = 1.0\n")
    done = run_view(str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    meta = embedded((tmp_path / "run" / "logs" / "report.html").read_text(encoding="utf-8"), "krl-index")["meta"]
    assert (meta["reward"]["compile"], meta["reward"]["cap"], meta["reward"]["correct"]) == (0.2, 1.0, 0.3)
    (tmp_path / "run" / "config.toml").write_text("[reward]\ncompile_weight = 'high'\n")
    done = run_view(str(tmp_path / "run"))
    assert done.returncode == 2 and "config.toml: cannot read [reward]" in done.stderr
