"""One writer at a time: an advisory lock per run dir (the trainer), per data root (the packer) and around every
write of the sweep's results, so two processes never interleave their files. Readers of a data root (trainers)
hold its lock shared, so that no packer rewrites the data under a run (and a run does not start on data being
packed), while any number of runs read it at once.

A lock is `flock` on a small file that also says who holds it (pid, host, start time, command): the second
process is told who to wait for. The kernel releases the lock when its holder exits, however it exits, so a
crashed trainer never leaves a stale lock behind. flock works across machines on NFS (Linux emulates it with
POSIX locks there), which is where a multi-machine run keeps its run dir.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time


class Busy(Exception):
    """Another process holds the lock; the message says which."""


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (since {since}: {info.get('command', '?')})"


def _read_info(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def holder(path: str) -> dict | None:
    """Who holds the lock at `path` now ({pid, host, since, command}), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return _read_info(path) or {}
    finally:
        os.close(fd)  # also releases the shared lock taken just to test
    return None


def _flock(fd: int, mode: int, wait: bool) -> bool:
    """Take flock `mode` on fd: blocking with `wait`, else a few tries (another process's holder() or failed
    attempt holds it for an instant) before giving up with False."""
    for attempt in range(1 if wait else 20):
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            time.sleep(0.05)
    return False


def command_line() -> str:
    """This process's command as it was typed: `python -m gluon_imagenet.train ...` for a package run with -m
    (whose sys.argv[0] is the path of its __main__.py), else sys.argv joined."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and sys.argv and sys.argv[0].endswith(".py"):
        return " ".join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return " ".join(sys.argv)


def _write_info(fd: int) -> dict:
    """Who holds the lock, written into its file for the next process that is refused."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command_line()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return info


@contextlib.contextmanager
def hold(path: str, what: str, wait: bool = False):
    """Hold the exclusive lock at `path` for the block. Raises Busy naming the holder, unless `wait`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, fcntl.LOCK_EX, wait):
            raise Busy(f"{what} is in use by {_describe(_read_info(path))}; wait for it to finish or stop it "
                       f"(lock file {path})")
        yield _write_info(fd)
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next holder)


@contextlib.contextmanager
def share(path: str, what: str):
    """Hold the lock at `path` shared for the block; entering gives "" or the problem (a writer holds it). A lock
    file that cannot be created or opened (a read-only data root, which no packer can write either) is not held."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield ""
            return
    try:
        if not _flock(fd, fcntl.LOCK_SH, wait=False):
            yield (f"{what} is being written by {_describe(_read_info(path))}; wait for it to finish (lock file "
                   f"{path})")
            return
        # Say who reads, for the packer's refusal. Several readers may write this at once: the packer then
        # names one of them (or "another process" when their writes mixed).
        with contextlib.suppress(OSError):
            _write_info(fd)
        yield ""
    finally:
        os.close(fd)
