"""The learner data-parallel: two gloo ranks under torchrun take the single-process step on the same batch.

Run as a script by torchrun (``__main__`` below), this file is the two-rank learner: rank 0 drives, rank 1 follows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from kernelrl.actors.learn_dist import DistributedTrainer, follow, init_distributed, share
from kernelrl.actors.learn_objective import TurnSample, token_logprobs, turn_sample
from kernelrl.actors.learn_trainer import PolicyTrainer, pack
from kernelrl.core.config import LearnerSettings

from tiny_model import tiny_model_dir

SETTINGS = LearnerSettings(learning_rate=1e-3, adam_eps=1e-4, max_tokens_per_gpu=40, gradient_checkpointing=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def make_batch(model: torch.nn.Module, n: int = 5) -> list[TurnSample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        prompt = torch.randint(0, 49152, (5 + 3 * i,), generator=g).tolist()
        response = torch.randint(0, 49152, (4 + 2 * (i % 3),), generator=g).tolist()
        ids = torch.tensor([[*prompt, *response]])
        with torch.no_grad():
            logps = token_logprobs(model(input_ids=ids, use_cache=False).logits, ids)[0, len(prompt) :].tolist()
        samples.append(turn_sample(prompt, response, logps, advantage=(1.0, -0.5, 0.25)[i % 3]))
    return samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_share_of_each_rank_covers_the_batch_once_balanced_by_tokens() -> None:
    samples = [TurnSample(input_ids=[0] * n, loss_mask=[1] * n, behaviour_logprobs=[0.0] * n, advantage=0.0)
               for n in (10, 9, 8, 3, 2, 1)]  # fmt: skip
    shares = [share(samples, r, 2) for r in range(2)]
    assert sorted(len(s.input_ids) for part in shares for s in part) == [1, 2, 3, 8, 9, 10]
    assert [sum(len(s.input_ids) for s in part) for part in shares] == [16, 17]
    assert share(samples[:1], 1, 2) == []  # a rank may get nothing (it runs zero-weighted micro-batches)


def test_two_gloo_ranks_take_the_single_process_step(tiny_model: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = PolicyTrainer(SETTINGS, tiny_model)
    samples = make_batch(single.model)
    rank_groups = [len(pack(share(samples, r, 2), SETTINGS.max_tokens_per_gpu)) for r in range(2)]
    assert rank_groups[0] != rank_groups[1]  # one rank runs a dummy micro-batch to keep the collectives in step
    (tmp_path / "batch.json").write_bytes(msgspec.json.encode(samples))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, str(tiny_model),
            str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for step in (1, 2):
        expected = single.train_step(samples)
        assert report["stats"][step - 1]["tokens"] == expected.tokens
        assert report["stats"][step - 1]["loss"] == pytest.approx(expected.loss, abs=1e-6)
        assert report["stats"][step - 1]["grad_norm"] == pytest.approx(expected.grad_norm, rel=1e-5)
        got = load_file(tmp_path / f"v{step}" / "model.safetensors")
        want = {name: p.detach() for name, p in single.model.state_dict().items() if name in got}
        assert got.keys() == want.keys()
        worst = max(float((got[k] - want[k]).abs().max()) for k in got)
        assert worst <= 1e-5, (step, worst)
    assert report["meta"] == {"consumed": [1]} and report["step_after_load"] == 1 and report["step"] == 2


def _run_ranks(model_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    assert info is not None and info.world_size == 2
    trainer = DistributedTrainer(PolicyTrainer(SETTINGS, model_dir, dist=info))
    if not trainer.is_lead:
        follow(trainer)
        return
    samples = msgspec.json.decode((out / "batch.json").read_bytes(), type=list[TurnSample])
    stats = [msgspec.to_builtins(trainer.train_step(samples))]
    trainer.save_policy(out / "v1")
    trainer.save_checkpoint(out / "ckpt", {"consumed": [1]})
    stats.append(msgspec.to_builtins(trainer.train_step(samples)))
    trainer.save_policy(out / "v2")
    meta = trainer.load_checkpoint(out / "ckpt")  # every rank back to step 1
    step_after_load = trainer.step
    trainer.train_step(samples)
    trainer.close()
    report = {"stats": stats, "meta": meta, "step": trainer.step, "step_after_load": step_after_load}
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _run_ranks(Path(sys.argv[1]), Path(sys.argv[2]))
