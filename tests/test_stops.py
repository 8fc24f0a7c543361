"""stops.clean_stop: SIGINT and SIGTERM end a command with one line and exit 128 + signal, finally blocks run."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SCRIPT = """
import sys, time
from gluon_imagenet import stops
with stops.clean_stop("demo-command"):
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        open(sys.argv[1], "w").write("cleaned")
"""


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "demo-command: stopped (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "demo-command: stopped by SIGTERM")])
def test_signal_ends_with_one_line_and_unwinds(tmp_path, signum, code, line):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(marker)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - start < 5
    assert proc.returncode == code
    assert err.strip().splitlines() == [line]
    assert marker.read_text() == "cleaned"
