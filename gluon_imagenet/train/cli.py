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

This module is the command line; setup.py checks everything that can be wrong before any work, then it hands
over to learner.py (one step), loop.py (the phases) and measure.py. MXNet is imported only after the command line
is read, so that MXNet's environment can be set first.
"""
from __future__ import annotations

import argparse
import os
import sys

from gluon_imagenet import locks, rundir, stops
from gluon_imagenet.data.packed import DEFAULT_DATA_ROOT, PACK_LOCK
from gluon_imagenet.names import MODELS
from gluon_imagenet.recipe import LR_SCALING_RULES
from gluon_imagenet.recipe_fields import RecipeError
from gluon_imagenet.train.options import TrainOptions
from gluon_imagenet.train.setup import SetupError, run_lock, choose_checkpoint, prepare, run_facts, write_run_json


def parse_args(argv) -> TrainOptions:
    """The checked options (SetupError names a value that means nothing); argparse exits on a malformed one."""
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/imagenet104.yaml is the seed's)")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"packed data root (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--run-dir", help="folder for checkpoints and logs (required unless --synthetic/--io-only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --run-dir")
    p.add_argument("--ctx", choices=("cpu", "gpu"),
                   help="device: every rank on its local GPU, or the CPU (default: gpu if MXNet sees one)")
    p.add_argument("--model", choices=MODELS, default="resnet50_v1b",
                   help="network to train (default: %(default)s)")
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of MXNet's random numbers (the initial weights) and of the training data's shuffling "
                        "(default: 0)")
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
    options = TrainOptions(**vars(p.parse_args(argv)))
    check_args(options)
    return options


def check_args(args: TrainOptions) -> None:
    """Values argparse accepts but that mean nothing (SetupError names the flag and what it must be)."""
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
    try:
        args = parse_args(argv)
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

    from gluon_imagenet.data.iterators import DataError
    from gluon_imagenet.dist import Ranks
    from gluon_imagenet.schedule import PlanError
    from gluon_imagenet.train.learner import Learner
    from gluon_imagenet.train.loop import Diverged, Run, RunOptions, SaveFailed

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
    with run_lock(args, ranks) as problem, data_lock as data_problem:
        problem = problem or data_problem
        try:
            setup = None if problem else prepare(args, ranks)
        except (RecipeError, PlanError, DataError, SetupError) as e:
            problem = str(e)
        if stop_together(problem, "setup_check"):
            return 2
        if args.synthetic or args.io_only:
            from gluon_imagenet.train.measure import measure

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
        from gluon_imagenet.train.memory_probe import trainer_check
        if stop_together(trainer_check(setup, ranks, resume_from, model=args.model, memory_check=args.memory_check),
                         "memory_check"):
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
