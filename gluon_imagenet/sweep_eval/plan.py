"""What the sweep reads of a run and which checkpoint is evaluated how (the jobs)."""
from __future__ import annotations

import os
import sys

from gluon_imagenet.data import packed
from gluon_imagenet.data.packed import holds, packed_short_side
from gluon_imagenet.devices import Device
from gluon_imagenet.rundir import RunRecord
from gluon_imagenet.sweep_eval.jobs import Job
from gluon_imagenet.sweep_eval.options import SweepOptions
from gluon_imagenet.sweep_eval.settings import weights_for
from gluon_imagenet.sweep_eval.verify import Verifier


class SweepError(Exception):
    """Something to fix before evaluating."""


def check_from_epoch(options: SweepOptions, run: RunRecord) -> None:
    if options.from_epoch > run.last_epoch:
        raise SweepError(f"--from-epoch {options.from_epoch:g}: the recipe ends at epoch {run.last_epoch:g}, so no "
                         f"checkpoint would ever be selected; use an epoch in [0, {run.last_epoch:g}]")


def round8(size: float) -> int:
    return max(8, int(round(size / 8)) * 8)


def eval_size(options: SweepOptions, run: RunRecord, trained, scale: float | None = None) -> tuple[int, str]:
    """(crop size, preferred packed data dir) for one checkpoint under the chosen size policy, times `scale`
    (default: the first of --eval-scales). `trained`: what the checkpoint was trained at, its record
    (checkpoint.Record) or its phase in run.json (rundir.PlannedPhase): both have image_size and data_dir."""
    scale = options.eval_scale if scale is None else scale
    if options.size_policy == "fixed":
        size, preferred = run.evaluation_defaults()  # resolved when run.json was written
        base = options.image_size or size
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


def check_phase_data(options: SweepOptions, run: RunRecord, data_root: str) -> None:
    """--watch: every phase's validation data exists before the first checkpoint of it is written."""
    for phase in run.phases:
        for scale in options.scales:
            size, preferred = eval_size(options, run, phase, scale)
            data_dir_for(data_root, size, preferred, options.crop_fraction)


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


def select(options: SweepOptions, good: list) -> list:
    selected = [c for c in good if (c.record.epoch or 0) >= options.from_epoch][:: options.every]
    return selected[-options.last:] if options.last else selected


def plan_jobs(options: SweepOptions, run: RunRecord, data_root: str, verifier: Verifier | None = None):
    """(jobs for the selected checkpoints, [(name, problem)] for damaged ones, every intact checkpoint)."""
    verifier = verifier or Verifier(options.run_dir)
    good, bad = verifier.scan()
    root = os.path.abspath(data_root)
    flips = (False, True) if options.flip else (False,)
    jobs = []
    for c in select(options, good):
        weights, why = weights_for(options.weights, c.record)
        if "ema" in weights:
            problem = verifier.ema_problem(c)
            if problem:
                weights, why = [w for w in weights if w != "ema"], problem
        if why:  # the checkpoint's EMA weights only: its raw weights are still evaluated unless --weights ema
            bad.append((f"the EMA weights of {c.name}" if weights else c.name, why))
        sizes = {}  # two scales rounding to one size are one evaluation: the first scale names it
        for scale in options.scales:
            size, preferred = eval_size(options, run, c.record, scale)
            sizes.setdefault(size, (scale, preferred))
        for size, (scale, preferred) in sizes.items():
            data_dir = data_dir_for(data_root, size, preferred, options.crop_fraction)
            for w in weights:
                classes = c.record.classes if c.record.recorded("classes") else len(run.classes or [])
                jobs.append(Job(c.name, c.params_path, c.record.model if c.record.recorded("model") else run.model,
                                classes, size, data_dir, c.record,
                                options.crop_fraction, options.batch_size, root, data_identity(data_root, data_dir),
                                scale, flips, w))
    return jobs, bad, good


def check_devices(options: SweepOptions) -> list[Device]:
    if options.gpus is None:
        return [Device("cpu")] * options.workers
    try:
        ids = [int(g) for g in options.gpus.split(",") if g.strip()]
    except ValueError:
        raise SweepError(f"--gpus {options.gpus!r}: expected GPU ids like 0,1,2,3") from None
    import mxnet as mx

    available = mx.context.num_gpus()
    missing = [g for g in ids if not 0 <= g < available]
    if not ids or missing:
        raise SweepError(f"--gpus {options.gpus}: GPU {missing or ids} does not exist here (MXNet sees {available} "
                         f"GPUs{': ids 0..' + str(available - 1) if available else ''}); on a CPU use --workers N")
    return [Device("gpu", g) for g in ids]
