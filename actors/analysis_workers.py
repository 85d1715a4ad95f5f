"""Jobs of ``kernelrl analyze`` in forked worker processes, and Ctrl-C while the command runs.

``in_workers`` runs ``fn(*job)`` for each job in a ``ProcessPoolExecutor`` of forked workers and yields the results
in job order. Invariants: no worker outlives the call — on an error, Ctrl-C or an abandoned iteration the workers are
killed before the exception goes on, and a worker whose parent is killed outright (SIGKILL, SIGTERM) exits within a
second (it watches its parent id: its copies of the executor's pipes would otherwise keep it waiting forever); a
worker that dies (out of memory, killed) is ``WorkerDied``, never a wait for its lost job. Workers are forked (fast;
``spawn`` would re-run an unguarded caller's ``__main__``) all at once, before the executor starts any thread, and
ignore Ctrl-C, which is this process's to handle. Ctrl-C is held pending while the executor starts, is waited on and
stops, and is raised as ``KeyboardInterrupt`` only between those steps: raised inside them it can leave a manager
thread half-started or a condition's lock unowned, and the cleanup then fails with a ``RuntimeError`` instead.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
ORPHAN_CHECK_S = 0.5
CTRL_C_POLL_S = 0.05


class WorkerDied(RuntimeError):
    """A worker process ended before its job did."""


def default_jobs() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def can_fork() -> bool:
    """Whether workers can be forked safely from here: a fork taken while another thread holds a lock can deadlock
    the child, so only from a single-threaded process."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def in_workers(fn: Callable[..., T], jobs: Sequence[tuple[Any, ...]], workers: int) -> Iterator[T]:
    """``fn(*job)`` for each job, in order, computed by ``workers`` forked processes (see the module's invariants)."""
    others = set(multiprocessing.active_children())
    pool: ProcessPoolExecutor | None = None
    try:
        with _ctrl_c_held():  # the executor starts its processes and manager thread on the first submit
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker,
                                       initargs=(os.getpid(),))  # fmt: skip
            futures = [pool.submit(fn, *job) for job in jobs]
        for future in futures:
            with _ctrl_c_held():
                result = _result(future)
            yield result
    except BaseException:
        with _ctrl_c_held():
            for process in set(multiprocessing.active_children()) - others:
                process.kill()
        raise
    finally:
        if pool is not None:
            with _ctrl_c_held():
                pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[T]) -> T:
    """The job's result, waited for with Ctrl-C held: a pending Ctrl-C is taken and raised here, between waits, never
    inside the executor's locks and conditions (an interrupt there can leave them broken)."""
    while not wait([future], timeout=CTRL_C_POLL_S).done:
        if signal.SIGINT in signal.sigpending():
            signal.sigtimedwait({signal.SIGINT}, 0)
            raise KeyboardInterrupt
    try:
        return future.result()
    except BrokenProcessPool:
        raise WorkerDied("a worker process died (out of memory, or killed); run again, or with --jobs 1") from None


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """SIGINT stays pending (blocked in this thread, and in the threads and processes it starts) until the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_worker(parent: int) -> None:
    signal.set_wakeup_fd(-1)  # the parent's event loop's signal pipe is not this process's
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also drops a Ctrl-C that reached it while held (forked blocked)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # a daemon thread: it lives as long as the worker, and ends the worker once the parent is gone
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(1)


@contextlib.contextmanager
def interrupted_by_ctrl_c() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` at once while the block runs, even under an event loop's SIGINT handler
    (which would only cancel a task the blocked loop never gets back to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back from here
            signal.signal(signal.SIGINT, previous)
