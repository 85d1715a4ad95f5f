"""``kernelrl check``: the verdict from the command line, tolerance presets, and clear errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kernelrl.core.problems import builtin_problems

from helpers import kernelrl_cmd

RELU = builtin_problems().get("level1/1_ReLU")
# ReLU off by 5e-3 for negative inputs: inside the old 1e-2 tolerance, far outside KernelBench's fp32 1e-4
OFF_BY_5E_3 = (RELU.solution or "").replace("tl.maximum(x, 0.0)", "tl.maximum(x, 0.005)")


def check(tmp_path: Path, candidate: str, *args: str) -> subprocess.CompletedProcess[str]:
    problem, solution = tmp_path / "problem.py", tmp_path / "candidate.py"
    problem.write_text(RELU.source)
    solution.write_text(candidate)
    return subprocess.run(kernelrl_cmd("check", str(problem), str(solution), *args), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_check_on_cuda_without_cuda_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = check(tmp_path, RELU.solution or "", "--device", "cuda:0")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda:0" in lines[0] and "no CUDA device" in lines[0]


def test_an_unknown_tolerance_preset_is_named_in_the_error(tmp_path: Path) -> None:
    done = check(tmp_path, RELU.solution or "", "--tolerance", "loose")
    assert done.returncode == 2 and "'loose'" in done.stderr and "legacy" in done.stderr


def test_default_tolerance_rejects_an_error_of_5e_3_and_the_legacy_preset_accepts_it(tmp_path: Path) -> None:
    strict = check(tmp_path, OFF_BY_5E_3, "--json")
    assert strict.returncode == 1 and '"error_kind":"mismatch"' in strict.stdout and '"correctness":false' in strict.stdout
    legacy = check(tmp_path, OFF_BY_5E_3, "--tolerance", "legacy")
    assert legacy.returncode == 0, legacy.stdout + legacy.stderr
    assert "atol 0.01" in legacy.stdout
