"""Shared fixtures: small image trees and packed data, made by the tests with the project's own tools."""
import json
import os
import subprocess
import sys

import pytest
import yaml

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
    from gluon_imagenet.data.demo import generate

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


TWO_PHASES = {
    "name": "test-two-phases", "reference_workers": 1, "weight_decay": 1.0e-4, "momentum": 0.9,
    "eval_image_size": 64, "min_random_area": 0.5,
    "phases": [
        {"epochs": [0, 3], "lr": [0.05, 0.2], "lr_method": "linear", "batch_size": 16, "image_size": 32,
         "data_dir": "40"},
        {"epochs": [3, 5], "lr": [0.2, 0.01], "lr_method": "exp", "batch_size": 8, "image_size": 64,
         "data_dir": "72"},
    ]}


def write_recipe(folder, recipe=TWO_PHASES, name="recipe.yaml"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def train_cmd(recipe, data_root, run_dir, *extra):
    return ["-m", "gluon_imagenet.train", "--recipe", recipe, "--data-root", data_root, "--run-dir", run_dir,
            "--model", "resnet18_v1b", "--log-every", "1", "--threads", "1", *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def single_run(packed_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    recipe = write_recipe(str(folder))
    run_dir = str(folder / "run")
    proc = run_tool(train_cmd(recipe, packed_root, run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe, run_dir, proc.stdout
