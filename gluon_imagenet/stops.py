"""Clean stops for every command: Ctrl-C (SIGINT) and SIGTERM end it within seconds with one line on stderr and
exit code 128 + signal (130, 143), never a traceback.

Both signals raise `Stopped` in the main thread, so `finally` blocks and `with` blocks (locks, .partial files)
unwind as for any other exception. `Stopped` is a BaseException, like KeyboardInterrupt, so that the
`except Exception` clauses that report bad input do not swallow it. A second signal while unwinding is ignored:
the first one is already being handled, and a second traceback would only hide the one line.

    from gluon_imagenet import stops

    def main(argv=None) -> int:
        with stops.clean_stop("train"):
            ...
"""
from __future__ import annotations

import contextlib
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop asked for by a signal; `code` is the exit code a shell expects (128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


def _raise(signum, frame):
    for s in SIGNALS:  # one stop at a time: the unwinding of the first must not be interrupted by a second
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise Stopped (main thread only; a no-op elsewhere)."""
    try:
        for s in SIGNALS:
            signal.signal(s, _raise)
    except ValueError:  # not the main thread
        pass


def ignore_in_child() -> None:
    """For worker processes: leave the stop to the parent, which ends its workers itself (a Ctrl-C reaches the
    whole process group, and a worker's own KeyboardInterrupt traceback would be printed beside the one line)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def message(what: str, stop: Stopped) -> str:
    return f"{what}: stopped by {stop}" if stop.signum != signal.SIGINT else f"{what}: stopped (Ctrl-C)"


@contextlib.contextmanager
def clean_stop(what: str, exit_on_stop: bool = True):
    """Install the handlers; a Stopped (or a KeyboardInterrupt raised before they were installed) becomes one
    line and SystemExit(128 + signal)."""
    install()
    try:
        yield
    except (Stopped, KeyboardInterrupt) as e:
        stop = e if isinstance(e, Stopped) else Stopped(signal.SIGINT)
        print(message(what, stop), file=sys.stderr, flush=True)
        if exit_on_stop:
            raise SystemExit(stop.code) from None
        raise stop from None
