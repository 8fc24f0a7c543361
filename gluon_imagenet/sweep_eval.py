"""Evaluate every checkpoint of a run over several devices and report the time to reach a target accuracy.

    python -m gluon_imagenet.sweep_eval --run-dir runs/imagenet104 --data-root recordio --gpus 0,1,2,3,4,5,6,7
    python -m gluon_imagenet.sweep_eval --run-dir runs/demo --workers 2 --target-top1 0.6
    python -m gluon_imagenet.sweep_eval --run-dir runs/imagenet104 --gpus 0,1 --watch   # while training runs

Device i takes checkpoints i, i+G, i+2G, ... (G devices), one process per device; each checkpoint is
evaluated on the whole validation set with a single center crop. With --size-policy phase (the default) a
checkpoint is evaluated at the image size of the phase it was trained in (times --eval-scale), from that
phase's packed data: a low-resolution checkpoint scores near zero at the final size. --size-policy fixed uses
one size for all (--image-size, default the recipe's eval_image_size), as the seed did.

Results go to RUN_DIR/sweep.json and sweep.csv as each checkpoint finishes, then sweep.png. A checkpoint
already evaluated with the same settings is not evaluated again. Reads only the run folder (run.json and the
checkpoints) and the packed data; it shares nothing with the training loop.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import queue
import sys
import time
from dataclasses import dataclass

from gluon_imagenet import checkpoint
from gluon_imagenet.files import atomic_open
from gluon_imagenet.recipe import packed_short_side

RESULT_FIELDS = ("checkpoint", "step", "epoch", "train_seconds", "wall_seconds", "image_size", "data_dir", "top1",
                 "top5", "images")


class SweepError(Exception):
    """Something to fix before evaluating."""


@dataclass(frozen=True)
class Job:
    checkpoint: str  # name, e.g. ckpt-00001302
    params_path: str
    model: str
    classes: int
    image_size: int
    data_dir: str
    record: dict

    @property
    def key(self) -> str:
        """What makes two evaluations of one checkpoint the same."""
        return f"{self.checkpoint}@{self.image_size}/{self.data_dir}"


# ------------------------------------------------------------------------------------------------ planning
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.sweep_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data-root", help="packed data root (default: the one the run trained on, from run.json)")
    devices = p.add_mutually_exclusive_group()
    devices.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: one worker process per GPU")
    devices.add_argument("--workers", type=int, default=1, help="CPU worker processes (default: 1)")
    p.add_argument("--size-policy", choices=("phase", "fixed"), default="phase")
    p.add_argument("--image-size", type=int, help="evaluation crop for --size-policy fixed (default: the recipe's)")
    p.add_argument("--eval-scale", type=float, default=1.0,
                   help="--size-policy phase: evaluate at the phase's size times this, rounded to a multiple of 8")
    p.add_argument("--crop-fraction", type=float, default=0.875,
                   help="center crop / resized short side (default: 0.875)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every", type=int, default=1, help="every K-th checkpoint")
    p.add_argument("--from-epoch", type=float, default=0.0, help="only checkpoints at or after this epoch")
    p.add_argument("--last", type=int, default=0, help="only the newest N checkpoints")
    p.add_argument("--target-top5", type=float, help="target top-5 accuracy, 0-1 (default 0.93 when no "
                   "--target-top1 is given)")
    p.add_argument("--target-top1", type=float, help="target top-1 accuracy, 0-1")
    p.add_argument("--watch", action="store_true", help="keep evaluating new checkpoints until the final one")
    p.add_argument("--poll-seconds", type=float, default=30.0)
    return p.parse_args(argv)


def read_run(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise SweepError(f"--run-dir {run_dir!r} does not exist")
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise SweepError(f"{path!r} does not exist: not a run folder written by gluon_imagenet.train")
    with open(path) as f:
        return json.load(f)


def round8(size: float) -> int:
    return max(8, int(round(size / 8)) * 8)


def eval_size(args, run: dict, record: dict) -> tuple[int, str]:
    """(crop size, packed data dir) for one checkpoint under the chosen size policy."""
    recipe = run["recipe"]
    last = recipe["phases"][-1]
    if args.size_policy == "fixed":
        size = args.image_size or recipe.get("eval_image_size") or last["image_size"]
        return size, recipe.get("eval_data_dir") or last["data_dir"]
    size = record["image_size"] if args.eval_scale == 1 else round8(record["image_size"] * args.eval_scale)
    return size, record["data_dir"]


def data_dir_for(data_root: str, size: int, preferred: str, crop_fraction: float) -> str:
    """The preferred packed dir when its images hold the crop, else the smallest packed one that holds the
    resized image (size / crop_fraction)."""
    def short(d):
        return packed_short_side(data_root, d) or 0

    if not os.path.isfile(os.path.join(data_root, preferred, "val.rec")):
        raise SweepError(f"no validation data {os.path.join(data_root, preferred, 'val.rec')!r}; pack the val "
                         "split with tools/im2rec_multi.py")
    if short(preferred) >= size:
        return preferred
    packed = sorted((d for d in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, d, "val.rec"))),
                    key=short)
    for d in packed:
        if short(d) >= size / crop_fraction:
            return d
    raise SweepError(f"no packed validation data under {data_root!r} holds a {size} px crop (data dir "
                     f"{preferred!r}: {short(preferred) or 'missing'}); pack a larger size with "
                     "tools/im2rec_multi.py --sizes")


def plan_jobs(args, run: dict, data_root: str) -> tuple[list[Job], list[tuple[str, str]]]:
    good, bad = checkpoint.scan(args.run_dir)
    selected = [c for c in good if c.record.get("epoch", 0) >= args.from_epoch][:: max(1, args.every)]
    if args.last:
        selected = selected[-args.last:]
    jobs = []
    for c in selected:
        size, preferred = eval_size(args, run, c.record)
        jobs.append(Job(c.name, c.params_path, c.record.get("model", run["model"]),
                        c.record.get("classes", len(run["classes"])), size,
                        data_dir_for(data_root, size, preferred, args.crop_fraction), c.record))
    return jobs, bad


def check_devices(args) -> list[str]:
    if args.gpus is None:
        if args.workers < 1:
            raise SweepError(f"--workers {args.workers}: must be >= 1")
        return ["cpu"] * args.workers
    try:
        ids = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise SweepError(f"--gpus {args.gpus!r}: expected GPU ids like 0,1,2,3") from None
    import mxnet as mx

    available = mx.context.num_gpus()
    missing = [g for g in ids if not 0 <= g < available]
    if not ids or missing:
        raise SweepError(f"--gpus {args.gpus}: GPU {missing or ids} does not exist here (MXNet sees {available} "
                         f"GPUs{': ids 0..' + str(available - 1) if available else ''}); on a CPU use --workers N")
    return [f"gpu:{g}" for g in ids]


# ------------------------------------------------------------------------------------------------ evaluating
def evaluate(net, ctx, data_root: str, data_dir: str, image_size: int, batch_size: int, threads: int,
             crop_fraction: float) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) over the whole validation set, each image counted exactly once."""
    import mxnet as mx

    from gluon_imagenet.data import packed_count, val_iterator

    total = packed_count(data_root, data_dir, "val")
    top1 = top5 = seen = 0
    iterator = val_iterator(data_root, data_dir, image_size, batch_size, threads, crop_fraction)
    for batch in iterator:
        # round_batch=False fills the last batch with stale samples and reports pad=0: count real ones here.
        real = min(batch_size, total - seen)
        if real <= 0:
            break
        scores = net(batch.data[0].as_in_context(ctx))[:real]
        labels = batch.label[0][:real].as_in_context(ctx).reshape((-1, 1))
        ranked = mx.nd.topk(scores, k=min(5, scores.shape[1]), ret_typ="indices").astype(labels.dtype)
        top1 += int((ranked[:, 0:1] == labels).sum().asscalar())
        top5 += int((ranked == labels).sum().asscalar())
        seen += real
    if seen != total:
        raise RuntimeError(f"evaluated {seen} validation images of {total} in {data_dir}")
    return top1, top5, seen


def worker_main(device: str, jobs: list[Job], data_root: str, batch_size: int, threads: int, crop_fraction: float,
                results) -> None:
    """One process per device: evaluate its checkpoints in order, put each result on the queue."""
    import mxnet as mx

    from gluon_imagenet.model import build_model

    ctx = mx.cpu() if device == "cpu" else mx.gpu(int(device.split(":")[1]))
    nets = {}
    for job in jobs:
        start = time.time()
        try:
            key = (job.model, job.classes)
            if key not in nets:
                nets[key] = build_model(job.model, job.classes)
                nets[key].hybridize(static_alloc=True, static_shape=True)
            net = nets[key]
            net.load_parameters(job.params_path, ctx=ctx)
            top1, top5, images = evaluate(net, ctx, data_root, job.data_dir, job.image_size, batch_size, threads,
                                          crop_fraction)
        except Exception as e:  # one bad checkpoint must not stop the others
            results.put(("error", job.key, f"{type(e).__name__}: {e}"))
            continue
        r = job.record
        results.put(("done", job.key, {
            "checkpoint": job.checkpoint, "step": r["step"], "epoch": round(r["epoch"], 4),
            "train_seconds": round(r["train_seconds"], 2), "wall_seconds": round(r["wall_seconds"], 2),
            "image_size": job.image_size, "data_dir": job.data_dir, "top1": top1 / images, "top5": top5 / images,
            "images": images, "eval_seconds": round(time.time() - start, 2), "device": device}))


def run_jobs(jobs: list[Job], devices: list[str], data_root: str, args, store: "ResultStore") -> list[str]:
    """Round-robin over devices; results stored as they arrive. Returns the errors."""
    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # a fresh MXNet engine per worker
    results = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    processes = []
    for i, device in enumerate(devices):
        share = jobs[i:: len(devices)]
        if share:
            proc = context.Process(target=worker_main, args=(device, share, data_root, args.batch_size, threads,
                                                             args.crop_fraction, results), daemon=True)
            proc.start()
            processes.append((proc, {j.key for j in share}))
    pending, errors = {j.key for j in jobs}, []
    bar = tqdm(total=len(jobs), desc="checkpoints", unit="ckpt", file=sys.stderr)
    images = 0
    start = time.time()
    while pending:
        try:
            kind, key, payload = results.get(timeout=5)
        except queue.Empty:
            for proc, keys in processes:
                lost = keys & pending
                if not proc.is_alive() and lost:  # a crashed worker: its other checkpoints are reported
                    for k in sorted(lost):
                        errors.append(f"{k}: worker on {proc.name} exited with code {proc.exitcode}")
                    pending -= lost
            continue
        pending.discard(key)
        if kind == "done":
            store.add(key, payload)
            images += payload["images"]
            bar.set_postfix_str(f"{images / (time.time() - start):.0f} img/s")
        else:
            errors.append(f"{key}: {payload}")
        bar.update()
    bar.close()
    for proc, _ in processes:
        proc.join(timeout=30)
    return errors


# ------------------------------------------------------------------------------------------------ reporting
class ResultStore:
    """sweep.json (every result, keyed by checkpoint and settings) and sweep.csv, rewritten atomically."""

    def __init__(self, run_dir: str):
        self.json_path = os.path.join(run_dir, "sweep.json")
        self.csv_path = os.path.join(run_dir, "sweep.csv")
        self.results: dict[str, dict] = {}
        if os.path.isfile(self.json_path):
            try:
                with open(self.json_path) as f:
                    self.results = json.load(f).get("results", {})
            except ValueError:
                self.results = {}  # a damaged store is rebuilt by evaluating again

    def add(self, key: str, row: dict) -> None:
        self.results[key] = row
        self._write_json()
        self._write_csv()

    def rows(self, keys) -> list[dict]:
        return sorted((self.results[k] for k in keys if k in self.results), key=lambda r: r["step"])

    def _write_json(self) -> None:
        with atomic_open(self.json_path) as f:
            json.dump({"results": self.results}, f, indent=1, sort_keys=True)

    def _write_csv(self) -> None:
        with atomic_open(self.csv_path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(self.results.values(), key=lambda r: (r["step"], r["image_size"])))


def time_to_accuracy(rows: list[dict], target_top5: float | None, target_top1: float | None) -> dict | None:
    """The first checkpoint (by step) reaching every given target."""
    for row in rows:
        if (target_top5 is None or row["top5"] >= target_top5) and (target_top1 is None or row["top1"] >= target_top1):
            return row
    return None


def format_table(rows: list[dict]) -> str:
    lines = [f"{'checkpoint':<14} {'epoch':>7} {'step':>7} {'train s':>9} {'size':>5} {'top-1':>7} {'top-5':>7} "
             f"{'images':>7}"]
    for r in rows:
        lines.append(f"{r['checkpoint']:<14} {r['epoch']:>7.2f} {r['step']:>7} {r['train_seconds']:>9.1f} "
                     f"{r['image_size']:>5} {r['top1']:>7.2%} {r['top5']:>7.2%} {r['images']:>7}")
    return "\n".join(lines)


def describe_target(target_top5, target_top1) -> str:
    parts = [f"top-5 >= {target_top5:.2%}" if target_top5 is not None else "",
             f"top-1 >= {target_top1:.2%}" if target_top1 is not None else ""]
    return " and ".join(p for p in parts if p)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, x_label in ((axes[0], "epoch", "epoch"), (axes[1], "train_seconds", "training time (s)")):
        x = [r[x_key] for r in rows]
        ax.plot(x, [r["top1"] for r in rows], "o-", label="top-1")
        ax.plot(x, [r["top5"] for r in rows], "s-", label="top-5")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path + ".partial.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".partial.png", path)


def report(args, store: ResultStore, jobs: list[Job]) -> None:
    rows = store.rows(j.key for j in jobs)
    if not rows:
        return
    print(format_table(rows))
    targets = (args.target_top5, args.target_top1)
    if targets == (None, None):
        targets = (0.93, None)  # the seed's goal
    hit = time_to_accuracy(rows, *targets)
    wanted = describe_target(*targets)
    if hit:
        print(f"time to {wanted}: {hit['train_seconds']:.1f} s of training ({hit['wall_seconds']:.1f} s wall), "
              f"step {hit['step']}, epoch {hit['epoch']:.2f}, {hit['checkpoint']} (top-1 {hit['top1']:.2%}, top-5 "
              f"{hit['top5']:.2%})")
    else:
        best = max(rows, key=lambda r: (r["top5"], r["top1"]))
        print(f"no checkpoint reached {wanted}: the best is {best['checkpoint']} (top-1 {best['top1']:.2%}, top-5 "
              f"{best['top5']:.2%})")
    plot(rows, os.path.join(args.run_dir, "sweep.png"), f"{args.run_dir}: {args.size_policy} size policy")
    print(f"results: {store.csv_path}, {store.json_path}, {os.path.join(args.run_dir, 'sweep.png')}")


# ------------------------------------------------------------------------------------------------ main
def sweep_once(args, jobs: list[Job], bad, data_root, devices, store) -> None:
    """Evaluate the planned checkpoints not evaluated yet; report the damaged ones."""
    for name, why in bad:
        print(f"skipping {name}: {why}", file=sys.stderr)
    todo = [j for j in jobs if j.key not in store.results]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} checkpoint(s) already evaluated with these settings")
    errors = run_jobs(todo, devices, data_root, args, store) if todo else []
    for line in errors:
        print(f"failed: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = read_run(args.run_dir)
        data_root = args.data_root or run.get("data_root") or "recordio"
        if not os.path.isdir(data_root):
            raise SweepError(f"data root {data_root!r} does not exist: pass --data-root")
        devices = check_devices(args)
        if not checkpoint.exists_any(args.run_dir) and not args.watch:
            raise SweepError(f"no checkpoints in {args.run_dir!r}")
        jobs, bad = plan_jobs(args, run, data_root)  # every selected checkpoint has its validation data
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Spread decode and compute threads over the worker processes (set before they start MXNet).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    store = ResultStore(args.run_dir)
    print(f"sweep {args.run_dir}: {len(devices)} worker(s) on {', '.join(sorted(set(devices)))}, size policy "
          f"{args.size_policy}, data {data_root}")
    sweep_once(args, jobs, bad, data_root, devices, store)
    while args.watch and not any(j.key in store.results and j.record.get("final") for j in jobs):
        time.sleep(args.poll_seconds)
        jobs, bad = plan_jobs(args, run, data_root)
        sweep_once(args, jobs, bad, data_root, devices, store)
    report(args, store, jobs)
    if not store.rows(j.key for j in jobs):
        print("error: no checkpoint could be evaluated", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
