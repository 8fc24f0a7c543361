"""Everything the trainer checks and prepares before its first step: data, run dir, lock, resume."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass

from gluon_imagenet import checkpoint, locks, rundir
from gluon_imagenet.files import make_writable_dir
from gluon_imagenet.recipe import load_recipe
from gluon_imagenet.train import resume
from gluon_imagenet.train.options import TrainOptions


class SetupError(Exception):
    """Something to fix before training can start."""


@dataclass(frozen=True)
class Setup:
    """Everything resolved and checked before training starts."""
    plan: object  # schedule.Plan
    classes: list[str]
    device: object  # devices.Device
    amp_dtype: str | None
    threads: int


def prepare(options: TrainOptions, ranks) -> Setup:
    """Every check that can fail, before any work: recipe, packed data, device, memory."""
    from gluon_imagenet import devices
    from gluon_imagenet.data.iterators import input_buffer_bytes, read_class_names, train_images_for
    from gluon_imagenet.data.packed import check_for
    from gluon_imagenet.schedule import check_batches_fit, make_plan

    recipe = load_recipe(options.recipe)
    problems = check_for(recipe, options.data_root)  # the doctor's data check too; the trainer reads no val split
    if problems:
        raise SetupError("; ".join(map(str, problems)))
    classes = read_class_names(options.data_root)
    plan = make_plan(recipe, train_images_for(options.data_root, [p.data_dir for p in recipe.phases]), ranks.size,
                     lr_scaling=options.lr_scaling)
    check_batches_fit(plan)
    try:
        device = devices.for_rank(options.ctx, ranks.local_rank)
        amp_on = device.kind == "gpu" if options.amp is None else options.amp
        amp_dtype = devices.check_amp(device) if amp_on else None
    except devices.DeviceError as e:
        raise SetupError(str(e)) from None
    decode = devices.decode_threads(ranks.local_size, options.threads)  # the rule the sweep and the doctor use
    if decode.capped:
        ranks.print(f"note: {decode}")
    _check_memory(plan, ranks.local_size, input_buffer_bytes)
    return Setup(plan, classes, device, amp_dtype, decode.threads)


def _check_memory(plan, local_ranks: int, buffer_bytes) -> None:
    import psutil

    available = psutil.virtual_memory().available
    for phase in plan.phases:
        need = buffer_bytes(phase.batch_size, phase.image_size) * local_ranks
        if need > available:
            raise SetupError(f"phase {phase.index + 1}: batch_size {phase.batch_size} at {phase.image_size} px needs about "
                             f"{need / 2**30:.1f} GiB of host memory for the input pipelines of {local_ranks} rank(s) "
                             f"on this machine, which has {available / 2**30:.1f} GiB available: lower batch_size")


def check_run_dir(run_dir: str, resume: bool) -> None:
    problem = make_writable_dir(run_dir)
    if problem:
        raise SetupError(f"--run-dir {run_dir!r} is not writable: {problem}")
    if checkpoint.exists_any(run_dir) and not resume:
        raise SetupError(f"--run-dir {run_dir!r} already holds checkpoints: pass --resume to continue that run, "
                         "or choose a new --run-dir")


def choose_checkpoint(options: TrainOptions, setup: Setup, ranks) -> checkpoint.Checkpoint | None:
    """The newest intact checkpoint (rank 0 decides; every rank loads the same step)."""
    chosen = None
    if options.resume:
        chosen, damaged = checkpoint.newest_intact(options.run_dir)
        for name, why in damaged:
            ranks.print(f"warning: checkpoint {name} is unusable ({why}); using an older one", file=sys.stderr)
    # Every rank verified the same files; rank 0's choice decides, should one of them have seen another.
    step = int(ranks.allreduce_sum(float(chosen.step if chosen and ranks.is_main else 0), "resume_step"))
    if step == 0:
        if options.resume:
            ranks.print(f"no checkpoint in {options.run_dir}: starting from step 0")
        return None
    if chosen is None or chosen.step != step:  # this rank sees other files than rank 0: load rank 0's step
        chosen, _ = checkpoint.problem(checkpoint.prefix_for(options.run_dir, step) + ".json")
    if chosen is None:
        raise SetupError(f"rank {ranks.rank} cannot read checkpoint step {step} in {options.run_dir}: every rank "
                         "needs the run dir (a shared file system across machines)")
    record = chosen.record
    try:
        resume.check(chosen, setup.plan, run_facts(options, setup), ranks.size, options.model, setup.amp_dtype,
                     options.data_root, rundir.RunRecord.read_if_any(options.run_dir))
    except resume.ResumeRefused as e:
        raise SetupError(str(e)) from None
    scale = f", loss scale {record.loss_scaler['loss_scale']:g}" if setup.amp_dtype and record.loss_scaler else ""
    ranks.print(f"resuming from {chosen.name}: step {step}, epoch {record.epoch:.3f}{scale}")
    return chosen


def run_facts(options: TrainOptions, setup: Setup) -> dict:
    """The data a run trains on, as run.json and every checkpoint record keep it (resume compares them)."""
    return resume.trained_on(setup.plan, setup.classes, options.data_root)


def write_run_json(options: TrainOptions, setup: Setup, ranks, environment: dict, resume_from=None) -> None:
    """Only once every check passed (a refused resume leaves the run's record as it was)."""
    import mxnet as mx

    plan = setup.plan
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        revision = "unknown"
    versions = {"python": platform.python_version(), "mxnet": mx.__version__}
    for module in ("gluoncv", "numpy", "horovod"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    recipe = plan.recipe
    rundir.RunRecord(
        recipe=recipe.to_dict(), recipe_file=options.recipe, recipe_digest=recipe.digest(), command=sys.argv,
        args=options.as_dict(), versions=versions, git_revision=revision, world_size=ranks.size,
        device=str(setup.device),
        amp=setup.amp_dtype is not None, amp_dtype=setup.amp_dtype, model=options.model, classes=setup.classes,
        train_images=plan.train_images, lr_scale=plan.lr_scale, lr_scaling=plan.lr_scaling,
        data_root=os.path.abspath(options.data_root), environment=environment,
        phases=[rundir.PlannedPhase(p.first_step, p.end_step, p.steps_per_epoch, p.image_size, p.data_dir)
                for p in plan.phases],
        trained_on=run_facts(options, setup),
        recipes=resume.recipe_history(rundir.RunRecord.read_if_any(options.run_dir), resume_from, plan),
        # Resolved here, once: the sweep and export read them instead of re-applying the recipe's rule.
        eval_image_size=recipe.resolved_eval_image_size, eval_data_dir=recipe.resolved_eval_data_dir,
    ).write(options.run_dir)


class _NoLock:
    def __enter__(self):
        return ""

    def __exit__(self, *exc):
        return False


def run_lock(options: TrainOptions, ranks):
    """Rank 0 holds RUN_DIR/train.lock for the whole run: a second trainer on the same run dir is refused, and
    the sweep's --watch knows training is still going. Entering gives "" or the problem (reported by main)."""
    if options.synthetic or options.io_only or not ranks.is_main:
        return _NoLock()

    class _Lock:
        def __enter__(self):
            try:
                check_run_dir(options.run_dir, options.resume)
                self.held = locks.hold(os.path.join(options.run_dir, rundir.TRAIN_LOCK), f"run dir {options.run_dir!r}")
                self.held.__enter__()
            except (SetupError, locks.Busy) as e:
                self.held = None
                return str(e)
            return ""

        def __exit__(self, *exc):
            if self.held is not None:
                self.held.__exit__(*exc)
            return False

    return _Lock()
