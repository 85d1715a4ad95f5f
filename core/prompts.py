"""What the policy reads: the system prompt, the first-turn prompt, and from turn 2 on the history of its
earlier attempts with the evaluator's verdicts. Pure functions of the problem and the history."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kernelrl.core import messages as m

ALLOWED_IMPORTS = "torch, torch.nn, torch.nn.functional, triton, triton.language, math"

SYSTEM_PROMPT = f"""You are an expert GPU kernel engineer. You rewrite PyTorch reference programs as fast, correct \
Triton kernels.

The user gives you a PyTorch program that defines `class Model(nn.Module)`, with `get_inputs()` and \
`get_init_inputs()`. Write `class ModelNew(nn.Module)` with the same constructor arguments and the same \
`forward` signature, computing the same outputs, whose `forward` launches one or more `@triton.jit` kernels \
that do the computation.

Rules:
- Allowed imports: {ALLOWED_IMPORTS}. Nothing else.
- Use torch only to allocate outputs (torch.empty, torch.empty_like, ...), for dtypes, shape and device \
queries, and for nn parameter holders (nn.Parameter, nn.Linear weights, ...). Every arithmetic operation on \
tensor data happens inside a Triton kernel; calling torch or nn.functional compute functions is rejected.
- Do not modify the inputs, do not print, and do not read files or the network.
- The outputs are compared with the reference on fresh random inputs (fp32 tolerance 1e-4), then timed.

Answer with exactly one ```python code block holding the complete module (imports, kernels, ModelNew)."""

NO_CODE = "(the answer held no ```python block, so nothing was evaluated)"

FIX_THEN_SPEED = (
    "Fix the errors first: a kernel that is not correct earns nothing for speed. Once it is correct, make it "
    "faster. Answer with the complete improved module in one ```python block."
)


def first_turn_prompt(problem_source: str) -> str:
    return (
        "Here is the PyTorch reference program:\n\n"
        f"```python\n{problem_source.rstrip()}\n```\n\n"
        "Write ModelNew with Triton kernels."
    )


def _mark(flag: bool) -> str:
    return "✓" if flag else "✗"


def _runtime(ms: float) -> str:
    return f"{ms:.3f} ms" if ms >= 0 and math.isfinite(ms) else "n/a"


def attempt_section(entry: m.HistoryEntry) -> str:
    """One earlier attempt: its kernel and what the evaluator said about it."""
    r = entry.eval_result
    status = (
        f"Compiled: {_mark(r.compiled)} | Correct: {_mark(r.correctness)} | Runtime: {_runtime(r.runtime)} | "
        f"Speedup: {r.speedup:.2f}x"
    )
    if r.interpreter and r.correctness:
        status += " (timed on the CPU interpreter: not a real speedup)"
    code = f"```python\n{entry.kernel_code.rstrip()}\n```" if entry.kernel_code.strip() else NO_CODE
    lines = [f"### Attempt {entry.turn_idx + 1}", code, status]
    if r.error_kind or r.error_message:
        lines.append(f"Error ({r.error_kind or 'error'}): {r.error_message.strip()}")
    return "\n".join(lines)


def history_section(history: Sequence[m.HistoryEntry]) -> str:
    """From turn 2 on: every earlier attempt, oldest first, then what to do next."""
    parts = ["Your earlier attempts and their results:", *(attempt_section(e) for e in history), FIX_THEN_SPEED]
    return "\n\n".join(parts)


def turn_messages(problem_source: str, history: Sequence[m.HistoryEntry]) -> list[m.ChatMessage]:
    """The chat for the next turn: the system prompt, the reference program, and the history so far."""
    user = first_turn_prompt(problem_source)
    if history:
        user = f"{user}\n\n{history_section(history)}"
    return [m.ChatMessage("system", SYSTEM_PROMPT), m.ChatMessage("user", user)]
