"""Shared fixtures: small image trees and packed data, made by the tests with the project's own tools."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One MXNet/OpenMP thread per process: the tests run several processes on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")


def run_tool(args, **kwargs):
    """Run one of the project's command lines the way a user types it, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def shapes_tree(tmp_path_factory):
    """10 classes of generated shapes: 24 train + 7 val images per class (uneven on purpose)."""
    from gluon_imagenet.demo_data import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(str(out), train_per_class=24, val_per_class=7, seed=1)
    return str(out)


@pytest.fixture(scope="session")
def packed_root(shapes_tree, tmp_path_factory):
    """shapes_tree packed at short sides 40 and 72."""
    root = str(tmp_path_factory.mktemp("recordio"))
    proc = run_tool(["tools/im2rec_multi.py", shapes_tree, "--root", root, "--sizes", "40", "72", "--workers", "2"])
    assert proc.returncode == 0, proc.stderr
    return root
