"""Logger throughput and latency, beside the seeds' one-JSON-file-per-record approach, in one run.

Figures:
- end_to_end_records_per_s: ~5 KB turn records from the first publish until the logger (a child
  process, as deployed) has written, fsynced and acked the last one;
- write_stage_us_per_record: decode + dedup + append in the logger's write stage, in process;
- p99_publish_to_disk_ms: at a steady 1,000 events/s, publish until the record is in turns.jsonl;
- seed_records_per_s: ``json.dump(record, f, indent=2)`` into one new file per record, no fsync;
- ratio_vs_seed = end_to_end_records_per_s / seed_records_per_s.
The throughput figures use nats-server's default file-store sync (every 2 min);
records_per_s_nats_sync_always repeats the end-to-end run on kernelrl's embedded default, and
records_per_s_cluster_r3 on a three-node cluster (loopback) with every stream replicated three times
(ratio_cluster_r3_vs_single_node: the price of replication, same records, same run).
Targets: >= 20,000 records/s end to end, ratio >= 1.5, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from nats.aio.msg import Msg

from kernelrl.actors.logger import RunLogFiles
from kernelrl.actors.sample_events import sample_run
from kernelrl.core import messages as m
from kernelrl.core import subjects as s
from kernelrl.core.actor import run_main
from kernelrl.core.bus import Bus, Delivery
from kernelrl.core.config import BusSettings, LoggerSettings, SampleSettings
from kernelrl.core.nats_server import EmbeddedNatsServer, local_cluster


def realistic_turns(run_id: str, n: int) -> list[m.TurnEvent]:
    """n distinct turn records of about 5 KB, taken from the sample stream's dialogues."""
    pool = [msg for _, msg in sample_run(run_id, SampleSettings(steps=2, groups=4, samples=4)) if isinstance(msg, m.TurnEvent)]
    return [
        m.TurnEvent(**{f: getattr(t, f) for f in t.__struct_fields__ if f != "event_id"}, event_id=f"bench-{i}")
        for i, t in ((i, pool[i % len(pool)]) for i in range(n))
    ]


def seed_write(records: list[dict[str, object]], out_dir: Path) -> float:
    """The seeds' approach: one json.dump(indent=2) file per record. Returns records/s."""
    start = time.perf_counter()
    for rec in records:
        instance = str(rec["instance_id"]).replace("/", "_")
        name = f"turn_{instance}_t{rec['turn_idx']}_{rec['timestamp']}_{rec['event_id']}.json"
        with open(out_dir / name, "w") as f:
            json.dump(rec, f, indent=2)
    return len(records) / (time.perf_counter() - start)


def write_stage(turns: list[m.TurnEvent], log_dir: Path, run_id: str) -> float:
    """µs per record through the logger's write stage (decode, dedup, one append), fsync at the end."""
    codec = m.codec_for(m.TurnEvent)
    subject = s.RunSubjects(run_id).event_turn
    raws = [Msg(_client=None, subject=subject, data=codec.encode(t)) for t in turns]  # type: ignore[arg-type]
    files = RunLogFiles(log_dir, LoggerSettings(log_dir=str(log_dir)))
    start = time.perf_counter()
    for raw in raws:
        files.write(Delivery(codec.decode(raw.data), raw))
    files.fsync()
    elapsed = time.perf_counter() - start
    files.close()
    return 1e6 * elapsed / len(raws)


def start_logger(url: str, run_id: str, log_dir: Path, replicas: int = 1) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kernelrl.bin.cli", "logger", "--nats", url, "--run", run_id, "--log-dir", str(log_dir),
         "--log-level", "WARNING", "--replicas", str(replicas)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


async def wait_all_acked(bus: Bus, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = await bus.js.consumer_info(bus.subjects.event_stream, s.LOGGER_CONSUMER)
            if info.ack_floor.stream_seq >= n and info.num_ack_pending == 0:
                return
        except Exception:  # the consumer may not exist until the logger starts
            pass
        await asyncio.sleep(0.02)
    raise TimeoutError("logger did not finish")


async def end_to_end(url: str, turns: list[m.TurnEvent], log_dir: Path, replicas: int = 1) -> float:
    run_id = "e2e"
    bus = await Bus.connect(BusSettings(url=url, run=run_id, replicas=replicas), name="bench")
    await bus.provision()
    logger = start_logger(url, run_id, log_dir, replicas)
    await asyncio.sleep(1.5)  # logger up and its consumer created
    start = time.perf_counter()
    await bus.publish_many(((bus.subjects.event_turn, t) for t in turns), window=512)
    await wait_all_acked(bus, len(turns))
    elapsed = time.perf_counter() - start
    logger.terminate()
    logger.wait(timeout=30)
    await bus.close()
    lines = (log_dir / "turns.jsonl").read_bytes().count(b"\n")
    assert lines == len(turns), f"{lines} records on disk, {len(turns)} published"
    return len(turns) / elapsed


async def steady_latency(url: str, turns: list[m.TurnEvent], log_dir: Path, rate: float) -> list[float]:
    run_id = "latency"
    bus = await Bus.connect(BusSettings(url=url, run=run_id), name="bench")
    await bus.provision()
    logger = start_logger(url, run_id, log_dir)
    await asyncio.sleep(1.5)
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    path = log_dir / "turns.jsonl"

    async def tail() -> None:
        offset, partial = 0, b""
        while len(seen) < len(turns):
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                now = time.perf_counter()
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    seen[orjson.loads(line)["event_id"]] = now
            await asyncio.sleep(0.0005)

    async def publish() -> None:
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i, t in enumerate(turns):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[t.event_id] = time.perf_counter()
                tg.create_task(bus.publish(bus.subjects.event_turn, t))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(tail())
        tg.create_task(publish())
    logger.terminate()
    logger.wait(timeout=30)
    await bus.close()
    return sorted(1000 * (seen[k] - sent[k]) for k in sent)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run, under 30 s")
    parser.add_argument("--records", type=int, default=0)
    args = parser.parse_args()
    n = args.records or (20_000 if args.quick else 100_000)
    latency_n = 2_000 if args.quick else 10_000
    turns = realistic_turns("bench", n)
    avg_bytes = statistics.mean(len(m.codec_for(m.TurnEvent).encode(t)) for t in turns[:500])
    with tempfile.TemporaryDirectory(prefix="krl-bench-") as tmp:
        root = Path(tmp)
        seed_dir = root / "seed"
        seed_dir.mkdir()
        seed_n = min(n, 20_000)
        records = [orjson.loads(m.codec_for(m.TurnEvent).encode(t)) for t in turns[:seed_n]]
        seed_rate = seed_write(records, seed_dir)
        write_us = write_stage(turns, root / "stage", "bench")
        # nats-server's own default (fsync every 2 min) for the throughput targets ...
        async with EmbeddedNatsServer(root / "nats", sync_interval="2m") as server:
            e2e_rate = await end_to_end(server.url, turns, root / "e2e")
            latencies = await steady_latency(server.url, turns[:latency_n], root / "lat", rate=1000.0)
        # ... and kernelrl's embedded default, which fsyncs every JetStream write before acking it
        async with EmbeddedNatsServer(root / "nats-always", sync_interval="always") as server:
            always_rate = await end_to_end(server.url, turns[: n // 4], root / "e2e-always")
        # ... and a three-node cluster with every stream replicated three times, the same records
        nodes = await local_cluster(root / "cluster", 3, "bench")
        try:
            cluster_rate = await end_to_end(",".join(node.url for node in nodes), turns[: n // 4], root / "e2e-r3", replicas=3)
        finally:
            for node in nodes:
                await node.stop()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"records={n} avg_record_bytes={avg_bytes:.0f}\n"
        f"end-to-end (publish -> fsynced+acked): {e2e_rate:,.0f} records/s\n"
        f"end-to-end with nats sync_interval=always: {always_rate:,.0f} records/s\n"
        f"end-to-end on a 3-node cluster, replicas 3 (sync always): {cluster_rate:,.0f} records/s\n"
        f"write stage: {write_us:.1f} us/record\n"
        f"steady 1000/s publish->disk: p50 {p50:.1f} ms  p99 {p99:.1f} ms\n"
        f"seed json.dump(indent=2) per file: {seed_rate:,.0f} records/s\n",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "bench": "logger",
                "records": n,
                "avg_record_bytes": round(avg_bytes),
                "records_per_s": round(e2e_rate),
                "records_per_s_nats_sync_always": round(always_rate),
                "records_per_s_cluster_r3": round(cluster_rate),
                "ratio_cluster_r3_vs_single_node": round(cluster_rate / always_rate, 2),
                "write_stage_us_per_record": round(write_us, 2),
                "p50_publish_to_disk_ms": round(p50, 2),
                "p99_publish_to_disk_ms": round(p99, 2),
                "seed_records_per_s": round(seed_rate),
                "ratio_vs_seed": round(e2e_rate / seed_rate, 2),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    run_main(main())
