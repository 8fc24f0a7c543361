"""Evaluate every checkpoint of a run over several devices and report the time to reach a target accuracy.

    python -m gluon_imagenet.sweep_eval --run-dir runs/imagenet104 --data-root recordio --gpus 0,1,2,3,4,5,6,7
    python -m gluon_imagenet.sweep_eval --run-dir runs/demo --workers 2 --target-top1 0.6
    python -m gluon_imagenet.sweep_eval --run-dir runs/imagenet104 --gpus 0,1 --watch   # while training runs

Device i takes checkpoints i, i+G, i+2G, ... (G devices), one process per device; each checkpoint is
evaluated on the whole validation set with a single center crop. With --size-policy phase (the default) a
checkpoint is evaluated at the image size of the phase it was trained in (times --eval-scale), from that
phase's packed data: a low-resolution checkpoint scores near zero at the final size. --size-policy fixed uses
one size for all (--image-size, default the recipe's eval_image_size), as the seed did.

Evaluation is a search over settings, each its own result: --eval-scales 1.0,1.15,1.3 (each scale of the
checkpoint's size, rounded to a multiple of 8, read from the smallest packed size that holds it; --eval-scale X is
the one-element case), --flip (also the mean of the softmax of each image and its mirror: the same decoded batch
flipped on the device, one more forward pass) and --weights raw|ema|both (the EMA weights saved beside a
checkpoint as <prefix>.ema.params; default both when a checkpoint has them). The table, CSV and plot show per
checkpoint the default setting (x1, no flip, raw weights) and the best one, named; the time to the target for both.

Results go to RUN_DIR/sweep.json and sweep.csv as each checkpoint finishes, then sweep.png (accuracy against
training minutes, phases and target marked). A result is reused only for the same checkpoint file (its SHA-256)
evaluated with the same settings (size, data root and packed data, crop fraction, batch size, scale, flip,
weights and the EMA file's SHA-256); a retrained
checkpoint or another setting is evaluated again. Several sweeps may run on one run folder at once: each write
merges into sweep.json under RUN_DIR/sweep.lock. Results of checkpoints no longer in RUN_DIR are dropped (said so).
A data root whose classes.txt differs from run.json's classes is refused; every result names its data root and
that data's identity. With 5 classes or fewer top-5 is 100% for any network: it is shown as n/a, the default
target is top-1, and --target-top5 is refused. Ctrl-C / SIGTERM: one line, exit 130 / 143, workers ended.

--watch evaluates new checkpoints as training writes them, verifying each checkpoint's files once, and ends when
the final checkpoint (the plan's last step) has been handled, or when no trainer holds RUN_DIR/train.lock and
nothing is left to evaluate. A mid-epoch checkpoint deleted by the trainer's retention (--keep-mid-epoch) while
the sweep looks at it is reported as pruned, and the watch goes on. Reads only the run folder (run.json and the
checkpoints) and the packed data; it shares nothing with the training loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time

from gluon_imagenet import best, checkpoint, locks, packed, retention, stops
from gluon_imagenet.devices import Device, decode_threads, usable_cpus
from gluon_imagenet.eval_settings import (DEFAULT_CROP_FRACTION, EMA_EXT, WEIGHTS, SettingsError, describe_setting,
                                          ema_problem, is_default, parse_scales, setting_of, weights_for)
from gluon_imagenet.packed import holds, packed_short_side, read_meta
from gluon_imagenet.rundir import TRAIN_LOCK, RunDirError, RunRecord
from gluon_imagenet.sweep_jobs import Job, count_hits, count_hits_per_flip, flip_averaged  # noqa: F401
from gluon_imagenet.sweep_results import REQUIRED_FIELDS, RESULT_FIELDS, ResultStore  # noqa: F401
from gluon_imagenet.sweep_report import (SEED_TARGET_TOP1, SEED_TARGET_TOP5, best_row, describe_target,  # noqa: F401
                                         format_table, plot, plot_data, ranking_metric, resolve_targets,
                                         time_to_accuracy)



class SweepError(Exception):
    """Something to fix before evaluating."""


# ------------------------------------------------------------------------------------------------ checking
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
    p.add_argument("--eval-scales", help="evaluate each checkpoint at its size (the phase's, or the fixed one) times "
                   "each of these factors, e.g. 1.0,1.15,1.3, rounded to a multiple of 8; each is its own result "
                   "(default: 1)")
    p.add_argument("--eval-scale", type=float, help="one factor: the same as --eval-scales with one value")
    p.add_argument("--flip", action="store_true", help="also evaluate every setting averaging the softmax of each "
                   "image and its horizontal mirror (one more forward pass of the same decoded batch)")
    p.add_argument("--weights", choices=WEIGHTS, help="raw (.params), ema (the EMA weights saved beside it) or both "
                   "(default: both when a checkpoint has EMA weights, else raw)")
    p.add_argument("--crop-fraction", type=float, default=DEFAULT_CROP_FRACTION,
                   help=f"center crop / resized short side, in (0, 1] (default: {DEFAULT_CROP_FRACTION:g})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every", type=int, default=1, help="every K-th checkpoint")
    p.add_argument("--from-epoch", type=float, default=0.0, help="only checkpoints at or after this epoch")
    p.add_argument("--last", type=int, help="only the newest N checkpoints")
    p.add_argument("--target-top5", type=float, help="target top-5 accuracy, 0-1 (default 0.93 when no "
                   "--target-top1 is given; refused with 5 classes or fewer, where top-5 is 100%% for any network and "
                   f"the default target is top-1 >= {SEED_TARGET_TOP1:g})")
    p.add_argument("--target-top1", type=float, help="target top-1 accuracy, 0-1. The best checkpoint, named when "
                   f"no checkpoint reaches the targets and used by export --best: {best.RULE_HELP}, METRIC being "
                   "top-1 when a top-1 target is given, else top-5")
    p.add_argument("--watch", action="store_true", help="keep evaluating new checkpoints until the final one, or "
                   "until training stops")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="--watch: seconds between looks for new "
                   "checkpoints")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Values that mean nothing are refused by name, before anything is read."""
    rules = [
        ("--workers", args.workers, args.gpus is None and args.workers < 1, "a whole number >= 1"),
        ("--image-size", args.image_size, args.image_size is not None and args.image_size < 1,
         "a crop size in pixels, >= 1"),
        ("--eval-scale", args.eval_scale, args.eval_scale is not None and not args.eval_scale > 0,
         "a factor > 0 (1 = the checkpoint's own size)"),
        ("--crop-fraction", args.crop_fraction, not 0 < args.crop_fraction <= 1,
         f"in (0, 1], e.g. {DEFAULT_CROP_FRACTION:g}"),
        ("--batch-size", args.batch_size, args.batch_size < 1, "a whole number >= 1"),
        ("--every", args.every, args.every < 1, "a whole number >= 1 (1 = every checkpoint)"),
        ("--last", args.last, args.last is not None and args.last < 1,
         "a whole number >= 1 (leave it out for all checkpoints)"),
        ("--from-epoch", args.from_epoch, not args.from_epoch >= 0, "an epoch >= 0"),
        ("--target-top5", args.target_top5, args.target_top5 is not None and not 0 <= args.target_top5 <= 1,
         "an accuracy in [0, 1], e.g. 0.93 for 93%"),
        ("--target-top1", args.target_top1, args.target_top1 is not None and not 0 <= args.target_top1 <= 1,
         "an accuracy in [0, 1], e.g. 0.759 for 75.9%"),
        ("--poll-seconds", args.poll_seconds, not args.poll_seconds > 0, "seconds > 0"),
    ]
    for flag, value, bad, allowed in rules:
        if bad:
            raise SweepError(f"{flag} {value:g}: must be {allowed}")
    if args.eval_scale is not None and args.eval_scales is not None:
        raise SweepError(f"--eval-scale {args.eval_scale:g} and --eval-scales {args.eval_scales}: give one of them "
                         "(--eval-scale X is --eval-scales X)")
    try:
        args.scales = parse_scales(args.eval_scales) if args.eval_scales is not None else (args.eval_scale or 1.0,)
    except SettingsError as e:
        raise SweepError(str(e)) from None
    args.eval_scale = args.scales[0]  # the setting the TensorBoard run is named after and shows


def check_from_epoch(args, run: RunRecord) -> None:
    if args.from_epoch > run.last_epoch:
        raise SweepError(f"--from-epoch {args.from_epoch:g}: the recipe ends at epoch {run.last_epoch:g}, so no "
                         f"checkpoint would ever be selected; use an epoch in [0, {run.last_epoch:g}]")


def round8(size: float) -> int:
    return max(8, int(round(size / 8)) * 8)


def eval_size(args, run: RunRecord, trained, scale: float | None = None) -> tuple[int, str]:
    """(crop size, preferred packed data dir) for one checkpoint under the chosen size policy, times `scale`
    (default: the first of --eval-scales). `trained`: what the checkpoint was trained at, its record
    (checkpoint.Record) or its phase in run.json (rundir.PlannedPhase): both have image_size and data_dir."""
    scale = args.scales[0] if scale is None else scale
    if args.size_policy == "fixed":
        size, preferred = run.evaluation_defaults()  # resolved when run.json was written
        base = args.image_size or size
    else:
        base, preferred = trained.image_size, trained.data_dir
    return (base if scale == 1 else round8(base * scale)), preferred


def data_dir_for(data_root: str, size: int, preferred: str, crop_fraction: float) -> str:
    """The preferred packed dir when its images hold the crop, else the smallest packed one that holds the
    resized image (size / crop_fraction)."""
    def short(d):
        return packed_short_side(data_root, d) or 0

    def holds_size(d, pixels):
        return holds(packed_short_side(data_root, d), pixels)

    if not os.path.isfile(os.path.join(data_root, preferred, "val.rec")):
        raise SweepError(f"no validation data {os.path.join(data_root, preferred, 'val.rec')!r}; pack the val "
                         "split with tools/im2rec_multi.py")
    if holds_size(preferred, size):
        return preferred
    packed = sorted((d for d in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, d, "val.rec"))),
                    key=short)
    for d in packed:
        if holds_size(d, size / crop_fraction):
            return d
    raise SweepError(f"no packed validation data under {data_root!r} holds a {size} px crop (data dir "
                     f"{preferred!r}: {short(preferred) or 'missing'}); pack a larger size with "
                     "tools/im2rec_multi.py --sizes")


def check_phase_data(args, run: RunRecord, data_root: str) -> None:
    """--watch: every phase's validation data exists before the first checkpoint of it is written."""
    for phase in run.phases:
        for scale in args.scales:
            size, preferred = eval_size(args, run, phase, scale)
            data_dir_for(data_root, size, preferred, args.crop_fraction)


def check_classes(run: RunRecord, data_root: str) -> None:
    """The data root's classes are the run's, in the same order: a network scored against other labels gives
    numbers that look like accuracy and mean nothing."""
    try:
        theirs = packed.read_classes(data_root)
    except packed.PackError:
        print(f"warning: {os.path.join(data_root, 'classes.txt')} does not exist (not packed by im2rec_multi): "
              "cannot check that its classes are the run's", file=sys.stderr)
        return
    mine = list(run.classes or [])
    if theirs == mine:
        return
    differ = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))

    def at(names):
        return repr(names[differ]) if differ < len(names) else "nothing"

    raise SweepError(f"data root {data_root!r} holds {len(theirs)} classes, the run trained on {len(mine)} (run.json); "
                     f"class {differ} is {at(theirs)} there and {at(mine)} in the run: pass the --data-root the run "
                     f"was trained on ({run.data_root or 'see run.json'}) or one packed from the same class "
                     "folders")


def data_identity(data_root: str, data_dir: str) -> str:
    """The packed validation split's identity (packed.data_identity)."""
    return packed.data_identity(data_root, data_dir, "val")


class Verifier:
    """checkpoint.scan that hashes each checkpoint once per process. --watch looks every 30 s; re-hashing every
    checkpoint each time reads the whole run (8 GB for an ImageNet run) from a shared file system again. A
    checkpoint is verified again only when one of its files is new or changed (size, mtime or inode: the trainer
    replaces files by renaming, so a rewritten file is a new inode)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._known: dict[str, tuple] = {}  # name -> (file stamps, (checkpoint or None, problem))
        self._had_record: set[str] = set()  # names seen with their record: one without it now was pruned
        self._ema_known: dict[str, tuple] = {}  # name -> (file stamps, problem of its EMA file)

    def _stamp(self, name: str) -> tuple:
        stamps = []
        for ext in (".json", ".params", ".states", EMA_EXT):
            try:
                st = os.stat(os.path.join(self.run_dir, name + ext))
                stamps.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def scan(self) -> tuple[list[checkpoint.Checkpoint], list[tuple[str, str]]]:
        """(intact checkpoints, [(name, problem)]) sorted by step, like checkpoint.scan."""
        good, bad = [], []
        # checkpoint's own listing and check, so both readers agree on what a checkpoint is.
        for name, record_path in checkpoint.candidates(self.run_dir):
            stamp = self._stamp(name)  # before hashing: a file changed meanwhile differs at the next look
            known = self._known.get(name)
            if known and known[0] == stamp:
                ckpt, why = known[1]
            else:
                # The raw weights are evaluated even when the EMA file is damaged: that is checked on its own.
                ckpt, why = checkpoint.check(name, record_path, required_only=True)
                if ckpt is None and retention.was_pruned(record_path, name in self._had_record):
                    why = retention.PRUNED
                self._known[name] = (stamp, (ckpt, why))
            if record_path is not None:
                self._had_record.add(name)
            if ckpt:
                good.append(ckpt)
            else:
                bad.append((name, why))
        return good, bad

    def ema_problem(self, ckpt: checkpoint.Checkpoint) -> str:
        """ema_settings.ema_problem, hashed once per version of the files (like scan)."""
        stamp = self._stamp(ckpt.name)
        known = self._ema_known.get(ckpt.name)
        if not known or known[0] != stamp:
            known = self._ema_known[ckpt.name] = (stamp, ema_problem(ckpt))
        return known[1]


def select(args, good: list) -> list:
    selected = [c for c in good if (c.record.epoch or 0) >= args.from_epoch][:: args.every]
    return selected[-args.last:] if args.last else selected


def plan_jobs(args, run: RunRecord, data_root: str, verifier: Verifier | None = None):
    """(jobs for the selected checkpoints, [(name, problem)] for damaged ones, every intact checkpoint)."""
    verifier = verifier or Verifier(args.run_dir)
    good, bad = verifier.scan()
    root = os.path.abspath(data_root)
    flips = (False, True) if getattr(args, "flip", False) else (False,)
    scales = getattr(args, "scales", None) or (1.0,)
    jobs = []
    for c in select(args, good):
        weights, why = weights_for(getattr(args, "weights", None), c.record)
        if "ema" in weights:
            problem = verifier.ema_problem(c)
            if problem:
                weights, why = [w for w in weights if w != "ema"], problem
        if why:  # the checkpoint's EMA weights only: its raw weights are still evaluated unless --weights ema
            bad.append((f"the EMA weights of {c.name}" if weights else c.name, why))
        sizes = {}  # two scales rounding to one size are one evaluation: the first scale names it
        for scale in scales:
            size, preferred = eval_size(args, run, c.record, scale)
            sizes.setdefault(size, (scale, preferred))
        for size, (scale, preferred) in sizes.items():
            data_dir = data_dir_for(data_root, size, preferred, args.crop_fraction)
            for w in weights:
                classes = c.record.classes if c.record.recorded("classes") else len(run.classes or [])
                jobs.append(Job(c.name, c.params_path, c.record.model if c.record.recorded("model") else run.model,
                                classes, size, data_dir, c.record,
                                args.crop_fraction, args.batch_size, root, data_identity(data_root, data_dir),
                                scale, flips, w))
    return jobs, bad, good


def check_devices(args) -> list[Device]:
    if args.gpus is None:
        return [Device("cpu")] * args.workers
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
    return [Device("gpu", g) for g in ids]


# ------------------------------------------------------------------------------------------------ evaluating
class Evaluator:
    """One worker's networks and validation iterators, kept for all its checkpoints.

    One iterator per (data dir, size, batch size, crop), reset between checkpoints: re-creating ImageRecordIter
    leaks about its prefetch buffers each time (apache/mxnet#15218; bench/sweep_memory.py measures it), which
    over hundreds of checkpoints at ImageNet batch sizes is gigabytes per worker. The iterator pins its batches
    for the worker's own GPU (device_id), so a worker never opens a CUDA context on GPU 0."""

    def __init__(self, device: Device, threads: int):
        self.device = device
        self.ctx = device.context
        self.threads = threads
        self.nets: dict[tuple, object] = {}
        self.iterators: dict[tuple, tuple] = {}  # key -> (iterator, images in the split)

    def net(self, model: str, classes: int):
        from gluon_imagenet.model import build_model

        if (model, classes) not in self.nets:
            net = build_model(model, classes)
            net.hybridize(static_alloc=True, static_shape=True)
            self.nets[(model, classes)] = net
        return self.nets[(model, classes)]

    def iterator(self, data_root: str, data_dir: str, image_size: int, batch_size: int, crop_fraction: float):
        from gluon_imagenet.data import packed_count, val_iterator

        key = (data_root, data_dir, image_size, batch_size, crop_fraction)
        if key not in self.iterators:
            self.iterators[key] = (val_iterator(data_root, data_dir, image_size, batch_size, self.threads,
                                                crop_fraction, device_id=self.device.iterator_device_id),
                                   packed_count(data_root, data_dir, "val"))
        iterator, total = self.iterators[key]
        iterator.reset()  # also after a pass that stopped early (an error in the previous checkpoint)
        return iterator, total

    def evaluate(self, job: Job) -> dict:
        """The result of the job's first flip setting (see evaluate_all)."""
        return self.evaluate_all(job)[0][1]

    def evaluate_all(self, job: Job) -> list[tuple[str, dict]]:
        """[(key, result)] for each of the job's flip settings, from one pass over the validation data."""
        start = time.time()
        net = self.net(job.model, job.classes)
        net.load_parameters(job.weights_path, ctx=self.ctx)
        iterator, total = self.iterator(job.data_root, job.data_dir, job.image_size, job.batch_size,
                                        job.crop_fraction)
        counted = count_hits_per_flip(net, self.ctx, iterator, total, job.batch_size, job.flips)
        seconds = round(time.time() - start, 2)
        r = job.record
        rows = []
        for flip, (top1, top5, images) in zip(job.flips, counted):
            if images != total:
                raise RuntimeError(f"evaluated {images} validation images of {total} in {job.data_dir}")
            rows.append((job.key_for(flip), {
                "checkpoint": job.checkpoint, "step": r.step, "epoch": round(r.epoch, 4),
                "train_seconds": round(r.train_seconds, 2), "wall_seconds": round(r.wall_seconds, 2),
                "image_size": job.image_size, "data_dir": job.data_dir, "crop_fraction": job.crop_fraction,
                "batch_size": job.batch_size, "data_root": job.data_root, "data_id": job.data_id,
                "eval_scale": job.eval_scale, "flip": flip, "weights": job.weights, "ema_sha256": job.ema_sha256,
                "params_sha256": job.params_sha256, "top1": top1 / images, "top5": top5 / images, "images": images,
                "classes": job.classes, "top5_meaningful": best.top5_meaningful(job.classes),
                "eval_seconds": seconds, "device": str(self.device)}))
        return rows


def worker_main(device: Device, jobs: list[Job], threads: int, results) -> None:
    """One process per device: evaluate its checkpoints in order, put each result on the queue."""
    stops.ignore_in_child()
    evaluator = Evaluator(device, threads)
    for job in jobs:
        try:
            rows = evaluator.evaluate_all(job)
        except Exception as e:  # one bad checkpoint must not stop the others
            pruned = retention.was_pruned(job.params_path[: -len(".params")] + ".json", True)
            for key in job.keys:
                if pruned:
                    results.put(("pruned", key, retention.PRUNED))
                else:
                    results.put(("error", key, f"{type(e).__name__}: {e}"))
            continue
        for key, row in rows:
            results.put(("done", key, row))


def start_worker(proc) -> None:
    """Start with SIGINT and SIGTERM blocked: the spawned interpreter inherits the mask, so a Ctrl-C reaching the
    process group while it imports MXNet (before it can ignore signals) prints no traceback of its own; a stop
    arriving meanwhile waits here and is raised once they are unblocked."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops.SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def run_jobs(jobs: list[Job], devices: list[Device], store: "ResultStore", board=None,
             board_scale: float = 1.0) -> tuple[dict[str, str], dict[str, str]]:
    """Round-robin over devices; results stored (and drawn on the TensorBoard `board`) as they arrive. Returns
    (errors, pruned checkpoints) by job key.
    On any way out (a stop included) the workers are killed: they ignore SIGINT and SIGTERM."""
    context = multiprocessing.get_context("spawn")  # a fresh MXNet engine per worker
    results = context.Queue()
    threads = decode_threads(len(devices)).threads  # the trainer's and the doctor's rule
    processes = []
    try:
        for i, device in enumerate(devices):
            share = jobs[i:: len(devices)]
            if share:
                proc = context.Process(target=worker_main, args=(device, share, threads, results), daemon=True)
                start_worker(proc)
                processes.append((proc, {k for j in share for k in j.keys}))
        return collect(jobs, processes, results, store, board, board_scale)
    finally:
        for proc, _ in processes:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)


def collect(jobs: list[Job], processes: list, results, store: "ResultStore", board=None, board_scale: float = 1.0):
    from tqdm import tqdm

    pending, errors, pruned = {k for j in jobs for k in j.keys}, {}, {}
    with tqdm(total=len(pending), desc="checkpoints", unit="result", file=sys.stderr) as bar:  # closed before a stop's line
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
                            errors[k] = f"worker on {proc.name} exited with code {proc.exitcode}"
                        pending -= lost
                continue
            pending.discard(key)
            if kind == "done":
                store.add(key, payload)
                if board is not None and setting_of(payload) == (board_scale, False, "raw"):
                    board.add(payload)  # one curve: the first scale's, raw weights, no flip
                if not payload["flip"]:  # one decode per image, whatever the flips
                    images += payload["images"]
                bar.set_postfix_str(f"{images / (time.time() - start):.0f} img/s")
            else:
                (pruned if kind == "pruned" else errors)[key] = payload
            bar.update()
    for proc, _ in processes:
        proc.join(timeout=30)
    return errors, pruned


# ------------------------------------------------------------------------------------------------ reporting
def targets_for(args, classes: int) -> tuple[float | None, float | None]:
    """The targets to report on; a top-5 target with 5 classes or fewer is refused (any network reaches it), and
    the default target is then top-1 (said so)."""
    if best.top5_meaningful(classes):
        return resolve_targets(args.target_top5, args.target_top1)
    if args.target_top5 is not None:
        raise SweepError(f"--target-top5 {args.target_top5:g}: the run has {classes} classes, so top-5 is 100% for "
                         "any network and the target means nothing; give --target-top1 instead")
    targets = resolve_targets(None, args.target_top1, classes)
    if args.target_top1 is None:
        print(f"with {classes} classes top-5 is 100% for any network: the target is top-1 >= {targets[1]:.2%} "
              "(choose one with --target-top1)")
    return targets


def accuracies(row: dict, top5_meaningful: bool) -> str:
    top5 = f"{row['top5']:.2%}" if top5_meaningful else "n/a"
    return f"top-1 {row['top1']:.2%}, top-5 {top5}"


def report(args, run: RunRecord, store: ResultStore, jobs: list[Job], targets: tuple) -> None:
    """The table (per checkpoint: the default setting and the best one), the time to the targets of both, the
    best result, sweep.png."""
    rows = store.rows(k for j in jobs for k in j.keys)
    if not rows:
        return
    top5_meaningful = best.top5_meaningful(len(run.classes or []))
    metric = ranking_metric(*targets)
    print(format_table(rows, top5_meaningful, metric))
    wanted = describe_target(*targets)
    store.set_ranked_by(metric)  # export --best ranks as this report does
    several = any(not is_default(r) for r in rows)
    series = [("default setting (x1 raw, no flip)", [r for r in rows if is_default(r)]),
              ("best setting per checkpoint", rows)] if several else [("", rows)]
    for label, chosen_rows in series:
        hit = time_to_accuracy(chosen_rows, *targets)
        of = f" ({label})" if label else ""
        if hit:
            setting = f", setting {describe_setting(hit)}" if several else ""
            print(f"time to {wanted}{of}: {hit['train_seconds']:.1f} s of training ({hit['wall_seconds']:.1f} s "
                  f"wall), step {hit['step']}, epoch {hit['epoch']:.2f}, {hit['checkpoint']}{setting} "
                  f"({accuracies(hit, top5_meaningful)})")
        elif label and chosen_rows:
            print(f"time to {wanted}{of}: not reached")
    if not time_to_accuracy(rows, *targets):
        chosen = best_row(rows, *targets)
        setting = f"setting {describe_setting(chosen)}, " if several else ""
        print(f"no checkpoint reached {wanted}: the best is {chosen['checkpoint']} "
              f"({setting}{accuracies(chosen, top5_meaningful)}; {best.describe(metric)})")
    elif several:
        chosen = best_row(rows, *targets)
        print(f"the best result: {chosen['checkpoint']} with setting {describe_setting(chosen)} "
              f"({accuracies(chosen, top5_meaningful)}; {best.describe(metric)})")
    png = os.path.join(args.run_dir, "sweep.png")
    plot(plot_data(rows, run, targets, f"{args.run_dir}: {args.size_policy} size policy, center crop "
                   f"{args.crop_fraction:g}", top5_meaningful), png)
    print(f"results: {store.csv_path}, {store.json_path}, {png}")


# ------------------------------------------------------------------------------------------------ main
class Sweep:
    """One sweep's state across --watch polls: what was verified, evaluated, failed and already said."""

    def __init__(self, args, run: RunRecord, data_root: str, devices: list[Device]):
        self.args, self.run, self.data_root, self.devices = args, run, data_root, devices
        self.verifier = Verifier(args.run_dir)
        self.store: ResultStore | None = None
        self.jobs: list[Job] = []
        self.bad: dict[str, str] = {}
        self.good: list = []
        self.failed: dict[str, str] = {}  # job key -> error: not tried again while watching
        self.said: set = set()
        self.passes = 0
        self.trainer: dict | None = None  # the train.lock holder seen before the last scan
        self.board = None  # tensorboard.SweepBoard

    def plan(self) -> None:
        self.jobs, bad, self.good = plan_jobs(self.args, self.run, self.data_root, self.verifier)
        self.bad = dict(bad)

    def say_once(self, line: str, file=sys.stdout) -> None:
        if line not in self.said:
            self.said.add(line)
            print(line, file=file, flush=True)

    def evaluate(self) -> None:
        """Evaluate the planned checkpoints not evaluated (or failed) yet; report the damaged and pruned ones."""
        for name, why in self.bad.items():
            if why.startswith("partial") and self.trainer is not None:
                if self.args.watch:
                    continue  # being saved or being pruned: the next look tells which
                why = "no .json record yet: the running trainer is saving it or pruning it"
            self.say_once(f"skipping {name}: {why}", file=sys.stderr)
        self.store.current = {c.name: c.record.params_sha256 for c in self.good}
        self.store.existing = {name for name, _ in checkpoint.candidates(self.args.run_dir)}
        gone = self.store.drop_gone()
        if gone:
            print(f"dropped the results of {len(gone)} checkpoint(s) no longer in {self.args.run_dir} (deleted or "
                  f"pruned by the trainer's retention): {', '.join(gone)}")
        todo = []
        for j in self.jobs:  # only the flip settings not evaluated yet (one pass gives both anyway)
            flips = tuple(f for f in j.flips
                          if j.key_for(f) not in self.store.results and j.key_for(f) not in self.failed)
            if flips:
                todo.append(dataclasses.replace(j, flips=flips))
        done = {j.checkpoint for j in self.jobs} - {j.checkpoint for j in todo}
        if done and not self.passes:
            print(f"{len(done)} checkpoint(s) already evaluated with these settings")
        self.passes += 1
        errors, pruned = (run_jobs(todo, self.devices, self.store, self.board, self.args.scales[0]) if todo
                          else ({}, {}))
        for key, why in errors.items():
            print(f"failed: {key}: {why}", file=sys.stderr)
        for key, why in pruned.items():
            print(f"skipping {key.split('@')[0]}: {why} while being evaluated", file=sys.stderr)
        self.failed.update(errors)
        self.failed.update(pruned)

    def watch_end(self, trainer: dict | None) -> str:
        """Why --watch stops now, or "" to keep waiting. `trainer` is the train.lock holder seen before the
        last scan, so a final checkpoint written before the trainer exited has been seen."""
        name = os.path.basename(checkpoint.prefix_for(self.args.run_dir, self.run.final_step))
        if name in {c.name for c in self.good}:
            job = next((j for j in self.jobs if j.checkpoint == name), None)
            if job is None:
                return f"the final checkpoint {name} is there (not in the selection of checkpoints to evaluate)"
            if job.key in self.failed:
                return f"the final checkpoint {name} could not be evaluated: {self.failed[job.key]}"
            return f"the final checkpoint {name} is evaluated"
        # A final checkpoint without its record may still be being written while the trainer runs.
        if name in self.bad and not (trainer is not None and self.bad[name].startswith("partial")):
            return f"the final checkpoint {name} is damaged ({self.bad[name]})"
        if trainer is None:
            return (f"training is not running (no process holds {os.path.join(self.args.run_dir, TRAIN_LOCK)}) "
                    f"and the final checkpoint {name} (step {self.run.final_step}) is missing: resume the training "
                    "run, then sweep again")
        return ""

    def waiting_for(self, trainer: dict) -> str:
        name = os.path.basename(checkpoint.prefix_for(self.args.run_dir, self.run.final_step))
        newest = self.good[-1].name if self.good else "none yet"
        return (f"waiting for the final checkpoint {name} (newest intact: {newest}); training is running (pid "
                f"{trainer.get('pid', '?')} on {trainer.get('host', '?')}); looking again every "
                f"{self.args.poll_seconds:g} s")


def trainer_holding(run_dir: str) -> dict | None:
    return locks.holder(os.path.join(run_dir, TRAIN_LOCK))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM: one line, exit 130/143; the workers are killed and sweep.lock released on the way out.
    saved = {s: signal.getsignal(s) for s in stops.SIGNALS}
    try:
        with stops.clean_stop("sweep_eval"):
            return sweep_main(args)
    finally:  # a caller in the same process (a test, a notebook) gets its own handlers back
        for s, handler in saved.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(s, handler)


def sweep_main(args) -> int:
    try:
        check_args(args)
        run = RunRecord.read(args.run_dir)
        check_from_epoch(args, run)
        data_root = args.data_root or run.data_root or "recordio"
        if not os.path.isdir(data_root):
            raise SweepError(f"data root {data_root!r} does not exist: pass --data-root")
        check_classes(run, data_root)
        targets = targets_for(args, len(run.classes or []))
        devices = check_devices(args)
        if not checkpoint.exists_any(args.run_dir) and not args.watch:
            raise SweepError(f"no checkpoints in {args.run_dir!r}")
        if args.watch:
            check_phase_data(args, run, data_root)
        sweep = Sweep(args, run, data_root, devices)
        trainer = sweep.trainer = trainer_holding(args.run_dir)  # before the scan: see Sweep.watch_end
        sweep.plan()  # every selected checkpoint has its validation data
    except (SweepError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Spread decode and compute threads over the worker processes (set before they start MXNet).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus()[0] // len(devices))))
    sweep.store = ResultStore(args.run_dir)
    from gluon_imagenet.tensorboard import open_sweep_board

    sweep.board = open_sweep_board(run, args.run_dir, args)
    print(f"sweep {args.run_dir}: {len(devices)} worker(s) on {', '.join(sorted(set(map(str, devices))))}, size "
          f"policy {args.size_policy}, data {data_root}")
    sweep.evaluate()
    while args.watch:
        why = sweep.watch_end(trainer)
        if why:
            print(f"watch ends: {why}", flush=True)
            break
        sweep.say_once(sweep.waiting_for(trainer))
        time.sleep(args.poll_seconds)
        trainer = sweep.trainer = trainer_holding(args.run_dir)
        try:
            sweep.plan()
        except (SweepError, RunDirError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sweep.evaluate()
    report(args, run, sweep.store, sweep.jobs, targets)
    if not sweep.store.rows(k for j in sweep.jobs for k in j.keys):
        print("error: no checkpoint could be evaluated", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
