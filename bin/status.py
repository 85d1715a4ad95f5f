"""``kernelrl status``: the live actors of a run, from the heartbeat bucket."""

from __future__ import annotations

import argparse
import sys
import time

import msgspec
import nats.js.errors

from kernelrl.bin.common import add_config_arguments, command_main, connect_tool
from kernelrl.core import messages as m
from kernelrl.core.actor import decode_heartbeat
from kernelrl.core.subjects import RunSubjects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per actor")


async def read_heartbeats(url: str, run: str, timeout_s: float = 5.0) -> list[m.Heartbeat]:
    nc = await connect_tool(url, "kernelrl-status", timeout_s=timeout_s)
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value(RunSubjects(run).actors_bucket)
            keys = await kv.keys()
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            return []
        beats = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            beat = decode_heartbeat(entry.value or b"")
            if beat is not None:
                beats.append(beat)
        return sorted(beats, key=lambda b: (b.role, b.actor_id))
    finally:
        await nc.close()


def format_table(beats: list[m.Heartbeat], now: float) -> str:
    if not beats:
        return "no live actors"
    rows = [("ROLE", "ID", "HOST", "DEVICE", "STATE", "AGE", "COUNTERS  GAUGES")]
    for b in beats:
        counters = " ".join(f"{k}={v}" for k, v in sorted(b.counters.items()))
        gauges = " ".join(f"{k}={v:g}" for k, v in sorted(b.gauges.items()))
        counters = f"{counters}  {gauges}" if gauges else counters
        rows.append((b.role, b.actor_id, b.host, b.device or "-", b.state, f"{now - b.updated_at:.1f}s", counters))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)


async def amain(args: argparse.Namespace) -> int:
    beats = await read_heartbeats(args.nats, args.run, args.config.bus.connect_timeout_s)
    if args.json:
        for b in beats:
            print(msgspec.json.encode(b).decode())
    else:
        print(format_table(beats, time.time()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl status", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
