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
import os
import signal
import sys
import threading
import time

from gluon_imagenet import best, checkpoint, locks, stops
from gluon_imagenet.data.images import DEFAULT_CROP_FRACTION
from gluon_imagenet.devices import Device, usable_cpus
from gluon_imagenet.rundir import TRAIN_LOCK, RunDirError, RunRecord
from gluon_imagenet.sweep_eval.evaluate import run_jobs
from gluon_imagenet.sweep_eval.jobs import Job
from gluon_imagenet.sweep_eval.options import SweepOptions
from gluon_imagenet.sweep_eval.plan import (SweepError, check_classes, check_devices, check_from_epoch,
                                            check_phase_data, plan_jobs)
from gluon_imagenet.sweep_eval.report import SEED_TARGET_TOP1, report, targets_for
from gluon_imagenet.sweep_eval.results import ResultStore
from gluon_imagenet.sweep_eval.settings import WEIGHTS, SettingsError, parse_scales
from gluon_imagenet.sweep_eval.verify import Verifier


# ------------------------------------------------------------------------------------------------ checking
def parse_args(argv) -> SweepOptions:
    """The checked options (SweepError names a value that means nothing); argparse exits on a malformed one."""
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.sweep_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by gluon_imagenet.train (run.json and the "
                   "checkpoints); the results go to RUN_DIR/sweep.json, sweep.csv and sweep.png")
    p.add_argument("--data-root", help="packed data root (default: the one the run trained on, from run.json)")
    devices = p.add_mutually_exclusive_group()
    devices.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: one worker process per GPU")
    devices.add_argument("--workers", type=int, default=1, help="CPU worker processes (default: 1)")
    p.add_argument("--size-policy", choices=("phase", "fixed"), default="phase",
                   help="phase: each checkpoint at the image size of the phase it was trained in, from that phase's "
                   "packed data; fixed: one size for all, --image-size (default: %(default)s)")
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
    p.add_argument("--batch-size", type=int, default=64,
                   help="validation images per forward pass of each worker (default: %(default)s)")
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
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> SweepOptions:
    """Values that mean nothing are refused by name, before anything is read; the options, with the scales
    parsed from --eval-scales or --eval-scale, once."""
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
        scales = parse_scales(args.eval_scales) if args.eval_scales is not None else (args.eval_scale or 1.0,)
    except SettingsError as e:
        raise SweepError(str(e)) from None
    given = {name: value for name, value in vars(args).items() if name not in ("eval_scales", "eval_scale")}
    return SweepOptions(**given, scales=scales)


# ------------------------------------------------------------------------------------------------ main
class Sweep:
    """One sweep's state across --watch polls: what was verified, evaluated, failed and already said."""

    def __init__(self, options: SweepOptions, run: RunRecord, data_root: str, devices: list[Device]):
        self.options, self.run, self.data_root, self.devices = options, run, data_root, devices
        self.verifier = Verifier(options.run_dir)
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
        self.jobs, bad, self.good = plan_jobs(self.options, self.run, self.data_root, self.verifier)
        self.bad = dict(bad)

    def say_once(self, line: str, file=sys.stdout) -> None:
        if line not in self.said:
            self.said.add(line)
            print(line, file=file, flush=True)

    def evaluate(self) -> None:
        """Evaluate the planned checkpoints not evaluated (or failed) yet; report the damaged and pruned ones."""
        for name, why in self.bad.items():
            if why.startswith("partial") and self.trainer is not None:
                if self.options.watch:
                    continue  # being saved or being pruned: the next look tells which
                why = "no .json record yet: the running trainer is saving it or pruning it"
            self.say_once(f"skipping {name}: {why}", file=sys.stderr)
        self.store.current = {c.name: c.record.params_sha256 for c in self.good}
        self.store.existing = {name for name, _ in checkpoint.candidates(self.options.run_dir)}
        gone = self.store.drop_gone()
        if gone:
            print(f"dropped the results of {len(gone)} checkpoint(s) no longer in {self.options.run_dir} (deleted or "
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
        errors, pruned = (run_jobs(todo, self.devices, self.store, self.board, self.options.eval_scale) if todo
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
        name = os.path.basename(checkpoint.prefix_for(self.options.run_dir, self.run.final_step))
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
            return (f"training is not running (no process holds {os.path.join(self.options.run_dir, TRAIN_LOCK)}) "
                    f"and the final checkpoint {name} (step {self.run.final_step}) is missing: resume the training "
                    "run, then sweep again")
        return ""

    def waiting_for(self, trainer: dict) -> str:
        name = os.path.basename(checkpoint.prefix_for(self.options.run_dir, self.run.final_step))
        newest = self.good[-1].name if self.good else "none yet"
        return (f"waiting for the final checkpoint {name} (newest intact: {newest}); training is running (pid "
                f"{trainer.get('pid', '?')} on {trainer.get('host', '?')}); looking again every "
                f"{self.options.poll_seconds:g} s")


def trainer_holding(run_dir: str) -> dict | None:
    return locks.holder(os.path.join(run_dir, TRAIN_LOCK))


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM: one line, exit 130/143; the workers are killed and sweep.lock released on the way out.
    saved = {s: signal.getsignal(s) for s in stops.SIGNALS}
    try:
        with stops.clean_stop("sweep_eval"):
            return sweep_main(options)
    finally:  # a caller in the same process (a test, a notebook) gets its own handlers back
        for s, handler in saved.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(s, handler)


def sweep_main(options: SweepOptions) -> int:
    try:
        run = RunRecord.read(options.run_dir)
        check_from_epoch(options, run)
        data_root = run.data_root_or(options.data_root)
        if not os.path.isdir(data_root):
            raise SweepError(f"data root {data_root!r} does not exist: pass --data-root")
        check_classes(run, data_root)
        targets = targets_for(options, len(run.classes or []))
        devices = check_devices(options)
        if not checkpoint.exists_any(options.run_dir) and not options.watch:
            raise SweepError(f"no checkpoints in {options.run_dir!r}")
        if options.watch:
            check_phase_data(options, run, data_root)
        sweep = Sweep(options, run, data_root, devices)
        trainer = sweep.trainer = trainer_holding(options.run_dir)  # before the scan: see Sweep.watch_end
        sweep.plan()  # every selected checkpoint has its validation data
    except (SweepError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Spread decode and compute threads over the worker processes (set before they start MXNet).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus()[0] // len(devices))))
    sweep.store = ResultStore(options.run_dir)
    from gluon_imagenet.tensorboard import open_sweep_board, sweep_setting

    sweep.board = open_sweep_board(run, options.run_dir,
                                   sweep_setting(options.size_policy, options.image_size, options.crop_fraction))
    print(f"sweep {options.run_dir}: {len(devices)} worker(s) on {', '.join(sorted(set(map(str, devices))))}, size "
          f"policy {options.size_policy}, data {data_root}")
    sweep.evaluate()
    while options.watch:
        why = sweep.watch_end(trainer)
        if why:
            print(f"watch ends: {why}", flush=True)
            break
        sweep.say_once(sweep.waiting_for(trainer))
        time.sleep(options.poll_seconds)
        trainer = sweep.trainer = trainer_holding(options.run_dir)
        try:
            sweep.plan()
        except (SweepError, RunDirError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sweep.evaluate()
    report(options, run, sweep.store, sweep.jobs, targets)
    if not sweep.store.rows(k for j in sweep.jobs for k in j.keys):
        print("error: no checkpoint could be evaluated", file=sys.stderr)
        return 1
    return 0
