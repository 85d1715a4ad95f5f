"""``kernelrl run``'s supervision of its child processes."""

from __future__ import annotations

import asyncio
import sys

from kernelrl.core.supervisor import ChildSpec, RestartBudget, Supervisor


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_crashing_child_is_restarted_with_backoff_then_given_up_on() -> None:
    stopping = asyncio.Event()
    sup = Supervisor([ChildSpec(name="flaky", argv=child("raise SystemExit(3)"), max_restarts=2, backoff_s=0.05)])
    codes = await asyncio.wait_for(sup.run(stopping), 30)
    assert sup.starts["flaky"] == 3
    assert codes == {"flaky": 3}
    assert stopping.is_set()  # giving up on a role stops the run
    assert "flaky" in sup.gave_up and "status 3" in sup.gave_up["flaky"] and "budget of 2" in sup.gave_up["flaky"]


async def test_a_child_that_finishes_is_not_restarted() -> None:
    stopping = asyncio.Event()
    sup = Supervisor([ChildSpec(name="oneshot", argv=child("pass"))])
    codes = await asyncio.wait_for(sup.run(stopping), 30)
    assert codes == {"oneshot": 0} and sup.starts["oneshot"] == 1


async def test_stop_sends_sigterm_and_kills_a_child_that_ignores_it() -> None:
    stopping = asyncio.Event()
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"
    polite = "import time\ntime.sleep(60)"
    sup = Supervisor(
        [ChildSpec(name="stubborn", argv=child(stubborn)), ChildSpec(name="polite", argv=child(polite))], grace_s=1.0
    )
    task = asyncio.create_task(sup.run(stopping))
    await asyncio.sleep(1.0)
    stopping.set()
    codes = await asyncio.wait_for(task, 30)
    assert codes == {"stubborn": -9, "polite": -15}


def test_the_restart_budget_is_per_time_window_not_for_the_life_of_the_run() -> None:
    budget = RestartBudget(max_restarts=5, window_s=600.0)
    assert all(budget.allow(now=t) for t in (0.0, 10.0, 20.0, 30.0, 40.0))
    assert not budget.allow(now=50.0)  # a sixth restart within ten minutes: give up
    later = RestartBudget(max_restarts=5, window_s=600.0)
    assert all(later.allow(now=t * 200.0) for t in range(20))  # one restart every 200 s, forever: fine
    assert later.total == 20 and later.recent <= 4
