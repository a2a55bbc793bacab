"""Process pools that fail fast: ``ProcessPool``, a ``concurrent.futures.ProcessPoolExecutor`` whose processes
die with the main process, for every pool of the pipeline (tokenizer workers, the dedup scan and re-read, a
MediaWiki dump's stream conversion).

Why not ``multiprocessing.Pool``: when one of its processes is killed (the kernel's OOM killer, a crash in a C
extension) it silently starts another, and the task the dead one held is lost: whoever waits for that result
waits forever, and the run hangs without a word. An executor instead fails every pending future with
``BrokenProcessPool``, which the caller turns into its error (``ProcessPool.death`` says how the process
died).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = ["BrokenProcessPool", "ProcessPool", "fork_context", "worker_init"]


def fork_context():
    """fork on Linux (a worker inherits what the main process loaded), spawn elsewhere."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def worker_init(parent: int, init: Callable | None = None, initargs: tuple = ()) -> None:
    """A pool process: Ctrl-C is the main process's to handle (it stops the pool), and it dies with the main
    process (Linux: even of kill -9, which leaves no worker behind waiting for work); then ``init(*initargs)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the main process died before prctl
        os._exit(1)
    if init is not None:
        init(*initargs)


def _ready() -> int:
    return os.getpid()


# Testing hook: LMFORGE_INJECT_TASK_PAUSE=SECONDS makes every task of a ``ProcessPool`` wait that long in its
# process before it runs, so that a test can kill a worker while the pool is busy (a run of the test corpus
# takes ~0.1 s otherwise; tests/data_pipeline/test_worker_death.py). Output unchanged.
TASK_PAUSE_ENV = "LMFORGE_INJECT_TASK_PAUSE"


def _paused(pause: float, fn: Callable, *args):
    time.sleep(pause)
    return fn(*args)


class ProcessPool:
    """``workers`` processes (``fork_context``), all started now, before the caller starts any thread; each
    runs ``initializer(*initargs)`` once. ``submit`` and ``map`` as an executor's (``map``: results in
    submission order, all submitted at once). A process that dies (or an initializer that fails) breaks the
    pool: every result still awaited raises ``BrokenProcessPool``, here too if it happens at the start.
    ``close`` stops the processes now (tasks running or queued are dropped)."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers = workers
        self._ex = ProcessPoolExecutor(workers, mp_context=fork_context(), initializer=worker_init,
                                       initargs=(os.getpid(), initializer, initargs))
        self._procs: dict = {}
        self._closed = False
        self._pause = float(os.environ.get(TASK_PAUSE_ENV) or 0)
        try:
            first = self._ex.submit(_ready)  # the processes start now (forked all at once)
            self._procs = dict(getattr(self._ex, "_processes", None) or {})
            first.result()
        except BrokenProcessPool:
            raise BrokenProcessPool(f"a worker process died as the pool started ({self.death()})") from None
        except BaseException:
            self.close()
            raise

    def submit(self, fn: Callable, *args) -> Future:
        if self._pause:
            return self._ex.submit(_paused, self._pause, fn, *args)
        return self._ex.submit(fn, *args)

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        if self._pause:
            return self._ex.map(functools.partial(_paused, self._pause, fn), items)
        return self._ex.map(fn, items)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ex = self._ex
        manager = getattr(ex, "_executor_manager_thread", None)  # shutdown forgets it before it ends
        stop = getattr(ex, "terminate_workers", None)  # Python 3.14
        if stop is not None:
            stop()
        else:
            procs = dict(getattr(ex, "_processes", None) or {})
            ex.shutdown(wait=False, cancel_futures=True)
            for p in procs.values():
                try:
                    p.terminate()
                except (ValueError, ProcessLookupError):  # closed or gone
                    pass
        ex.shutdown(wait=True)
        if manager is not None:  # it joins (reaps) the processes: done before ``death`` reads their exit codes
            manager.join(10)

    def death(self) -> str:
        """How the pool's dead process died, e.g. "killed by signal 9: out of memory?" (stops the pool)."""
        self.close()
        codes = []
        for p in self._procs.values():
            try:
                p.join(5)
                for _ in range(100):  # reaped by another thread: it sets the exit code
                    if p.exitcode is not None:
                        break
                    time.sleep(0.01)
                codes.append(p.exitcode)
            except (ValueError, AssertionError):  # closed
                pass
        # The pool terminates (SIGTERM) the others once one has died: the dead one is the other code.
        dead = [c for c in codes if c not in (None, 0, -signal.SIGTERM)] or [c for c in codes if c]
        if not dead:
            return "how is unknown"
        code = dead[0]
        if code == -signal.SIGKILL:
            return "killed by signal 9: out of memory?"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "?"
            return f"killed by signal {-code} ({name})"
        return f"exit code {code}"

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
