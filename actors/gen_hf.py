"""The ``hf`` backend: the policy run with transformers' ``generate``, on the CPU or one GPU.

Conventions (the learner trains on them as they are):

- the prompt is ``request.prompt_token_ids`` when given, else the chat template of the messages with the
  generation prompt added;
- a sample's token ids are the tokens the model produced, up to and *including* the end-of-sequence token when it
  emitted one (``finish_reason`` "stop"; "length" when ``max_new_tokens`` ran out first): the learner's loss covers
  every token the model chose, the EOS one too. The text is their decoding without special tokens;
- a token's log-prob is under the distribution it was sampled from: the logits after temperature, top-k and top-p
  (``generate``'s processed ``scores``), log-softmaxed. Greedy (temperature 0) records the plain log-softmax of the
  logits (temperature 1). Nothing else shapes the distribution: the model's ``generation_config.json`` sampling
  defaults (top_k=50, repetition penalty ...) are ignored; only its special token ids are kept.

Updates: a LoRA adapter directory (peft) replaces any adapter loaded before, on the base weights; a full model
directory replaces the weights (and drops any adapter). ``update.sha256``, when not empty, must equal
``weights_sha256`` of the directory (sha256 of its ``*.safetensors`` bytes in name order). One lock orders
generation and updates: an update waits for the generation under way, and is never applied in the middle of one.

``generate`` keeps every step's processed scores (steps x n x vocab floats) until it returns: fine for the small
models this backend is for, the reason the vLLM backend exists for large ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from kernelrl.actors.gen_backend import BackendError, Completion, GenerateRequest, Generation
from kernelrl.actors.gen_models import pick_device, pick_dtype, resolve_model_dir, weights_sha256
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class HFBackend:
    name = "hf"

    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self.policy_version = 0
        self.device = pick_device(settings)
        self.dtype = pick_dtype(settings, self.device)
        self.model_dir: Path | None = None
        self._base: PreTrainedModel | None = None  # the weights, without any adapter
        self._model: Any = None  # what generates: the base model, or a peft model wrapping it
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._eos: frozenset[int] = frozenset()
        self._adapters = 0  # LoRA adapters loaded so far (each gets a new name)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            self.model_dir = await asyncio.to_thread(resolve_model_dir, self.settings)
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer, self.model_dir)
            self._base = self._model = await asyncio.to_thread(self._load_model, self.model_dir)

    def _load_tokenizer(self, path: Path) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"hf: cannot load the tokenizer in {path}: {exc}") from exc

    def _load_model(self, path: Path) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM, GenerationConfig

        assert self._tokenizer is not None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"hf: cannot load the model in {path}: {exc}") from exc
        model.to(self.device).eval()
        loaded = model.generation_config
        eos = loaded.eos_token_id if loaded.eos_token_id is not None else self._tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos_ids:
            raise BackendError(f"hf: {path} names no end-of-sequence token")
        pad = loaded.pad_token_id if loaded.pad_token_id is not None else self._tokenizer.pad_token_id
        # only the special tokens: every sampling parameter comes from the request
        model.generation_config = GenerationConfig(
            bos_token_id=loaded.bos_token_id, eos_token_id=eos_ids, pad_token_id=pad if pad is not None else eos_ids[0]
        )
        self._eos = frozenset(eos_ids)
        return model

    async def generate(self, request: GenerateRequest) -> Generation:
        if self._model is None:
            raise BackendError("hf: generate before start")
        async with self._lock:
            return await asyncio.to_thread(self._generate, request)

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        assert self._tokenizer is not None
        messages = [msgspec.structs.asdict(message) for message in request.messages]
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def _generate(self, request: GenerateRequest) -> Generation:
        assert self._tokenizer is not None
        prompt = self.prompt_ids(request)
        sampling = request.sampling
        input_ids = torch.tensor([prompt] * request.n, device=self.device)  # n samples: a batch (greedy refuses n > 1)
        with torch.inference_mode(), _seeded(sampling.seed, self.device):
            out = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=sampling.max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
                **_sampling_kwargs(sampling),
            )
        sampled = out.sequences[:, len(prompt) :]
        # step by step (not transformers' compute_transition_scores, which stacks and copies every step's scores),
        # in float32 whatever the model's dtype
        logprobs = [step.float().log_softmax(-1).gather(-1, sampled[:, i, None]) for i, step in enumerate(out.scores)]
        completions = []
        for ids, lps in zip(sampled.tolist(), torch.cat(logprobs, dim=1).tolist(), strict=True):
            end = next((i + 1 for i, token in enumerate(ids) if token in self._eos), None)
            ids, lps = ids[:end], lps[:end]
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(
                Completion(text=text, token_ids=ids, logprobs=lps, finish_reason="length" if end is None else "stop")
            )
        return Generation(prompt_token_ids=prompt, completions=completions, policy_version=self.policy_version)

    async def apply_update(self, update: m.PolicyUpdate) -> None:
        if self._base is None:
            raise BackendError("hf: apply_update before start")
        async with self._lock:
            await asyncio.to_thread(self._apply, update)
            self.policy_version = update.version

    def _apply(self, update: m.PolicyUpdate) -> None:
        path = Path(update.path)
        if not path.is_dir():
            raise BackendError(f"hf: policy update {update.version}: {path} is not a directory")
        if update.sha256:
            digest = weights_sha256(path)
            if digest != update.sha256:
                raise BackendError(
                    f"hf: policy update {update.version}: sha256 mismatch for {path}/*.safetensors: "
                    f"the update says {update.sha256}, the files hash to {digest}"
                )
        if update.is_lora:
            self._apply_lora(path)
        else:
            self._base = self._model = self._load_model(path)  # the tokenizer stays: a run's policy keeps its vocabulary

    def _apply_lora(self, path: Path) -> None:
        """Load the adapter beside the one in use, then switch and drop the old: an adapter that fails to load
        leaves the policy as it was."""
        from peft import PeftModel

        self._adapters += 1
        name = f"policy{self._adapters}"
        try:
            if self._model is self._base:
                self._model = PeftModel.from_pretrained(self._base, path, adapter_name=name, is_trainable=False)
            else:
                previous = self._model.active_adapter
                self._model.load_adapter(path, adapter_name=name, is_trainable=False)
                self._model.set_adapter(name)
                self._model.delete_adapter(previous)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"hf: cannot load the LoRA adapter in {path}: {exc}") from exc
        self._model.to(self.device).eval()

    async def close(self) -> None:
        async with self._lock:
            self._model = self._base = self._tokenizer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _sampling_kwargs(sampling: SamplingSettings) -> dict[str, Any]:
    """``generate``'s arguments for exactly the configured distribution (its top_k default of 50 turned off)."""
    if sampling.temperature <= 0:
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_k": max(sampling.top_k, 0),  # 0: off (left out, generate would apply top_k=50)
        "top_p": sampling.top_p,
    }


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """``seed``: sample from a generator seeded with it, leaving the process's own random state as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
