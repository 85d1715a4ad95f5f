"""The lifecycle every role shares: connect, provision, run, heartbeat, stop on a signal, drain, exit 0.

An actor is an object with a ``role``, a ``counters`` Counter, ``gauges()`` and ``async run(stopping)``; ``run``
must stop pulling new work once ``stopping`` is set, finish or release what it holds, and return. Blocking
work runs off the event loop, so the heartbeat (every ``bus.heartbeat_interval_s``) keeps beating through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import nats.errors

from kernelrl.core import messages as m
from kernelrl.core.bus import Bus
from kernelrl.core.config import Config
from kernelrl.core.consumers import consumer_table

log = logging.getLogger(__name__)


class Actor(Protocol):
    role: str
    actor_id: str
    device: str
    state: str
    counters: Counter[str]

    def gauges(self) -> dict[str, float]:
        """Current values for the heartbeat (seconds into the current job, the last fsync's duration ...)."""
        ...

    async def run(self, stopping: asyncio.Event) -> None: ...


def default_actor_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


async def _heartbeat_loop(bus: Bus, actor: Actor, started_at: float, done: asyncio.Event) -> None:
    kv = await bus.kv(bus.subjects.actors_bucket)
    codec = m.codec_for(m.Heartbeat)
    key = f"{actor.role}.{actor.actor_id}"
    while True:
        counters = dict(actor.counters)
        decode_failures = sum(bus.decode_failures.values())
        if decode_failures:
            counters["decode_failures"] = decode_failures
        beat = m.Heartbeat(
            role=actor.role,
            actor_id=actor.actor_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            state=actor.state,
            updated_at=time.time(),
            device=actor.device,
            run_id=bus.settings.run,
            started_at=started_at,
            counters=counters,
            gauges=actor.gauges(),
        )
        interval = bus.settings.heartbeat_interval_s
        try:
            await asyncio.wait_for(kv.put(key, codec.encode(beat)), interval)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("heartbeat not written: %r", exc)
        if done.is_set():
            return  # the last beat said "stopped"; the entry expires with the bucket's TTL
        try:
            await asyncio.wait_for(done.wait(), interval)
        except TimeoutError:
            pass


async def run_actor(
    make_actor: Callable[[Bus], Actor | Awaitable[Actor]],
    config: Config,
    stopping: asyncio.Event | None = None,
) -> int:
    """Run one actor of the run ``config`` describes to completion; SIGINT/SIGTERM start a clean stop.
    Returns the exit status."""
    bus_settings = config.bus
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    bus = await Bus.connect(bus_settings, name="kernelrl")
    try:
        await bus.provision(consumer_table(config))
        made = make_actor(bus)
        actor = await made if isinstance(made, Awaitable) else made
        started_at = time.time()
        actor.state = "running"
        log.info("%s %s running on %s (run %s)", actor.role, actor.actor_id, bus_settings.url, bus_settings.run)

        done = asyncio.Event()

        async def run_then_mark_stopped() -> None:
            try:
                await actor.run(stopping)
            finally:
                actor.state = "stopped"
                done.set()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_then_mark_stopped())
                tg.create_task(_heartbeat_loop(bus, actor, started_at, done))
        except ExceptionGroup as group:
            error: BaseException = group
            while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:  # the actor's own error, not groups
                error = error.exceptions[0]
            raise error from None
        log.info("%s %s stopped cleanly", actor.role, actor.actor_id)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await bus.close()


def run_main(coro: Awaitable[int]) -> int:
    """Run an entrypoint coroutine on uvloop where available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def decode_heartbeat(data: bytes) -> m.Heartbeat | None:
    try:
        return m.codec_for(m.Heartbeat).decode(data)
    except (m.DecodeError, msgspec.ValidationError):
        return None
