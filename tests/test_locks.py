"""locks.py: one holder at a time, the second told who holds it, released however the holder ends."""
import os
import signal
import subprocess
import sys
import time

import pytest

from gluon_imagenet import locks

HOLDER = "import sys, time; from gluon_imagenet import locks\nwith locks.hold(sys.argv[1], 'the thing'):\n" \
         "    print('held', flush=True); time.sleep(60)"


def test_second_holder_is_told_who_holds_it_and_a_killed_holder_releases(tmp_path):
    path = str(tmp_path / "x.lock")
    assert locks.holder(path) is None
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert locks.holder(path)["pid"] == proc.pid
        with pytest.raises(locks.Busy, match=rf"the thing is in use by pid {proc.pid} on "):
            with locks.hold(path, "the thing"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while locks.holder(path) is not None and time.time() < deadline:
        time.sleep(0.05)
    with locks.hold(path, "the thing") as info:  # nothing stale is left behind
        assert info["pid"] == os.getpid() and locks.holder(path)["pid"] == os.getpid()
