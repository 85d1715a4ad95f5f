"""The generator's model, behind one small async interface: sample, and take a policy update.

A backend turns a ``GenerateRequest`` (chat messages, or prompt token ids as they are) into a
``Generation``: the exact prompt token ids the model saw and, per sample, the response text, the sampled
token ids and the log-prob of each under the distribution that sampled it (after temperature, top-k and
top-p). Training uses these ids and log-probs as they are: text is never re-tokenised.

Backends: ``vllm`` (``actors/gen_vllm.py``), ``openai`` (``actors/gen_openai.py``), ``hf``
(``actors/gen_hf.py``), ``replay`` (``actors/gen_replay.py``).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from kernelrl.core import messages as m
from kernelrl.core.config import BACKENDS, GeneratorSettings, SamplingSettings


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    messages: list[m.ChatMessage]
    # Given, these are the prompt exactly (a continuation); else the chat template of ``messages``.
    prompt_token_ids: list[int] | None = None
    n: int = 1
    sampling: SamplingSettings = msgspec.field(default_factory=SamplingSettings)
    # What the dialogue is at (the replay backend matches on these; model backends ignore them).
    problem_id: str = ""
    turn_idx: int = 0
    sample_idx: int = 0


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token id: log p(token) under the sampling distribution
    finish_reason: str = ""  # "stop", "length"


class Generation(msgspec.Struct, frozen=True, kw_only=True):
    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int


class BackendError(RuntimeError):
    """A backend that cannot do what was asked (no LoRA endpoint, a model that will not load); says why."""


class Backend(Protocol):
    name: str
    # The policy version of the weights now loaded (0: the initial model).
    policy_version: int

    async def start(self) -> None: ...

    async def generate(self, request: GenerateRequest) -> Generation: ...

    async def apply_update(self, update: m.PolicyUpdate) -> None:
        """Load the weights ``update`` names (a LoRA adapter or a full model directory); afterwards
        ``policy_version == update.version``. Called between dialogues' turns, never during a generate."""
        ...

    async def close(self) -> None: ...


def make_backend(settings: GeneratorSettings) -> Backend:
    """The configured backend (its heavy imports happen here, not at module import)."""
    match settings.backend:
        case "replay":
            from kernelrl.actors.gen_replay import ReplayBackend

            return ReplayBackend(settings)
        case "hf":
            from kernelrl.actors.gen_hf import HFBackend

            return HFBackend(settings)
        case "vllm":
            from kernelrl.actors.gen_vllm import VLLMBackend

            return VLLMBackend(settings)
        case "openai":
            from kernelrl.actors.gen_openai import OpenAIBackend

            return OpenAIBackend(settings)
    raise BackendError(f"generator.backend {settings.backend!r}: choose from {', '.join(BACKENDS)}")
