"""The packer's worker processes: results in input order, a dead worker noticed, a stop that ends them at once.

multiprocessing.Pool.imap, used before, waits forever when the kernel kills a worker (its task is never
answered), and its terminate() could hang in the result handler's join after a Ctrl-C, holding the data root's
lock. concurrent.futures.ProcessPoolExecutor watches its workers' sentinels: a worker that dies breaks the pool
and every waiting future raises BrokenProcessPool at once. Work is submitted a bounded window ahead and taken in
submission order, so the records are written in the same order whatever the number of processes.
"""
from __future__ import annotations

import collections
import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

from gluon_imagenet import stops

CHUNK = 8  # items per task: few enough round trips, small enough that a stop or a death is noticed quickly
AHEAD = 4  # tasks in flight per process, so that no process waits for the parent to hand out work


class WorkerDied(Exception):
    """A worker process ended without answering (killed by the kernel, e.g. out of memory, or by someone)."""


def _init(initializer: Callable, initargs: tuple) -> None:
    stops.ignore_in_child()  # a Ctrl-C reaches the whole process group; the parent alone decides what it means
    initializer(*initargs)


def _run_chunk(function: Callable, chunk: list) -> list:
    return [function(x) for x in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _how_they_ended(processes) -> str:
    # The pool's own thread is reaping them at this moment (it ends the other workers of a broken pool): an exit
    # status it has collected shows here a moment later.
    deadline = time.monotonic() + 3
    while any(p.exitcode is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    ends = []
    for p in processes:
        if p.exitcode is not None and p.exitcode < 0:
            try:
                ends.append(f"pid {p.pid} killed by {signal.Signals(-p.exitcode).name}")
            except ValueError:
                ends.append(f"pid {p.pid} killed by signal {-p.exitcode}")
        elif p.exitcode not in (None, 0):
            ends.append(f"pid {p.pid} exited with code {p.exitcode}")
    return "; ".join(ends) or "a worker process ended abruptly"


def ordered_map(function: Callable, items: Iterable, processes: int, initializer: Callable,
                initargs: tuple = ()) -> Iterator:
    """function(item) for every item, in order, computed by `processes` forked workers (in this process when 1).

    Raises WorkerDied when a worker dies. However the caller stops iterating (the end, an exception, a
    stops.Stopped from Ctrl-C or SIGTERM), no worker outlives it."""
    if processes <= 1:
        initializer(*initargs)
        yield from map(function, items)
        return
    executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_init,
                                   initargs=(initializer, initargs))
    chunks, pending, workers, finished = _chunks(items, CHUNK), collections.deque(), [], False

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(executor.submit(_run_chunk, function, chunk))

    try:
        for _ in range(processes * AHEAD):
            submit_next()
        # With the fork context every worker starts at the first submit: kept to say how they ended. (_processes
        # is private, stable since Python 3.2; ProcessPoolExecutor.terminate_workers is 3.14's public form.)
        workers = list((executor._processes or {}).values())
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise WorkerDied(_how_they_ended(workers)) from None
            submit_next()
            yield from results
        finished = True
    finally:
        if finished:
            executor.shutdown(wait=True)
        else:
            # Stopped, failed, or abandoned: end the workers now rather than wait for the tasks they hold. They
            # ignore SIGINT and SIGTERM (see _init), so SIGKILL; they hold nothing that needs cleaning up.
            executor.shutdown(wait=False, cancel_futures=True)
            for p in workers or list((executor._processes or {}).values()):
                if p.exitcode is None:
                    p.kill()
            for p in workers:
                p.join(5)
