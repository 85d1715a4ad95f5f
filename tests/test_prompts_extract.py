"""The text the policy reads and the code taken from what it writes."""

from __future__ import annotations

import pytest

from kernelrl.core import messages as m
from kernelrl.core.config import RewardConfig
from kernelrl.core.extract import extract_code
from kernelrl.core.prompts import SYSTEM_PROMPT, history_section, turn_messages
from kernelrl.core.reward import TerminationReason, discounted_returns, result_score, termination_reason

REFERENCE = (
    "import torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, x):\n        return torch.relu(x)\n"
)
KERNEL = "import triton\n\n@triton.jit\ndef k(x_ptr):\n    pass\n"


def attempt(turn_idx: int, **result: object) -> m.HistoryEntry:
    return m.HistoryEntry(turn_idx=turn_idx, kernel_code=KERNEL, eval_result=m.EvalResult(**result), reward=0.0)  # type: ignore[arg-type]


def test_the_system_prompt_states_the_task_the_format_and_the_imports() -> None:
    for needed in ("ModelNew", "@triton.jit", "```python", "torch, torch.nn, torch.nn.functional, triton, triton.language, math"):
        assert needed in SYSTEM_PROMPT


def test_the_first_turn_is_the_reference_program_and_no_history() -> None:
    system, user = turn_messages(REFERENCE, [])
    assert (system.role, user.role) == ("system", "user")
    assert f"```python\n{REFERENCE.rstrip()}\n```" in user.content
    assert "Attempt" not in user.content


def test_the_history_shows_each_attempt_with_its_verdict_then_what_to_do() -> None:
    history = [
        attempt(0, compiled=False, error_kind="compile", error_message="CompilationError: at 3:4"),
        attempt(1, compiled=True, correctness=True, runtime=5.234, speedup=0.8, interpreter=False),
        m.HistoryEntry(turn_idx=2, kernel_code="", eval_result=m.EvalResult(error_kind="no_code"), reward=0.0),
    ]
    text = history_section(history)
    first, second, third = text.index("### Attempt 1"), text.index("### Attempt 2"), text.index("### Attempt 3")
    assert first < second < third
    assert "Compiled: ✗ | Correct: ✗ | Runtime: n/a" in text[first:second]
    assert "Error (compile): CompilationError: at 3:4" in text[first:second]
    assert "Compiled: ✓ | Correct: ✓ | Runtime: 5.234 ms | Speedup: 0.80x" in text[second:third]
    assert f"```python\n{KERNEL.rstrip()}\n```" in text[first:second]
    assert "held no ```python block" in text[third:]
    assert text.rstrip().endswith("Answer with the complete improved module in one ```python block.")
    assert text.index("Fix the errors first") > third
    _, user = turn_messages(REFERENCE, history)
    assert user.content.index("reference program") < user.content.index("### Attempt 1")


def test_an_interpreter_timing_is_marked_as_not_a_real_speedup() -> None:
    text = history_section([attempt(0, compiled=True, correctness=True, runtime=13.2, speedup=0.006, interpreter=True)])
    assert "not a real speedup" in text


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ("Here:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
        ("```python\na = 1\n```\ntext\n```python\nb = 2\n```\n", "b = 2\n"),  # the last block
        ("```Python\nc = 3\n```", "c = 3\n"),
        ("```py\nd = 4\n```", "d = 4\n"),
        ("```\ne = 5\n```", "e = 5\n"),  # no language tag
        ("```python\nf = 6\n```\nand a shell line:\n```bash\nls\n```", "f = 6\n"),  # other languages never count
        ("```\ng = 7\n```\n```python\nh = 8\n```\n```\ni = 9\n```", "h = 8\n"),  # a tagged block wins
        ("Sure.\n```python\nimport triton\n\ndef k():\n    pass", "import triton\n\ndef k():\n    pass\n"),  # unclosed
        ("~~~python\nj = 10\n~~~", "j = 10\n"),
        ("````python\nk = '```'\n````", "k = '```'\n"),  # a longer fence holds a shorter one
        ("I would write:\nimport torch\nclass ModelNew:\n    pass\n", "import torch\nclass ModelNew:\n    pass\n"),  # no fence
    ],
)
def test_extract_code_takes_the_last_python_block(answer: str, code: str) -> None:
    assert extract_code(answer) == code


@pytest.mark.parametrize("answer", ["", "I cannot help with that.", "```bash\nls\n```", "```python\n\n```"])
def test_an_answer_without_code_gives_none(answer: str) -> None:
    assert extract_code(answer) is None


def test_scores_returns_and_termination_by_hand() -> None:
    config = RewardConfig()
    assert discounted_returns([0.1, 0.4, 1.5], 0.4) == pytest.approx([0.1 + 0.4 * 0.4 + 0.16 * 1.5, 0.4 + 0.4 * 1.5, 1.5])
    assert discounted_returns([0.1, 0.4, 1.5], 0.4)[0] == pytest.approx(0.5)  # R_0 = aggregated_return
    correct_fast = m.EvalResult(compiled=True, correctness=True, speedup=2.5)
    assert result_score(correct_fast, config) == pytest.approx(0.1 + 0.3 + 1.5)
    assert result_score(m.EvalResult(compiled=True, correctness=True, speedup=9.0), config) == pytest.approx(0.4 + 2.0)
    interpreted = m.EvalResult(compiled=True, correctness=True, speedup=3.0, interpreter=True)
    assert result_score(interpreted, config) == pytest.approx(0.4)  # no speedup reward for interpreter timings
    assert result_score(interpreted, RewardConfig(reward_interpreter_speedup=True)) == pytest.approx(2.4)
    assert termination_reason([0.1, 1.9], config) == TerminationReason.SUCCESS
    assert termination_reason([0.0, 0.0], config) == TerminationReason.ALL_FAILED
    assert termination_reason([0.0], config) is None
    assert termination_reason([0.1, 0.4, 0.4], config) == TerminationReason.MAX_TURNS
    assert termination_reason([0.1], RewardConfig(max_turns=1)) == TerminationReason.MAX_TURNS
