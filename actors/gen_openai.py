"""The ``openai`` backend: the policy behind an OpenAI-compatible server (``vllm serve``, SGLang), through the
async ``openai`` client.

Token ids and log-probs come from vLLM's extensions of the API: ``return_token_ids`` (the prompt's token ids and
each sample's) and ``logprobs`` (the sampled token's log-prob; ``return_tokens_as_token_ids`` makes each log-prob
entry name its token as ``token_id:<id>``, the fallback where a server returns no ``token_ids``). Chat messages go
to ``/chat/completions`` (the server applies the chat template; its prompt ids are recorded); a request with
``prompt_token_ids`` goes to ``/completions`` with the ids as the prompt. The conventions are the other backends':
token ids up to and including the end-of-sequence token, text without special tokens.

The server decides which distribution its log-probs are of: start vLLM with ``--logprobs-mode processed_logprobs``
(else they are the raw model's, before temperature, top-k and top-p) and ``--generation-config vllm`` (else the
model's ``generation_config.json`` adds its defaults, e.g. a repetition penalty, to every request that leaves them
out; this backend sends temperature, top-p, top-k, min-p and the penalties explicitly anyway).

Policy updates: a LoRA adapter is loaded with ``POST /v1/load_lora_adapter`` as ``policy-v<version>`` and named as
the model of every later request (vLLM: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``), the
previous adapter is unloaded. The adapter path is read by the server, on its filesystem: its sha256 is not checked
here. A full-weights update is refused (BackendError): an OpenAI-compatible server has no endpoint for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from kernelrl.actors.gen_backend import BackendError, Completion, GenerateRequest, Generation
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings, SamplingSettings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

TOKEN_ID_PREFIX = "token_id:"


class OpenAIBackend:
    name = "openai"

    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self.policy_version = 0
        self.base_model = settings.openai_model
        self.model = settings.openai_model  # what requests name: the base model, or the loaded adapter
        self._client: AsyncOpenAI | None = None

    async def start(self) -> None:
        import openai

        if not self.settings.openai_url:
            raise BackendError("openai: generator.openai_url is not set (e.g. http://127.0.0.1:8000/v1)")
        self._client = openai.AsyncOpenAI(base_url=self.settings.openai_url, api_key=self.settings.openai_api_key or "EMPTY")
        if not self.base_model:
            try:
                models = [model.id async for model in self._client.models.list()]
            except openai.APIError as exc:
                raise BackendError(f"openai: cannot list the models of {self.settings.openai_url}: {exc}") from exc
            if not models:
                raise BackendError(f"openai: {self.settings.openai_url} serves no model")
            self.base_model = models[0]
        self.model = self.base_model

    async def generate(self, request: GenerateRequest) -> Generation:
        import openai

        if self._client is None:
            raise BackendError("openai: generate before start")
        sampling = request.sampling
        greedy = sampling.temperature <= 0  # vLLM refuses n > 1 when greedy: one sample, repeated
        common: dict[str, Any] = {
            "model": self.model,
            "n": 1 if greedy else request.n,
            "temperature": max(sampling.temperature, 0.0),
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
            "extra_body": extra_body(sampling),
        }
        try:
            if request.prompt_token_ids is not None:
                prompt = list(request.prompt_token_ids)
                response = await self._client.completions.create(prompt=prompt, logprobs=0, **common)
                completions = [text_choice(choice) for choice in sorted(response.choices, key=lambda c: c.index)]
            else:
                messages: Any = [msgspec.structs.asdict(message) for message in request.messages]
                response = await self._client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=0, **common)
                prompt = extra(response, "prompt_token_ids")
                if prompt is None:
                    raise BackendError("openai: the server returned no prompt_token_ids (is it vLLM, with return_token_ids?)")
                completions = [chat_choice(choice) for choice in sorted(response.choices, key=lambda c: c.index)]
        except openai.APIError as exc:
            raise BackendError(f"openai: {self.settings.openai_url} failed the request for {self.model}: {exc}") from exc
        if greedy:
            completions *= request.n
        return Generation(prompt_token_ids=list(prompt), completions=completions, policy_version=self.policy_version)

    async def apply_update(self, update: m.PolicyUpdate) -> None:
        import openai

        if self._client is None:
            raise BackendError("openai: apply_update before start")
        if not update.is_lora:
            raise BackendError(
                f"openai: policy update {update.version} is a full model ({update.path}): an OpenAI-compatible server "
                "cannot load new weights; train LoRA adapters, or use the vllm backend"
            )
        name = f"policy-v{update.version}"
        try:
            await self._client.post(
                "/load_lora_adapter", cast_to=str, body={"lora_name": name, "lora_path": update.path, "load_inplace": True}
            )
        except openai.NotFoundError as exc:
            if no_route(exc):
                raise BackendError(
                    f"openai: {self.settings.openai_url} has no /load_lora_adapter endpoint (vLLM: start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)"
                ) from exc
            raise BackendError(f"openai: cannot load the LoRA adapter {update.path}: {exc}") from exc  # vLLM: no adapter there
        except openai.APIError as exc:
            raise BackendError(f"openai: cannot load the LoRA adapter {update.path}: {exc}") from exc
        old, self.model = self.model, name
        self.policy_version = update.version
        if old not in (self.base_model, name):
            try:
                await self._client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": old})
            except openai.APIError:
                pass  # the old adapter only takes a slot: the server evicts it when it needs the room

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def extra_body(sampling: SamplingSettings) -> dict[str, Any]:
    """vLLM's (and SGLang's) sampling fields beyond OpenAI's, set to "off" unless configured."""
    return {
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }


def no_route(exc: Any) -> bool:
    """A 404 for the path itself (FastAPI's ``{"detail": "Not Found"}``), not vLLM's 404 for an adapter path."""
    body = exc.body
    return not isinstance(body, dict) or body.get("detail") == "Not Found"


def extra(obj: Any, field: str) -> Any:
    """A field the openai types do not declare (vLLM's extensions), or None."""
    value = getattr(obj, field, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(field)
    return value


def token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise BackendError(f"openai: a log-prob entry names its token {token!r}, not {TOKEN_ID_PREFIX}<id>")
    return int(token.removeprefix(TOKEN_ID_PREFIX))


def chat_choice(choice: Any) -> Completion:
    entries = choice.logprobs.content if choice.logprobs is not None and choice.logprobs.content is not None else None
    if entries is None:
        raise BackendError("openai: the server returned no log-probs")
    return make_completion(
        text=choice.message.content or "",
        ids=extra(choice, "token_ids"),
        tokens=[entry.token for entry in entries],
        logprobs=[entry.logprob for entry in entries],
        finish_reason=choice.finish_reason,
    )


def text_choice(choice: Any) -> Completion:
    lps = choice.logprobs
    if lps is None or lps.token_logprobs is None or lps.tokens is None:
        raise BackendError("openai: the server returned no log-probs")
    return make_completion(
        text=choice.text,
        ids=extra(choice, "token_ids"),
        tokens=lps.tokens,
        logprobs=lps.token_logprobs,
        finish_reason=choice.finish_reason,
    )


def make_completion(
    *, text: str, ids: list[int] | None, tokens: list[str], logprobs: list[float | None], finish_reason: Any
) -> Completion:
    named = [token_id(token) for token in tokens]
    if ids is None:
        ids = named
    elif list(ids) != named:
        raise BackendError(f"openai: the server's token_ids {list(ids)} and log-prob tokens {named} disagree")
    if any(lp is None for lp in logprobs):
        raise BackendError("openai: the server returned a token without a log-prob")
    return Completion(
        text=text,
        token_ids=list(ids),
        logprobs=[float(lp) for lp in logprobs if lp is not None],
        finish_reason=str(finish_reason or ""),
    )
