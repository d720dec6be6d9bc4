"""Training batches rendered ahead of the step that needs them: one background thread on a CPU machine
(rendering must not steal the cores that train), a pool of worker processes when an accelerator trains
faster than one core can draw scenes."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def prefetch(make: Callable[[int], T], start: int, stop: int, workers: int = 0) -> Iterator[T]:
    """make(start), make(start + 1), ... in order; `workers` > 0 renders in that many processes (`make` must
    then be picklable), otherwise one thread renders a step ahead."""
    pool: Executor
    if workers > 0:  # spawn: forking a process that has initialized CUDA is unsafe
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(1)
    depth = max(1, 2 * workers)
    pending: deque[Future[T]] = deque()
    nxt = start
    try:
        while nxt < stop or pending:
            while nxt < stop and len(pending) < depth:
                pending.append(pool.submit(make, nxt))
                nxt += 1
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
