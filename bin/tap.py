"""``kernelrl tap [SUBJECT]``: print decoded messages as they pass (one line each, or JSON)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import msgspec
import nats

from kernelrl.actors.console import summary_line
from kernelrl.bin.common import add_config_arguments, command_main, connect_tool
from kernelrl.core import messages as m
from kernelrl.core.bus import decode_any
from kernelrl.core.subjects import RunSubjects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("subject", nargs="?", help="subject to watch (default: krl.<run>.>)")
    parser.add_argument("--json", action="store_true", help="print each message as full JSON")
    parser.add_argument("--count", type=int, default=0, help="exit after this many messages")
    parser.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds")


async def amain(args: argparse.Namespace) -> int:
    subject = args.subject or f"{RunSubjects(args.run).root}.>"
    nc = await connect_tool(args.nats, "kernelrl-tap", reconnect=True, timeout_s=args.config.bus.connect_timeout_s)
    queue: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        await queue.put(msg)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    print(f"tap: watching {subject}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seen = 0

    async def consume() -> None:
        nonlocal seen
        while not args.count or seen < args.count:
            raw = await queue.get()
            seen += 1
            print(render(raw.subject, raw.data, raw.headers, args.json), flush=True)

    consumer = asyncio.create_task(consume())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({consumer, stopper}, timeout=args.timeout or None, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (consumer, stopper):
            task.cancel()
        await asyncio.gather(consumer, stopper, return_exceptions=True)
        with contextlib.suppress(nats.errors.Error):
            await nc.drain()
    return 0


def render(subject: str, data: bytes, headers: dict[str, str] | None, as_json: bool) -> str:
    try:
        msg = decode_any(subject, data, headers)
    except (m.DecodeError, msgspec.ValidationError) as exc:
        return f"{subject} UNDECODABLE {exc} ({len(data)} B)"
    if as_json:
        return msgspec.json.encode({"subject": subject, "type": type(msg).__name__, "msg": msg}).decode()
    return summary_line(subject, msg)


def main(argv: list[str] | None = None) -> int:
    return command_main("kernelrl tap", __doc__, add_arguments, amain, argv)


if __name__ == "__main__":
    sys.exit(main())
