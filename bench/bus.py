"""The typed bus beside raw nats-py doing the same work, in one run against one embedded server.

Three patterns, each run with our layer (msgspec Structs, Krl-Type/Nats-Msg-Id headers, strict decode)
and with raw nats-py (bytes in, bytes out, the same headers):
- jetstream round trip: publish one message, fetch it from a durable pull consumer, ack (p50/p99);
- jetstream throughput: publish N pipelined, then fetch/decode/ack all N (messages/s);
- core request/reply: an EvalRequest answered with an EvalResult (p50/p99, messages/s).
``ratio_vs_raw`` is our time over raw time (1.0 = free); target <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kernelrl.core import messages as m
from kernelrl.core.actor import run_main
from kernelrl.core.bus import MSG_ID_HEADER, TYPE_HEADER, Bus
from kernelrl.core.config import BusSettings
from kernelrl.core.nats_server import EmbeddedNatsServer
from kernelrl.core.subjects import EVALUATORS_CONSUMER

EVAL_SOURCE = "import triton\n" + "# candidate kernel source\n" * 60


def eval_request(i: int, tag: str) -> m.EvalRequest:
    return m.EvalRequest(
        eval_id=f"{tag}-{i}",
        run_id="bench",
        problem_id="level1/19_ReLU",
        candidate_source=EVAL_SOURCE,
        reply_to="krl.bench.eval.result.gen",
        generator_id="gen",
        turn_idx=i % 3,
    )


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


async def js_round_trip(bus: Bus, n: int, typed: bool) -> list[float]:
    durable = EVALUATORS_CONSUMER
    subject = bus.subjects.eval_request
    codec = m.codec_for(m.EvalRequest)
    times = []
    if typed:
        consumer = await bus.pull(bus.subjects.eval_stream, durable)
        for i in range(n):
            t = time.perf_counter()
            await bus.publish(subject, eval_request(i, f"rt{typed}"))
            (d,) = await consumer.fetch(1, 5.0)
            await d.ack()
            times.append(time.perf_counter() - t)
        await consumer.close()
    else:
        psub = await bus.js.pull_subscribe_bind(durable=durable, stream=bus.subjects.eval_stream)
        payloads = [codec.encode(eval_request(i, f"rt{typed}")) for i in range(n)]
        for i in range(n):
            t = time.perf_counter()
            await bus.js.publish(subject, payloads[i], headers={TYPE_HEADER: "EvalRequest", MSG_ID_HEADER: f"rt{typed}-{i}"})
            (msg,) = await psub.fetch(1, timeout=5.0)
            await msg.ack()
            times.append(time.perf_counter() - t)
        await psub.unsubscribe()
    return times


async def js_throughput(bus: Bus, n: int, typed: bool) -> float:
    durable = EVALUATORS_CONSUMER
    subject = bus.subjects.eval_request
    codec = m.codec_for(m.EvalRequest)
    start = time.perf_counter()
    if typed:
        await bus.publish_many((subject, eval_request(i, f"tp{typed}")) for i in range(n))
        consumer = await bus.pull(bus.subjects.eval_stream, durable)
        got = 0
        while got < n:
            for d in await consumer.fetch(256, 1.0):
                await d.ack()
                got += 1
        await consumer.close()
    else:
        futures = []
        for i in range(n):
            payload = codec.encode(eval_request(i, f"tp{typed}"))
            headers = {TYPE_HEADER: "EvalRequest", MSG_ID_HEADER: f"tp{typed}-{i}"}
            futures.append(await bus.js.publish_async(subject, payload, headers=headers))
        for f in futures:
            await f
        psub = await bus.js.pull_subscribe_bind(durable=durable, stream=bus.subjects.eval_stream)
        got = 0
        while got < n:
            for msg in await psub.fetch(256, timeout=1.0):
                await msg.ack()
                got += 1
        await psub.unsubscribe()
    return n / (time.perf_counter() - start)


async def request_reply(bus: Bus, n: int, typed: bool) -> list[float]:
    subject = f"krl.bench.rr.{'typed' if typed else 'raw'}"
    req_codec, res_codec = m.codec_for(m.EvalRequest), m.codec_for(m.EvalResult)
    raw_result = res_codec.encode(m.EvalResult(eval_id="x", compiled=True, correctness=True, speedup=1.2))

    async def typed_handler(msg) -> None:  # type: ignore[no-untyped-def]
        req = bus.decode(bus.subjects.eval_request, msg.data, msg.headers)
        assert isinstance(req, m.EvalRequest)
        result = m.EvalResult(eval_id=req.eval_id, compiled=True, correctness=True, speedup=1.2)
        await bus.nc.publish(msg.reply, res_codec.encode(result), headers={TYPE_HEADER: "EvalResult"})

    async def raw_handler(msg) -> None:  # type: ignore[no-untyped-def]
        await bus.nc.publish(msg.reply, raw_result)

    sub = await bus.nc.subscribe(subject, cb=typed_handler if typed else raw_handler)
    times = []
    payloads = [req_codec.encode(eval_request(i, "rr")) for i in range(n)]
    for i in range(n):
        t = time.perf_counter()
        if typed:
            reply = await bus.nc.request(
                subject, req_codec.encode(eval_request(i, "rr")), timeout=5, headers={TYPE_HEADER: "EvalRequest"}
            )
            res_codec.decode(reply.data)
        else:
            await bus.nc.request(subject, payloads[i], timeout=5)
        times.append(time.perf_counter() - t)
    await sub.unsubscribe()
    return times


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run, under 30 s")
    args = parser.parse_args()
    n_rt = 500 if args.quick else 3000
    n_tp = 5000 if args.quick else 30000
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="krl-bench-bus-") as tmp:
        # nats-server's default sync (2 min): an fsync per write would hide the cost of our layer
        async with EmbeddedNatsServer(Path(tmp), sync_interval="2m") as server:
            for typed in (False, True):  # raw first, then ours: the same warm server for both
                tag = "typed" if typed else "raw"
                bus = await Bus.connect(BusSettings(url=server.url, run=f"bench-{tag}"), name="bench")
                await bus.provision()
                rt = await js_round_trip(bus, n_rt, typed)
                figures[f"js_rt_p50_us_{tag}"] = 1e6 * pct(rt, 0.5)
                figures[f"js_rt_p99_us_{tag}"] = 1e6 * pct(rt, 0.99)
                figures[f"js_msgs_per_s_{tag}"] = await js_throughput(bus, n_tp, typed)
                rr = await request_reply(bus, n_rt, typed)
                figures[f"rr_p50_us_{tag}"] = 1e6 * pct(rr, 0.5)
                figures[f"rr_p99_us_{tag}"] = 1e6 * pct(rr, 0.99)
                figures[f"rr_msgs_per_s_{tag}"] = len(rr) / sum(rr)
                await bus.close()
    ratios = {
        "ratio_js_rt_p50": figures["js_rt_p50_us_typed"] / figures["js_rt_p50_us_raw"],
        "ratio_js_throughput": figures["js_msgs_per_s_raw"] / figures["js_msgs_per_s_typed"],
        "ratio_rr_p50": figures["rr_p50_us_typed"] / figures["rr_p50_us_raw"],
    }
    for k, v in {**figures, **ratios}.items():
        print(f"{k:>24}: {v:,.2f}", file=sys.stderr)
    out = {
        "bench": "bus",
        **{k: round(v, 2) for k, v in figures.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
    }
    out["ratio_vs_raw"] = round(max(ratios.values()), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
