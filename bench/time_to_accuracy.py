"""Time to accuracy on real data: a baseline recipe and the baseline plus each lever, side by side in one run.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist
    .venv/bin/python bench/fashion_mnist.py /tmp/fmnist/usr/share/datasets/fashion-mnist /tmp/fashion
    .venv/bin/python tools/im2rec_multi.py /tmp/fashion --root /tmp/fashion-rec --sizes 32 40 48
    .venv/bin/python bench/time_to_accuracy.py --data-root /tmp/fashion-rec --work /tmp/tta

Fashion-MNIST (real 28x28 gray product photos, 10 classes; 500 training and 100 validation images per class from
the official split by default), packed at short sides 32, 40 and 48. The baseline is the seed's shape in small:
progressive resizing 24 -> 32 px, linear warm-up then exponential decay, NAG, evaluated at the last phase's size.
The levers, each on top of the baseline (the runs that came after the seed used them, issue 18):
- scales+flip: the baseline's own checkpoints, evaluated at 1.0, 1.15 and 1.3 times their size, each image
  averaged with its mirror (the sweep's --eval-scales and --flip): no training of its own;
- ema: an exponential moving average of the weights (recipe `ema`), evaluated raw and averaged;
- sgd: heavy-ball SGD through the aggregated update, decaying linearly to exactly 0;
- all: every lever together.
Each trained variant runs the same epochs with the same seed in one process (the trainer's default threads).
For each: the best top-1 over its checkpoints and settings, and the training seconds until a checkpoint first
reached the baseline's best top-1 (and the fixed --target-top1), read from the sweep's results (training
seconds: the trainer's own clock, which excludes start-up and checkpoint writing).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE = {
    "name": "fashion-baseline", "reference_workers": 1, "lr_scaling": "linear", "weight_decay": 5.0e-5,
    "momentum": 0.9, "label_smoothing": 0.1, "min_random_area": 0.35, "eval_image_size": 32, "eval_data_dir": "40",
    "phases": [
        {"epochs": [0, 2], "lr": [0.02, 0.1], "lr_method": "linear", "batch_size": 64, "image_size": 24,
         "data_dir": "32"},
        {"epochs": [2, 7], "lr": [0.1, 0.02], "lr_method": "exp", "batch_size": 64, "image_size": 24,
         "data_dir": "32"},
        {"epochs": [7, 10], "lr": [0.02, 0.002], "lr_method": "exp", "batch_size": 64, "image_size": 32,
         "data_dir": "40"},
    ]}
EMA = {"ema": {"half_life_epochs": 0.5}}
SCALES_FLIP = ["--eval-scales", "1.0,1.15,1.3", "--flip"]


def sgd_to_zero(recipe: dict) -> dict:
    out = copy.deepcopy(recipe)
    out["optimizer"] = "sgd"
    last = out["phases"][-1]
    last.update(lr_method="linear", lr=[last["lr"][0], 0.0])
    return out


def variants() -> list[tuple[str, dict | None, list[str]]]:
    """(name, recipe to train or None = the baseline's checkpoints, extra sweep arguments)."""
    return [
        ("baseline", BASELINE, []),
        ("scales+flip", None, SCALES_FLIP),
        ("ema", dict(BASELINE, **EMA), ["--weights", "both"]),
        ("sgd", sgd_to_zero(BASELINE), []),
        ("all", dict(sgd_to_zero(BASELINE), **EMA), ["--weights", "both", *SCALES_FLIP]),
    ]


def run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def results(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "sweep.json")) as f:
        return list(json.load(f)["results"].values())


def first_hit(rows: list[dict], top1: float) -> dict | None:
    """The earliest checkpoint (any setting) reaching top1."""
    hits = [r for r in rows if r["top1"] >= top1 - 1e-12]
    return min(hits, key=lambda r: r["step"]) if hits else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="Fashion-MNIST packed at 32 40 48 (see above)")
    p.add_argument("--work", required=True, help="folder for the runs (each variant a run dir)")
    p.add_argument("--model", default="resnet18_v1b")
    p.add_argument("--target-top1", type=float, default=0.75, help="fixed target reported beside the baseline's best")
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    py = sys.executable
    table = {}
    for name, recipe, sweep_extra in variants():
        if args.only and name not in args.only and name != "baseline":
            continue
        train_dir = os.path.join(args.work, "baseline" if recipe is None else name)
        if recipe is not None and not os.path.exists(os.path.join(train_dir, "run.json")):
            path = os.path.join(args.work, f"{name}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(dict(recipe, name=f"fashion-{name}"), f)
            print(f"{name}: training", flush=True)
            run([py, "-m", "gluon_imagenet.train", "--recipe", path, "--data-root", args.data_root, "--run-dir",
                 train_dir, "--model", args.model, "--log-every", "50"], os.path.join(args.work, f"{name}.train.log"))
        # Each variant's sweep keeps its own results: the scales+flip rows must not mix with the baseline's.
        sweep_dir = train_dir if recipe is not None else os.path.join(args.work, name)
        if recipe is None and not os.path.exists(sweep_dir):
            subprocess.run(["cp", "-r", train_dir, sweep_dir], check=True)
            for leftover in ("sweep.json", "sweep.csv"):
                if os.path.exists(os.path.join(sweep_dir, leftover)):
                    os.remove(os.path.join(sweep_dir, leftover))
        print(f"{name}: sweeping", flush=True)
        run([py, "-m", "gluon_imagenet.sweep_eval", "--run-dir", sweep_dir, "--data-root", args.data_root,
             "--workers", "2", "--target-top1", str(args.target_top1), *sweep_extra],
            os.path.join(args.work, f"{name}.sweep.log"))
        rows = results(sweep_dir)
        table[name] = {"rows": rows, "best": max(r["top1"] for r in rows),
                       "train_seconds": max(r["train_seconds"] for r in rows)}
    # Epochs are the load-independent figure: every variant runs the same steps per epoch, so on a shared machine
    # (where seconds drift with the load) epochs to the target compare the levers exactly; seconds are as measured.
    base = table["baseline"]
    base_hit = first_hit(base["rows"], base["best"])
    print(f"\nbaseline best top-1 {base['best']:.2%} at epoch {base_hit['epoch']:g}; fixed target "
          f"{args.target_top1:.0%}")
    print(f"{'variant':>12} {'best top-1':>10} {'epochs to base':>14} {'ratio':>6} {'s to base':>9} {'ratio':>6} "
          f"{'epochs to fixed':>15} {'train s':>8}")
    for name, t in table.items():
        hit, fixed = first_hit(t["rows"], base["best"]), first_hit(t["rows"], args.target_top1)
        epochs = f"{hit['epoch']:>14g} {hit['epoch'] / base_hit['epoch']:>6.2f}" if hit else f"{'-':>14} {'-':>6}"
        secs = (f"{hit['train_seconds']:>9.1f} {hit['train_seconds'] / base_hit['train_seconds']:>6.2f}" if hit
                else f"{'-':>9} {'-':>6}")
        print(f"{name:>12} {t['best']:>10.2%} {epochs} {secs} {fixed['epoch'] if fixed else '-':>15} "
              f"{t['train_seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
