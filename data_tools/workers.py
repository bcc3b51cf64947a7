"""Run shard tasks in ``workers`` processes: this one and ``workers - 1`` spawned ones.

The calling process builds shards too, between keeping the spawned workers supplied. That uses
the core it would otherwise leave idle while waiting, and it starts working at once, while the
spawned workers are still starting up (importing Pillow and pyarrow takes about half a second).

How workers start: on Linux, when this process has a single Python thread, they are forked
at once, before any progress bar starts its monitor thread. A fork is safe then (the hazard of
fork is a lock held by another thread at that moment, which the child could never release; the
C libraries involved, such as OpenBLAS, re-initialise themselves after a fork, as in PyTorch's
DataLoader workers) and it costs milliseconds instead of a fresh interpreter re-importing
Pillow, numpy and pyarrow. Otherwise (other threads, other systems) they are spawned.

At most two tasks per extra worker are queued ahead, so enumeration stays just ahead of the
workers and memory is bounded whatever the size of the input. A task is ``fn(task, report)``;
``report(n)`` advances the progress bar from whichever process runs it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

Task = Callable[[Any, Callable[[int], None]], Any]
_QUEUED_PER_WORKER = 2
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_SECONDS = 1.0


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.start_method = "inline"  # how the extra workers were started: fork or spawn
        self._executor: ProcessPoolExecutor | None = None
        self._queue: Any = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            fork = sys.platform == "linux" and threading.active_count() == 1
            self.start_method = "fork" if fork else "spawn"
            context = multiprocessing.get_context(self.start_method)
            self._queue = context.Queue()
            self._executor = ProcessPoolExecutor(
                self.workers - 1, mp_context=context, initializer=_init_worker,
                initargs=(self._queue, os.getpid()),
            )
            if fork:
                # With fork the executor starts every worker at its first task: do it now,
                # while this is still the only thread.
                self._executor.submit(int).result()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def unordered_map(self, fn: Task, tasks: Iterable[Any],
                      progress: Callable[[int], None]) -> Iterator[Any]:
        """Results of ``fn`` over ``tasks``, in completion order."""
        tasks = iter(tasks)
        if self._executor is None:
            for task in tasks:
                yield fn(task, progress)
            return

        def report_here(count: int) -> None:
            progress(count)
            self._drain(progress)

        pending: set[Future] = set()
        while True:
            while len(pending) < _QUEUED_PER_WORKER * (self.workers - 1):
                task = next(tasks, None)
                if task is None:
                    break
                pending.add(self._executor.submit(_run_in_worker, fn, task))
            finished = {future for future in pending if future.done()}
            pending -= finished
            for future in finished:
                yield future.result()
            task = next(tasks, None)
            if task is None:
                break
            yield fn(task, report_here)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            self._drain(progress)
            for future in finished:
                yield future.result()
        self._drain(progress)

    def ordered_map(self, fn: Callable[[Any, Callable[[int], None]], tuple[int, Any]],
                    tasks: Iterable[Any], progress: Callable[[int], None]) -> Iterator[Any]:
        """Like :meth:`unordered_map` for tasks returning ``(index, result)``; yields in order."""
        ready: dict[int, Any] = {}
        expected = 0
        for index, result in self.unordered_map(fn, tasks, progress):
            ready[index] = result
            while expected in ready:
                yield expected, ready.pop(expected)
                expected += 1

    def _drain(self, progress: Callable[[int], None]) -> None:
        while True:
            try:
                progress(self._queue.get_nowait())
            except queue.Empty:
                return


_worker_queue: Any = None


def _init_worker(progress_queue: Any, parent_pid: int) -> None:
    global _worker_queue
    _worker_queue = progress_queue
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """End this worker process when its parent dies, even by kill -9.

    Otherwise an orphaned worker waits forever on its task pipe (it holds the pipe's write
    end too, so it never sees end-of-file). See :func:`signal_when_parent_dies`.
    """
    signal_when_parent_dies(parent_pid, signal.SIGKILL)


def signal_when_parent_dies(parent_pid: int, signum: int) -> None:
    """Have ``signum`` delivered to this process when its parent dies, even by kill -9, and at
    once if it is already gone. On Linux the kernel sends it (PR_SET_PDEATHSIG, which fires
    when the thread that forked this process ends: the pool and the launchers fork from their
    main thread). Elsewhere, or if prctl fails, a daemon thread polls the parent's pid."""
    if not (sys.platform == "linux" and _set_parent_death_signal(signum)):
        threading.Thread(target=_watch_parent, args=(parent_pid, signum), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signum)


def _set_parent_death_signal(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, signum: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signum)


def _run_in_worker(fn: Task, task: Any) -> Any:
    return fn(task, _worker_queue.put)
