"""The kernel in a model's answer: the last fenced python block, read the way models actually write them.

Tolerated: prose around the block, a missing or different-case language tag (```Python, ```py, ``` alone),
a last block whose closing fence never came (the answer hit its token limit), ``~~~`` fences, and an answer
with no fence at all that is plainly a module (it starts its code with an import, a decorator or a class).
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[\w+.-]*)[^\n]*$", re.MULTILINE)
_PYTHON_TAGS = frozenset({"python", "python3", "py", "py3"})
_CODE_START = re.compile(r"^(?:import |from \S+ import |@triton|class |def )", re.MULTILINE)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(tag, body)`` of every fenced block in order; an unclosed last block runs to the end of the text."""
    blocks: list[tuple[str, str]] = []
    pos = 0
    while (opening := _FENCE.search(text, pos)) is not None:
        fence = opening["fence"]
        body_start = opening.end() + 1
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE).search(text, body_start)
        if closing is None:
            blocks.append((opening["tag"].lower(), text[body_start:]))
            break
        blocks.append((opening["tag"].lower(), text[body_start : closing.start()]))
        pos = closing.end()
    return blocks


def extract_code(text: str) -> str | None:
    """The last python block (a tagged one wins over an untagged one; other languages never count); None if
    the answer holds no code."""
    blocks = fenced_blocks(text)
    tagged = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    for body in (tagged or untagged)[::-1]:
        if body.strip():
            return body.strip("\n") + "\n"
    if blocks:
        return None
    start = _CODE_START.search(text)
    if start is None:
        return None
    return text[start.start() :].strip("\n") + "\n"
