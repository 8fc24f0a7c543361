"""The packer's worker processes: results in input order, a dead worker noticed, a stop that ends them at once.

multiprocessing.Pool.imap, used before, waits forever when the kernel kills a worker (its task is never
answered), and its terminate() could hang in the result handler's join after a Ctrl-C, holding the data root's
lock. concurrent.futures.ProcessPoolExecutor notices dead workers, but its manager thread races the
interpreter's exit after a stop (Python 3.11.7: a hang in its exit handler's join, or an OSError traceback from
its wake-up pipe, seen in about 1 of 20 SIGTERMs). So this pool has no threads at all: each worker has its own
pipe and serves its tasks in order; chunk i goes to worker i % N, so the parent reads the results back in input
order (the records are written in the same order whatever the number of processes), waiting on the worker's pipe
and its process sentinel together: a worker that dies is seen at once.
"""
from __future__ import annotations

import multiprocessing
import signal
import traceback
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

from gluon_imagenet import stops

CHUNK = 8  # items per task: few enough round trips, small enough that a stop or a death is noticed quickly
AHEAD = 4  # tasks queued per worker, so that no worker waits for the parent to hand out work


class WorkerDied(Exception):
    """A worker process ended without answering (killed by the kernel, e.g. out of memory, or by someone)."""


def _serve(conn, function: Callable, initializer: Callable, initargs: tuple) -> None:
    stops.ignore_in_child()  # a Ctrl-C reaches the whole process group; the parent alone decides what it means
    initializer(*initargs)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        try:
            conn.send((True, [function(x) for x in chunk]))
        except Exception:  # noqa: BLE001 - a bug of ours: ends the run in the parent, with the worker's traceback
            conn.send((False, traceback.format_exc()))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _how_it_ended(process) -> str:
    process.join(3)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"pid {process.pid} killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"pid {process.pid} killed by signal {-code}"
    return f"pid {process.pid} exited with code {code}"


def ordered_map(function: Callable, items: Iterable, processes: int, initializer: Callable,
                initargs: tuple = ()) -> Iterator:
    """function(item) for every item, in order, computed by `processes` forked workers (in this process when 1).

    Raises WorkerDied when a worker dies. However the caller stops iterating (the end, an exception, a
    stops.Stopped from Ctrl-C or SIGTERM), no worker outlives it."""
    if processes <= 1:
        initializer(*initargs)
        yield from map(function, items)
        return
    context = multiprocessing.get_context("fork")
    workers, conns = [], []
    finished = False
    try:
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_serve, args=(child_end, function, initializer, initargs), daemon=True)
            process.start()
            child_end.close()
            workers.append(process)
            conns.append(parent_end)
        chunks = _chunks(items, CHUNK)
        sent = 0  # chunks handed out; chunk i goes to worker i % processes

        def send_next() -> None:
            nonlocal sent
            chunk = next(chunks, None)
            if chunk is not None:
                try:
                    conns[sent % processes].send(chunk)
                except OSError:  # BrokenPipeError: that worker is gone
                    raise WorkerDied(_how_it_ended(workers[sent % processes])) from None
                sent += 1

        for _ in range(processes * AHEAD):
            send_next()
        received = 0
        while received < sent:
            k = received % processes
            conn, process = conns[k], workers[k]
            if not conn.poll():
                wait([conn, process.sentinel])
            try:
                if not conn.poll():
                    raise EOFError
                ok, results = conn.recv()
            except (EOFError, OSError):
                raise WorkerDied(_how_it_ended(process)) from None
            if not ok:
                raise RuntimeError(f"a packing worker failed:\n{results}")
            received += 1
            send_next()
            yield from results
        finished = True
    finally:
        if finished:
            for conn in conns:
                try:
                    conn.send(None)
                except OSError:
                    pass  # already gone: it had nothing left to do
        # Stopped, failed, or abandoned: end the workers now rather than wait for the tasks they hold. They ignore
        # SIGINT and SIGTERM (see _serve), so SIGKILL; they hold nothing that needs cleaning up.
        for process in workers:
            if not finished and process.exitcode is None:
                process.kill()
        for process in workers:
            process.join(5 if not finished else None)
        for conn in conns:
            conn.close()
