"""Run tasks inline or in worker processes, with bounded look-ahead and a shared progress bar."""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any


class WorkerPool:
    """Runs ``fn(task, report)`` inline (1 worker) or in worker processes.

    Workers are started with 'spawn' (no inherited locks or threads). At most two tasks per
    worker are in flight, so enumeration stays just ahead of the workers and memory is bounded
    whatever the size of the input. ``report(n)`` advances the progress bar from inside a task.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._queue: Any = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self._queue = context.Queue()
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_init_worker,
                initargs=(self._queue,),
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def unordered_map(self, fn: Callable[[Any, Callable[[int], None]], Any],
                      tasks: Iterable[Any], progress: Callable[[int], None]) -> Iterator[Any]:
        if self._executor is None:
            for task in tasks:
                yield fn(task, progress)
            return
        pending: set[Future] = set()
        tasks = iter(tasks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * self.workers:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                else:
                    pending.add(self._executor.submit(_run_in_worker, fn, task))
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            self._drain(progress)
            for future in done:
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


def _init_worker(progress_queue: Any) -> None:
    global _worker_queue
    _worker_queue = progress_queue


def _run_in_worker(fn: Callable[[Any, Callable[[int], None]], Any], task: Any) -> Any:
    return fn(task, _worker_queue.put)

