"""Problem sets in the KernelBench layout: ``<root>/level<N>/<id>_<Name>.py``.

A problem's id is ``level<N>/<id>_<Name>`` (e.g. ``level1/19_ReLU``); its source is the reference
program, which defines ``Model``, ``get_inputs()`` and ``get_init_inputs()``. A ``.triton.py`` file beside
a problem is its reference solution, never a problem.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from kernelrl.problems import BUILTIN_ROOT

_PROBLEM_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.py$")
_LEVEL_DIR = re.compile(r"^level(\d+)$")


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    level: int
    number: int
    name: str
    source: str
    path: str
    solution: str | None = None


class ProblemSet(msgspec.Struct, frozen=True):
    root: str
    problems: list[Problem]

    def get(self, problem_id: str) -> Problem:
        for p in self.problems:
            if p.id == problem_id:
                return p
        raise KeyError(f"no problem {problem_id!r} under {self.root} ({len(self.problems)} problems)")


def load_problem_set(root: Path | str) -> ProblemSet:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"problem set {root} is not a directory")
    problems = []
    for level_dir in root.iterdir():
        level_match = _LEVEL_DIR.match(level_dir.name)
        if not (level_dir.is_dir() and level_match):
            continue
        for path in level_dir.iterdir():
            match = _PROBLEM_FILE.match(path.name)
            if not match:
                continue
            solution = path.with_name(path.stem + ".triton.py")
            problems.append(
                Problem(
                    id=f"{level_dir.name}/{path.stem}",
                    level=int(level_match.group(1)),
                    number=int(match.group(1)),
                    name=match.group(2),
                    source=path.read_text(),
                    path=str(path),
                    solution=solution.read_text() if solution.exists() else None,
                )
            )
    if not problems:
        raise FileNotFoundError(f"no level<N>/<id>_<Name>.py problems under {root}")
    problems.sort(key=lambda p: (p.level, p.number))
    return ProblemSet(root=str(root), problems=problems)


def builtin_problems() -> ProblemSet:
    return load_problem_set(BUILTIN_ROOT)


def problem_set(directory: str) -> ProblemSet:
    """The problem set a setting names: a KernelBench-style directory, or "" for the built-in set."""
    return load_problem_set(Path(directory).expanduser()) if directory else builtin_problems()
