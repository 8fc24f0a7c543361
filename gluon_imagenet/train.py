"""Train a hybridized Gluon ResNet-50 phase by phase, as a recipe says, under Horovod or as one process.

One 8-GPU machine, and two (the run dir on a shared file system):

    horovodrun -np 8 python -m gluon_imagenet.train --recipe recipes/imagenet104.yaml --data-root recordio \\
        --run-dir runs/imagenet104
    horovodrun -np 16 -H host1:8,host2:8 python -m gluon_imagenet.train --recipe recipes/imagenet104.yaml \\
        --data-root recordio --run-dir runs/imagenet104

One process (CPU or one GPU), and continuing a run from its newest checkpoint:

    python -m gluon_imagenet.train --recipe recipes/demo.yaml --data-root demo/recordio --run-dir runs/demo
    python -m gluon_imagenet.train --recipe recipes/demo.yaml --data-root demo/recordio --run-dir runs/demo --resume

Measure compute (random data on the device) or input (no model) throughput per phase:

    python -m gluon_imagenet.train --recipe recipes/demo.yaml --data-root demo/recordio --synthetic
    python -m gluon_imagenet.train --recipe recipes/demo.yaml --data-root demo/recordio --io-only

Exit codes: 0 done, 2 bad input, a run dir in use or a resume that cannot continue the run (nothing started or
written), 3 training diverged, 4 a checkpoint could not be written (disk full...), 130/143 stopped by Ctrl-C or
SIGTERM; in cases 3, 4 and 130/143 every rank stops and the last good checkpoint stays.

This module is the command line: it checks everything that can be wrong before any work, then hands over to
learner.py (one step), loop.py (the phases) and measure.py. MXNet is imported only after the command line is
read, so that MXNet's environment can be set first.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

from gluon_imagenet import checkpoint, locks, resume, rundir, stops
from gluon_imagenet.files import make_writable_dir
from gluon_imagenet.names import MODELS
from gluon_imagenet.packed import DEFAULT_DATA_ROOT, PACK_LOCK
from gluon_imagenet.recipe import LR_SCALING_RULES, RecipeError, load_recipe

class SetupError(Exception):
    """Something to fix before training can start."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/imagenet104.yaml is the seed's)")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"packed data root (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--run-dir", help="folder for checkpoints and logs (required unless --synthetic/--io-only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --run-dir")
    p.add_argument("--ctx", choices=("cpu", "gpu"), help="device (default: gpu if MXNet sees one)")
    p.add_argument("--model", choices=MODELS, default="resnet50_v1b")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: float16 with dynamic loss scaling on GPUs (default there), bfloat16 on "
                        "CPUs that have bfloat16 instructions (default off on CPUs)")
    p.add_argument("--threads", type=int, default=0,
                   help="decode threads per rank (default: usable CPUs per rank, within ImageRecordIter's cap)")
    p.add_argument("--lr-scaling", choices=LR_SCALING_RULES, help="override the recipe's lr scaling rule")
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    p.add_argument("--keep-mid-epoch", type=int, default=2,
                   help="keep the newest N mid-epoch checkpoints (--save-every-steps); every epoch checkpoint is "
                        "kept for the sweep (default: 2; 0 keeps all)")
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps (default: 20)")
    p.add_argument("--nan-patience", type=int, default=10,
                   help="stop after this many consecutive non-finite losses (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard", metavar="DIR",
                   help="folder for TensorBoard event files, written by rank 0 (default: "
                        f"RUN_DIR/{rundir.TENSORBOARD_DIR})")
    p.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    p.add_argument("--synthetic", action="store_true", help="measure compute img/s per phase on random data")
    p.add_argument("--io-only", action="store_true", help="measure input img/s per phase, no model")
    p.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=None,
                   help="one step of each phase not yet trained, in a child process, before training: refuses a "
                        "phase that will not fit (default: on GPUs)")
    p.add_argument("--bench-steps", type=int, default=20, help="steps per phase for --synthetic/--io-only")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Values argparse accepts but that mean nothing."""
    for name, minimum in (("log_every", 1), ("bench_steps", 1), ("save_every_steps", 0), ("keep_mid_epoch", 0),
                          ("threads", 0), ("nan_patience", 0)):
        value = getattr(args, name)
        if value < minimum:
            raise SetupError(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")
    if args.tensorboard and args.no_tensorboard:
        raise SetupError(f"--tensorboard {args.tensorboard} and --no-tensorboard contradict each other: pass one")
    if args.synthetic and args.io_only:
        raise SetupError("--synthetic and --io-only measure different things: pass one of them")
    if not (args.synthetic or args.io_only) and not args.run_dir:
        raise SetupError("--run-dir is required: the folder for checkpoints and logs, e.g. runs/NAME")


@dataclass(frozen=True)
class Setup:
    """Everything resolved and checked before training starts."""
    plan: object  # schedule.Plan
    classes: list[str]
    device: object  # devices.Device
    amp_dtype: str | None
    threads: int


def prepare(args, ranks) -> Setup:
    """Every check that can fail, before any work: recipe, packed data, device, memory."""
    from gluon_imagenet import devices
    from gluon_imagenet.data import input_buffer_bytes, read_class_names, train_images_for
    from gluon_imagenet.schedule import check_batches_fit, make_plan

    from gluon_imagenet.packed import check_for

    recipe = load_recipe(args.recipe)
    problems = check_for(recipe, args.data_root)  # the doctor's data check too; the trainer reads no val split
    if problems:
        raise SetupError("; ".join(map(str, problems)))
    classes = read_class_names(args.data_root)
    plan = make_plan(recipe, train_images_for(args.data_root, [p.data_dir for p in recipe.phases]), ranks.size,
                     lr_scaling=args.lr_scaling)
    check_batches_fit(plan)
    try:
        device = devices.for_rank(args.ctx, ranks.local_rank)
        amp_on = device.kind == "gpu" if args.amp is None else args.amp
        amp_dtype = devices.check_amp(device) if amp_on else None
    except devices.DeviceError as e:
        raise SetupError(str(e)) from None
    decode = devices.decode_threads(ranks.local_size, args.threads)  # the rule the sweep and the doctor use
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


def choose_checkpoint(args, setup: Setup, ranks) -> checkpoint.Checkpoint | None:
    """The newest intact checkpoint (rank 0 decides; every rank loads the same step)."""
    chosen = None
    if args.resume:
        chosen, damaged = checkpoint.newest_intact(args.run_dir)
        for name, why in damaged:
            ranks.print(f"warning: checkpoint {name} is unusable ({why}); using an older one", file=sys.stderr)
    # Every rank verified the same files; rank 0's choice decides, should one of them have seen another.
    step = int(ranks.allreduce_sum(float(chosen.step if chosen and ranks.is_main else 0), "resume_step"))
    if step == 0:
        if args.resume:
            ranks.print(f"no checkpoint in {args.run_dir}: starting from step 0")
        return None
    if chosen is None or chosen.step != step:  # this rank sees other files than rank 0: load rank 0's step
        chosen, _ = checkpoint.problem(checkpoint.prefix_for(args.run_dir, step) + ".json")
    if chosen is None:
        raise SetupError(f"rank {ranks.rank} cannot read checkpoint step {step} in {args.run_dir}: every rank "
                         "needs the run dir (a shared file system across machines)")
    record = chosen.record
    try:
        resume.check(chosen, setup.plan, run_facts(args, setup), ranks.size, args.model, setup.amp_dtype,
                     args.data_root, rundir.RunRecord.read_if_any(args.run_dir))
    except resume.ResumeRefused as e:
        raise SetupError(str(e)) from None
    scale = f", loss scale {record.loss_scaler['loss_scale']:g}" if setup.amp_dtype and record.loss_scaler else ""
    ranks.print(f"resuming from {chosen.name}: step {step}, epoch {record.epoch:.3f}{scale}")
    return chosen


def run_facts(args, setup: Setup) -> dict:
    """The data a run trains on, as run.json and every checkpoint record keep it (resume compares them)."""
    return resume.trained_on(setup.plan, setup.classes, args.data_root)


def write_run_json(args, setup: Setup, ranks, environment: dict, resume_from=None) -> None:
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
        recipe=recipe.to_dict(), recipe_file=args.recipe, recipe_digest=recipe.digest(), command=sys.argv,
        args=vars(args), versions=versions, git_revision=revision, world_size=ranks.size, device=str(setup.device),
        amp=setup.amp_dtype is not None, amp_dtype=setup.amp_dtype, model=args.model, classes=setup.classes,
        train_images=plan.train_images, lr_scale=plan.lr_scale, lr_scaling=plan.lr_scaling,
        data_root=os.path.abspath(args.data_root), environment=environment,
        phases=[rundir.PlannedPhase(p.first_step, p.end_step, p.steps_per_epoch, p.image_size, p.data_dir)
                for p in plan.phases],
        trained_on=run_facts(args, setup),
        recipes=resume.recipe_history(rundir.RunRecord.read_if_any(args.run_dir), resume_from, plan),
        # Resolved here, once: the sweep and export read them instead of re-applying the recipe's rule.
        eval_image_size=recipe.resolved_eval_image_size, eval_data_dir=recipe.resolved_eval_data_dir,
    ).write(args.run_dir)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM (horovodrun's way of ending its ranks): one line, exit 130/143, the lock released and
    # a checkpoint being written removed (checkpoint.save), never a traceback.
    try:
        with stops.clean_stop("train", exit_on_stop=False):
            return _main(argv)
    except stops.Stopped as stop:
        _leave_after_stop(stop.code)


def _leave_after_stop(code: int):
    """Leave without Python's finalization once the stop has unwound every with and finally block (the lock,
    partial files; every file the trainer writes is closed by then). MXNet's exit hook (MXNotifyShutdown) waits
    for its engine and destroys live iterators, whose decode threads may be mid-batch, and under Horovod raises
    "Horovod has been shut down" with a traceback once another rank has gone. Horovod is shut down first, so
    that the other ranks' background loops end quietly instead of reporting a reset connection."""
    horovod = sys.modules.get("horovod.mxnet")
    if horovod is not None:
        try:
            horovod.shutdown()
        except Exception:  # noqa: BLE001 - leaving anyway; the one line is already printed
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from gluon_imagenet import engine_env, gpu_settings

    if engine_env.problem(os.environ):  # before MXNet starts: it would abort or hang holding train.lock
        print(f"error: {engine_env.problem(os.environ)}", file=sys.stderr, flush=True)
        return 2
    # MXNet and Horovod read these when they start: set them before either is imported (nothing on a CPU).

    kind = gpu_settings.device_kind_before_import(args.ctx)
    choices = gpu_settings.settings_for(kind, os.environ)
    gpu_settings.apply(kind)
    environment = {name: {"value": c.value, "applied": c.applied, "source": c.source, "reason": c.reason}
                   for name, c in choices.items()}

    from gluon_imagenet.data import DataError
    from gluon_imagenet.dist import Ranks
    from gluon_imagenet.learner import Learner
    from gluon_imagenet.loop import Diverged, Run, RunOptions, SaveFailed
    from gluon_imagenet.schedule import PlanError

    ranks = Ranks.start()

    def stop_together(problem: str, name: str) -> bool:
        """Every rank learns whether any rank failed a check, so none is left waiting in a collective."""
        if not ranks.allreduce_sum(1.0 if problem else 0.0, name):
            return False
        print(f"error: {problem}" if problem else f"rank {ranks.rank}: stopping: another rank could not start",
              file=sys.stderr, flush=True)
        return True

    # Every rank holds its data root shared while it reads it: a packer then refuses to rewrite it under the run.
    data_lock = locks.share(os.path.join(args.data_root, PACK_LOCK), f"data root {args.data_root!r}")
    with _run_lock(args, ranks) as problem, data_lock as data_problem:
        problem = problem or data_problem
        try:
            setup = None if problem else prepare(args, ranks)
        except (RecipeError, PlanError, DataError, SetupError) as e:
            problem = str(e)
        if stop_together(problem, "setup_check"):
            return 2
        if args.synthetic or args.io_only:
            from gluon_imagenet.measure import measure

            measure(setup, ranks, synthetic=args.synthetic, steps=args.bench_steps, model=args.model, seed=args.seed,
                    data_root=args.data_root)
            ranks.finish()
            return 0
        resume_from = None
        try:
            resume_from = choose_checkpoint(args, setup, ranks)  # every rank takes part in its allreduce
        except SetupError as e:
            problem = str(e)
        if stop_together(problem, "resume_check"):
            return 2
        from gluon_imagenet.memory_probe import trainer_check  # each phase not yet trained, before any is
        if stop_together(trainer_check(args, setup, ranks, resume_from), "memory_check"):
            return 2
        if ranks.is_main:
            write_run_json(args, setup, ranks, environment, resume_from)
            if choices or setup.device.kind == "gpu":
                ranks.print(gpu_settings.format_settings(choices))
            if kind != setup.device.kind:
                ranks.print(f"warning: guessed a {kind} run before MXNet started (for its settings) but MXNet runs "
                            f"on {setup.device}: pass --ctx {setup.device.kind} to make them agree",
                            file=sys.stderr)
            plan = setup.plan
            ranks.print(f"{plan.total_steps} steps over {len(plan.phases)} phases on {ranks.size} worker(s), "
                        f"{setup.device}, amp {setup.amp_dtype or 'off'}, lr x {plan.lr_scale:g} "
                        f"({plan.lr_scaling} scaling from {plan.recipe.reference_workers} workers), "
                        f"{plan.train_images} training images, {len(setup.classes)} classes")
        plan, recipe = setup.plan, setup.plan.recipe
        learner = Learner(model=args.model, classes=len(setup.classes), device=setup.device, ranks=ranks,
                          seed=args.seed, lr=plan.phases[0].lr_start, momentum=recipe.momentum,
                          optimizer=recipe.optimizer, loss_scale=recipe.loss_scale, ema=recipe.ema,
                          weight_decay=recipe.weight_decay, label_smoothing=recipe.label_smoothing,
                          first_image_size=plan.phases[0].phase.image_size, amp_dtype=setup.amp_dtype,
                          params_path=resume_from.params_path if resume_from else None)
        if resume_from:
            learner.load_states(resume_from.states_path, resume_from.record.loss_scaler)
        options = RunOptions(args.run_dir, args.data_root, args.model, args.seed, setup.threads, args.log_every,
                             args.nan_patience, args.save_every_steps, args.keep_mid_epoch,
                             trained_on=run_facts(args, setup),
                             tensorboard_dir=rundir.tensorboard_dir(args.run_dir, args.tensorboard,
                                                                    args.no_tensorboard))
        try:
            Run(plan, learner, ranks, setup.device, options, len(setup.classes), resume_from).train()
        except (Diverged, SaveFailed) as e:
            # Every rank raised it at the same step; let the last collectives finish before any rank exits.
            ranks.finish()
            why = "the loss diverged" if isinstance(e, Diverged) else "rank 0 could not save"
            print(f"error: {e}" if ranks.is_main else f"rank {ranks.rank}: stopping: {why}", file=sys.stderr,
                  flush=True)
            return 3 if isinstance(e, Diverged) else 4
    return 0


class _NoLock:
    def __enter__(self):
        return ""

    def __exit__(self, *exc):
        return False


def _run_lock(args, ranks):
    """Rank 0 holds RUN_DIR/train.lock for the whole run: a second trainer on the same run dir is refused, and
    the sweep's --watch knows training is still going. Entering gives "" or the problem (reported by main)."""
    if args.synthetic or args.io_only or not ranks.is_main:
        return _NoLock()

    class _Lock:
        def __enter__(self):
            try:
                check_run_dir(args.run_dir, args.resume)
                self.held = locks.hold(os.path.join(args.run_dir, rundir.TRAIN_LOCK), f"run dir {args.run_dir!r}")
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


if __name__ == "__main__":
    sys.exit(main())
