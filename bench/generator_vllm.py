"""Generated tokens/s through the generator with the ``vllm`` backend, against vLLM's own offline throughput on the
same prompts, in one run on one engine.

The model is the tests' tiny Llama (SmolLM2's tokenizer, 2 layers; it writes nonsense and rarely stops, so every
sample runs to ``max_new_tokens``). Phase 1: a ``GeneratorActor`` in this process, on a real NATS server, with
an evaluator that answers at once, runs ``dialogues`` three-turn dialogues with all of them in hand. Phase 2: the
same prompts (token ids, as the turn events recorded them) and sampling settings go straight to the same
``AsyncLLM`` engine, all at once — vLLM's offline best case. ``ratio_vs_offline`` = phase 1 tokens/s over
phase 2's; target ≥ 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from generator import InstantEvaluator, rollout  # bench/generator.py

from kernelrl.actors.gen_backend import GenerateRequest
from kernelrl.actors.gen_vllm import VLLMBackend, sampling_params
from kernelrl.actors.generator import GeneratorActor
from kernelrl.core import messages as m
from kernelrl.core.actor import run_main
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings, Config, GeneratorSettings, SamplingSettings
from kernelrl.core.consumers import consumer_for, consumer_table
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.problems import builtin_problems
from kernelrl.core.work_loop import WorkLoop

from tiny_model import build_tiny_model


async def offline_tokens_per_s(backend: VLLMBackend, prompts: list[list[int]], sampling: SamplingSettings) -> float:
    from vllm.inputs import TokensPrompt

    engine = backend._engine  # the same engine, driven directly
    assert engine is not None
    params = sampling_params(sampling, 1, sampling.max_new_tokens)

    async def one(prompt: list[int]) -> int:
        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            final = out
        assert final is not None
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return tokens / (time.perf_counter() - t0)


async def measure(dialogues: int, max_new_tokens: int) -> dict[str, float]:
    problem_ids = [p.id for p in builtin_problems().problems[:8]]
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=max_new_tokens, seed=None)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model")
        settings = GeneratorSettings(backend="vllm", model=str(model_dir), concurrency=dialogues, sampling=sampling)
        backend = VLLMBackend(settings)
        await backend.start()
        try:
            warm = [m.ChatMessage("user", "warm up")]  # the engine's first batches are slow on the CPU: not measured
            await offline_tokens_per_s(backend, [backend.prompt_ids(GenerateRequest(messages=warm))] * 4, sampling)
            async with EmbeddedNatsServer(Path(tmp) / "nats") as server:
                bus = await Bus.connect(BusSettings(url=server.url, run="bench-vllm"), name="bench")
                config = Config(bus=bus.settings, generator=settings)
                await bus.provision(consumer_table(config))
                generator = GeneratorActor(bus, config, backend, builtin_problems())
                evaluator = InstantEvaluator()
                eval_loop: WorkLoop[m.EvalRequest] = WorkLoop(bus, consumer_for(config, "evaluator"), config.evaluator.work,
                                                              evaluator, evaluator.answer)  # fmt: skip
                turns: list[m.TurnEvent] = []

                async def on_event(msg: object) -> None:
                    event = bus.decode(msg.subject, msg.data, msg.headers)  # type: ignore[attr-defined]
                    if isinstance(event, m.TurnEvent):
                        turns.append(event)

                sub = await bus.nc.subscribe(bus.subjects.event_turn, cb=on_event)
                await generator.inbox.start()
                stopping = asyncio.Event()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(eval_loop.run(stopping, slots=dialogues))
                    tg.create_task(generator.loop.run(stopping, slots=dialogues))
                    await asyncio.sleep(1.0)
                    t0 = time.perf_counter()
                    await bus.publish_many((bus.subjects.rollout_request, rollout("bench-vllm", i, problem_ids))
                                           for i in range(dialogues))  # fmt: skip
                    while generator.counters["dialogues"] < dialogues:
                        await asyncio.sleep(0.05)
                    wall = time.perf_counter() - t0
                    await asyncio.sleep(0.5)  # the last turn events arrive
                    stopping.set()
                await sub.unsubscribe()
                await generator.inbox.close()
                await bus.close()
            generated = sum(len(t.turn_data.response_token_ids) for t in turns)
            through_generator = generated / wall
            offline = await offline_tokens_per_s(backend, [t.turn_data.prompt_token_ids for t in turns], sampling)
        finally:
            await backend.close()
    return {
        "dialogues": dialogues,
        "turns": len(turns),
        "max_new_tokens": max_new_tokens,
        "generator_tokens_per_s": round(through_generator, 1),
        "offline_tokens_per_s": round(offline, 1),
        "ratio_vs_offline": round(through_generator / offline, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (the engine alone takes ~20 s to start)")
    parser.add_argument("--dialogues", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=0)
    args = parser.parse_args()
    dialogues = args.dialogues or (4 if args.quick else 32)
    figures = run_main(measure(dialogues, args.max_new_tokens or (32 if args.quick else 128)))
    print(f"{figures['turns']} turns: {figures['generator_tokens_per_s']:,.0f} tokens/s through the generator, "
          f"{figures['offline_tokens_per_s']:,.0f} tokens/s offline on the same prompts", file=sys.stderr)  # fmt: skip
    print(json.dumps({"bench": "generator_vllm", **figures, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
