"""`python -m gluon_imagenet.recipe show`: refusals and a reader that stops early."""
import os
import subprocess
import sys

from conftest import ROOT, run_tool

RECIPE = os.path.join("recipes", "imagenet104.yaml")


def test_workers_zero_is_refused_not_the_reference_plan():
    proc = run_tool(["-m", "gluon_imagenet.recipe", "show", RECIPE, "--workers", "0"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: --workers 0: must be a whole number >= 1 (leave --workers out for the "
                                   "recipe's reference_workers)")


def test_a_reader_that_stops_early_ends_it_quietly():
    """`recipe show ... | head -1`: the reader is gone before the plan is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "gluon_imagenet.recipe", "show", RECIPE], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
