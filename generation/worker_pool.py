"""Worker processes that tokenize batches and hand results back in task order (export and megadocs)."""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class WorkerPool:
    """Worker processes (0: this process) that run tasks and give the results back in task order."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple) -> None:
        self.workers = workers
        if workers == 0:
            initializer(*initargs, single_threaded=False)
            self._pool = None
        else:  # spawn, not fork: the parent holds tensorstore threads, which fork does not carry over safely
            self._pool = multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)

    def map_ordered(
        self, function: Callable[[Any], Any], tasks: Iterable[tuple[Any, Any]]
    ) -> Iterator[tuple[Any, Any]]:
        """(context, function(task)) in task order, at most 2 tasks per worker in flight."""
        if self._pool is None:
            for context, task in tasks:
                yield context, function(task)
            return
        pending: collections.deque = collections.deque()
        for context, task in tasks:
            pending.append((context, self._pool.apply_async(function, (task,))))
            if len(pending) >= 2 * self.workers:
                context, result = pending.popleft()
                yield context, result.get()
        while pending:
            context, result = pending.popleft()
            yield context, result.get()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self._pool is not None:
            if exc_type is None:
                # The workers finish and exit; their CPU time then counts as this process's children's.
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
