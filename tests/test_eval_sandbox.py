"""The worker sandbox's rules, exercised in a fresh interpreter (an audit hook cannot be removed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from kernelrl.actors.eval_gate import static_gate
from kernelrl.actors.eval_sandbox import worker_environment

PROBE = textwrap.dedent(
    """
    import json, os, pathlib, socket, subprocess, sys, threading
    from kernelrl.actors.eval_sandbox import Sandbox
    job = pathlib.Path(sys.argv[1])
    box = Sandbox([])
    box.install()
    outcome = {}
    def attempt(name, fn):
        try:
            fn()
            outcome[name] = "allowed"
        except PermissionError:
            outcome[name] = "denied"
    with box.enforcing(job):
        attempt("write_job_dir", lambda: (job / "ok.txt").write_text("x"))
        attempt("write_outside", lambda: pathlib.Path(sys.argv[2]).write_text("x"))
        attempt("toolchain_gcc", lambda: subprocess.run(["gcc", "--version"], capture_output=True))
        attempt("other_process", lambda: subprocess.run(["true"]))
        attempt("os_system", lambda: os.system("true"))
        attempt("thread", lambda: threading.Thread(target=print).start())
        attempt("socket", lambda: socket.create_connection(("127.0.0.1", 9), timeout=0.1))
    attempt("outside_when_not_enforcing", lambda: (job / "later.txt").write_text("x"))
    print(json.dumps(outcome))
    """
)


def test_sandbox_allows_the_job_dir_and_the_toolchain_and_denies_the_rest(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    outside = tmp_path / "outside.txt"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(job), str(outside)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    outcome = __import__("json").loads(out.strip().splitlines()[-1])
    assert outcome == {
        "write_job_dir": "allowed",
        "write_outside": "denied",
        "toolchain_gcc": "allowed",
        "other_process": "denied",
        "os_system": "denied",
        "thread": "denied",
        "socket": "denied",
        "outside_when_not_enforcing": "allowed",
    }
    assert not outside.exists()


def test_worker_environment_keeps_no_secrets(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    monkeypatch.setenv("HF_TOKEN", "nope")
    monkeypatch.setenv("KRL_PROBLEM_SCALE", "8")
    env = worker_environment(tmp_path, interpret=True, visible_gpu="3")
    assert "AWS_SECRET_ACCESS_KEY" not in env and "HF_TOKEN" not in env
    assert env["KRL_PROBLEM_SCALE"] == "8" and env["TRITON_INTERPRET"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["HOME"] == str(tmp_path)


def test_gate_accepts_helpers_reachable_from_forward_and_rejects_compute_there() -> None:
    helper_ok = """
import torch, triton, triton.language as tl
import torch.nn as nn

@triton.jit
def k(x_ptr, n, B: tl.constexpr):
    pass

def launch(x):
    k[(1,)](x, x.numel(), B=16)
    return x.view(-1)

class ModelNew(nn.Module):
    def forward(self, x):
        return launch(x)
"""
    assert static_gate(helper_ok) is None
    helper_cheats = helper_ok.replace("return x.view(-1)", "return x.view(-1).softmax(0)")
    rejection = static_gate(helper_cheats)
    assert rejection is not None and rejection.error_kind == "forbidden" and ".softmax()" in rejection.message
