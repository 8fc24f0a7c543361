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

Exit codes: 0 done, 2 bad input (nothing started), 3 training diverged (the last good checkpoint stays).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.contrib import amp

from gluon_imagenet import checkpoint
from gluon_imagenet.data import BatchStream, DataError, Shard, read_class_names, train_images_for, train_iterator
from gluon_imagenet.dist import Workers
from gluon_imagenet.files import atomic_open, make_writable_dir
from gluon_imagenet.model import MODELS, build_model, initialize, no_weight_decay
from gluon_imagenet.recipe import LR_SCALING_RULES, RecipeError, load_recipe
from gluon_imagenet.schedule import (PhasePlan, Plan, epoch_at, epochs_done, images_at, lr_at, make_plan,
                                     phase_at)


class SetupError(Exception):
    """Something to fix before training can start."""


class Diverged(Exception):
    """The loss stayed non-finite."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/imagenet104.yaml is the seed's)")
    p.add_argument("--data-root", default="recordio", help="packed data root (default: recordio)")
    p.add_argument("--run-dir", help="folder for checkpoints and logs (required unless --synthetic/--io-only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --run-dir")
    p.add_argument("--ctx", choices=("cpu", "gpu"), help="device (default: gpu if MXNet sees one)")
    p.add_argument("--model", choices=MODELS, default="resnet50_v1b")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision, float16 with dynamic loss scaling (default: on for gpu; not on cpu)")
    p.add_argument("--threads", type=int, default=0, help="decode threads per rank (default: cores per rank)")
    p.add_argument("--lr-scaling", choices=LR_SCALING_RULES, help="override the recipe's lr scaling rule")
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps (default: 20)")
    p.add_argument("--nan-patience", type=int, default=10,
                   help="stop after this many consecutive non-finite losses (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="measure compute img/s per phase on random data")
    p.add_argument("--io-only", action="store_true", help="measure input img/s per phase, no model")
    p.add_argument("--bench-steps", type=int, default=20, help="steps per phase for --synthetic/--io-only")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup
@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    workers: Workers
    plan: Plan
    classes: list[str]
    ctx: mx.Context
    amp: bool
    threads: int


def prepare(args, workers: Workers) -> Setup:
    """Every check that can fail, before any work: recipe, data, device, run dir."""
    recipe = load_recipe(args.recipe, data_root=args.data_root)
    if args.lr_scaling:
        recipe = dataclasses.replace(recipe, lr_scaling=args.lr_scaling)
    classes = read_class_names(args.data_root)
    plan = make_plan(recipe, train_images_for(args.data_root, [p.data_dir for p in recipe.phases]), workers.size)
    device = args.ctx or ("gpu" if mx.context.num_gpus() > 0 else "cpu")
    if device == "gpu" and workers.local_rank >= mx.context.num_gpus():
        raise SetupError(f"local rank {workers.local_rank} needs GPU {workers.local_rank}, but MXNet sees "
                         f"{mx.context.num_gpus()} GPUs: start fewer processes per machine (-np / -H host:N)")
    amp = device == "gpu" if args.amp is None else args.amp
    if amp and device == "cpu":
        raise SetupError("--amp needs a GPU: MXNet has no float16 kernels on the CPU ('FP16 gemm on cpu not "
                         "implemented'); train in float32 with --no-amp, or use --ctx gpu")
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers.local_size)
    for name in ("log_every", "bench_steps"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not (args.synthetic or args.io_only):
        if not args.run_dir:
            raise SetupError("--run-dir is required: the folder for checkpoints and logs, e.g. runs/NAME")
        if workers.is_main:
            _check_run_dir(args.run_dir, args.resume)
    return Setup(args, workers, plan, classes, mx.gpu(workers.local_rank) if device == "gpu" else mx.cpu(), amp,
                 threads)


def _check_run_dir(run_dir: str, resume: bool) -> None:
    problem = make_writable_dir(run_dir)
    if problem:
        raise SetupError(f"--run-dir {run_dir!r} is not writable: {problem}")
    if checkpoint.exists_any(run_dir) and not resume:
        raise SetupError(f"--run-dir {run_dir!r} already holds checkpoints: pass --resume to continue that run, "
                         "or choose a new --run-dir")


# ------------------------------------------------------------------------------------------------ one step
class Learner:
    """Network, optimizer and loss on one device: what a training step needs."""

    def __init__(self, setup: Setup, checkpoint_to_load: checkpoint.Checkpoint | None = None):
        recipe, args = setup.plan.recipe, setup.args
        self.ctx, self.amp, self.workers = setup.ctx, setup.amp, setup.workers
        self.classes, self.smoothing = len(setup.classes), recipe.label_smoothing
        if self.amp:
            amp.init()  # must run before the network is built
        mx.random.seed(args.seed)
        self.net = build_model(args.model, self.classes)
        initialize(self.net, self.ctx)
        no_weight_decay(self.net)
        if checkpoint_to_load:
            self.net.load_parameters(checkpoint_to_load.params_path, ctx=self.ctx)
        else:
            # Give every parameter its shape now, imperatively and in training mode, so the broadcast below
            # sends real arrays: broadcasting deferred parameters from inside the first hybridized forward pass
            # crashed rank 0 here now and then (segfault), and an inference-mode pass kills it with MKLDNN.
            size = setup.plan.phases[0].phase.image_size
            with autograd.train_mode():
                self.net(mx.nd.zeros((2, 3, size, size), dtype="uint8", ctx=self.ctx))
            mx.nd.waitall()
        # Rank 0's parameters (and BatchNorm statistics) to every rank before training starts.
        setup.workers.broadcast_parameters(self.net.collect_params())
        mx.nd.waitall()  # the broadcast writes the parameters asynchronously: finish before the graph is built
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.trainer = setup.workers.make_trainer(self.net.collect_params(), "nag", {
            "learning_rate": setup.plan.phases[0].lr_start, "momentum": recipe.momentum,
            "wd": recipe.weight_decay, "multi_precision": self.amp})
        if self.amp:
            amp.init_trainer(self.trainer)
        if checkpoint_to_load:
            self.trainer.load_states(checkpoint_to_load.states_path)
            if self.amp and "loss_scale" in checkpoint_to_load.record:
                self.trainer._amp_loss_scaler.loss_scale = checkpoint_to_load.record["loss_scale"]
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=self.smoothing == 0)

    def step(self, data: mx.nd.NDArray, label: mx.nd.NDArray, lr: float) -> float:
        # Batches come on cpu_pinned: a hybridized net on another context refuses them.
        data, label = data.as_in_context(self.ctx), label.as_in_context(self.ctx)
        if self.smoothing:
            eps = self.smoothing
            label = label.one_hot(self.classes, on_value=1 - eps + eps / self.classes, off_value=eps / self.classes)
        self.trainer.set_learning_rate(lr)
        with autograd.record():
            loss = self.loss_fn(self.net(data), label)
            if self.amp:
                with amp.scale_loss(loss, self.trainer) as scaled:
                    autograd.backward(scaled)
            else:
                loss.backward()
        self.trainer.step(data.shape[0])
        return float(loss.mean().asscalar())

    @property
    def loss_scale(self) -> float | None:
        return self.trainer._amp_loss_scaler.loss_scale if self.amp else None


# ------------------------------------------------------------------------------------------------ the run
class Run:
    """One training run: the plan, the learner, the clocks, the logs and the checkpoints."""

    def __init__(self, setup: Setup, resume_from: checkpoint.Checkpoint | None):
        self.setup, self.plan, self.workers = setup, setup.plan, setup.workers
        self.run_dir, self.args = setup.args.run_dir, setup.args
        self.learner = Learner(setup, resume_from)
        record = resume_from.record if resume_from else {}
        self.start_step = record.get("step", 0)
        self.wall_before = record.get("wall_seconds", 0.0)  # accounting continues across resumes
        self.train_seconds = record.get("train_seconds", 0.0)
        self.wall_start = time.time()
        self.bad_losses = 0
        self.last_good = resume_from.name if resume_from else None
        self.log = ProgressLog(self, resumed_at=self.start_step if resume_from else None)

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.wall_start

    def train(self) -> None:
        for phase in self.plan.phases:
            if phase.end_step > self.start_step:
                self.train_phase(phase, max(self.start_step, phase.first_step))
        self.workers.finish()
        # Every rank reports: equal digests show the ranks stayed in step.
        print(f"rank {self.workers.rank}/{self.workers.size}: finished at step {self.plan.total_steps}, "
              f"parameter digest {parameter_digest(self.learner.net)}", flush=True)
        self.workers.print(f"done: {self.plan.total_steps} steps, {self.wall_seconds():.0f} s wall, "
                           f"{self.train_seconds:.0f} s training; checkpoints in {self.run_dir}")

    def train_phase(self, phase: PhasePlan, start: int) -> None:
        """Global steps [start, phase end), from one iterator for the phase's image size and batch size."""
        ph, args = phase.phase, self.args
        first_epoch, within = epoch_at(self.plan, start)
        self.workers.print(f"phase {phase.index + 1}: epochs {first_epoch}-{ph.epochs[1]}, {ph.image_size} px, "
                           f"batch {ph.batch_size} x {self.workers.size}, data {ph.data_dir}, lr "
                           f"{phase.lr_start:g} -> {phase.lr_end:g} ({ph.lr_method})")
        tick = time.time()
        # Seeded by the epoch it starts at: a resumed phase draws a new order instead of replaying the old one.
        iterator = train_iterator(args.data_root, ph.data_dir, ph.image_size, ph.batch_size,
                                  Shard(self.workers.rank, self.workers.size), args.seed + first_epoch,
                                  self.setup.threads, self.plan.recipe.min_random_area)
        batches = BatchStream(iterator)
        batches.skip(within)
        step = start
        for epoch in range(first_epoch, ph.epochs[1]):
            epoch_end = phase.first_step + (epoch + 1 - ph.epochs[0]) * phase.steps_per_epoch
            for data, label in batches.take(epoch_end - step):
                lr = lr_at(self.plan, step)
                loss = self.learner.step(data, label, lr)
                self.check_loss(loss, step, lr)
                self.log.step(step, epoch, phase, lr, loss)
                step += 1
                if args.save_every_steps and step % args.save_every_steps == 0 and step < epoch_end:
                    tick = self.save_timed(step, lr, loss, tick)
            tick = self.save_timed(step, lr, loss, tick)
        del batches, iterator  # release this phase's decode threads and buffers before the next phase

    def save_timed(self, step: int, lr: float, loss: float, tick: float) -> float:
        """Save, keeping the time spent saving out of the training seconds; returns the new start tick."""
        self.train_seconds += time.time() - tick
        self.save(step, lr, loss)
        return time.time()

    def check_loss(self, loss: float, step: int, lr: float) -> None:
        self.bad_losses = 0 if math.isfinite(loss) else self.bad_losses + 1
        if self.bad_losses > self.args.nan_patience:
            raise Diverged(f"the loss was not finite for {self.bad_losses} consecutive steps (up to step {step}, "
                           f"lr {lr:g}); the last good checkpoint is {self.last_good or 'none'} in {self.run_dir}. "
                           "Lower the learning rate or check the data, then --resume.")

    def save(self, step: int, lr: float, loss: float) -> None:
        self.workers.average_running_stats(self.learner.net)  # every rank takes part
        if not self.workers.is_main:
            return
        if self.bad_losses:
            print(f"warning: not saving step {step}: the loss is not finite", file=sys.stderr, flush=True)
            return
        epoch, _ = epoch_at(self.plan, step - 1)
        phase = phase_at(self.plan, step - 1)
        record = {"epoch": epochs_done(self.plan, step), "epoch_index": epoch, "phase": phase.index,
                  "image_size": phase.phase.image_size, "data_dir": phase.phase.data_dir,
                  "images_seen": images_at(self.plan, step), "wall_seconds": self.wall_seconds(),
                  "train_seconds": self.train_seconds, "recipe_digest": self.plan.recipe.digest(),
                  "world_size": self.workers.size, "model": self.args.model, "classes": len(self.setup.classes),
                  "lr": lr, "loss": loss, "final": step == self.plan.total_steps}
        if self.learner.amp:
            record["loss_scale"] = self.learner.loss_scale
        saved = checkpoint.save(self.run_dir, step, self.learner.net, self.learner.trainer, record)
        self.last_good = saved.name


def parameter_digest(net) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(net._collect_params_with_prefix().items()):
        digest.update(name.encode())
        digest.update(param.data().asnumpy().tobytes())
    return digest.hexdigest()[:16]


class ProgressLog:
    """Rank 0's fixed-column progress lines and metrics.jsonl."""

    HEADER = f"{'phase':>5} {'epoch':>5} {'step':>15} {'lr':>9} {'loss':>8} {'img/s':>8} {'ETA':>9}"

    def __init__(self, run: Run, resumed_at: int | None):
        self.run, self.plan = run, run.plan
        self.path = os.path.join(run.run_dir, "metrics.jsonl")
        self.last_time, self.last_step = time.time(), None
        if not run.workers.is_main:
            return
        if resumed_at is not None and os.path.exists(self.path):
            # Steps after the checkpoint were lost with the crash: drop their lines, they are trained again.
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", -1) < resumed_at]
            with open(self.path, "w") as f:
                f.writelines(kept)
        print(self.HEADER, flush=True)

    def step(self, step: int, epoch: int, phase: PhasePlan, lr: float, loss: float) -> None:
        if not self.run.workers.is_main:
            return
        if self.last_step is None:
            self.last_step, self.last_time = step, time.time()  # the first step includes start-up: not timed
        last_of_epoch = (step + 1 - phase.first_step) % phase.steps_per_epoch == 0
        if (step + 1) % self.run.args.log_every and not last_of_epoch and step != self.last_step:
            self._write(step, epoch, phase, lr, loss, None)
            return
        now = time.time()
        steps = step - self.last_step
        rate = steps * phase.phase.batch_size * self.run.workers.size / (now - self.last_time) if steps else None
        self.last_step, self.last_time = step, now
        eta = self._eta(step, phase, rate)
        print(f"{phase.index + 1:>5} {epoch:>5} {f'{step + 1}/{self.plan.total_steps}':>15} {lr:>9.4g} "
              f"{loss:>8.4f} {rate or 0:>8.1f} {eta:>9}", flush=True)
        self._write(step, epoch, phase, lr, loss, rate)

    def _write(self, step, epoch, phase, lr, loss, rate) -> None:
        entry = {"time": round(self.run.wall_seconds(), 3), "step": step, "epoch": epoch, "phase": phase.index,
                 "lr": lr, "loss": loss if math.isfinite(loss) else str(loss)}
        if rate is not None:
            entry["img_per_s"] = round(rate, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _eta(self, step: int, phase: PhasePlan, rate: float | None) -> str:
        """Remaining work in pixels at the current pixel rate (later phases have larger images)."""
        if not rate:
            return "-"
        pixel_rate = rate * phase.phase.image_size ** 2
        remaining = sum(max(0, p.end_step - max(step + 1, p.first_step)) * p.phase.batch_size * p.workers
                        * p.phase.image_size ** 2 for p in self.plan.phases)
        seconds = int(remaining / pixel_rate)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------ resume
def choose_checkpoint(setup: Setup) -> checkpoint.Checkpoint | None:
    """The newest intact checkpoint (rank 0 decides; every rank loads the same step)."""
    args, workers = setup.args, setup.workers
    chosen = None
    if args.resume:
        chosen, damaged = checkpoint.newest_intact(args.run_dir)
        for name, why in damaged:
            workers.print(f"warning: checkpoint {name} is unusable ({why}); using an older one", file=sys.stderr)
    # Every rank verified the same files; rank 0's choice decides, should one of them have seen another.
    step = int(workers.allreduce_sum(float(chosen.step if chosen and workers.is_main else 0), "resume_step"))
    if step == 0:
        if args.resume:
            workers.print(f"no checkpoint in {args.run_dir}: starting from step 0")
        return None
    if chosen is None or chosen.step != step:  # this rank sees other files than rank 0: load rank 0's step
        chosen, _ = checkpoint.problem(checkpoint.prefix_for(args.run_dir, step) + ".json")
    if chosen is None:
        raise SetupError(f"rank {workers.rank} cannot read checkpoint step {step} in {args.run_dir}: every rank "
                         "needs the run dir (a shared file system across machines)")
    recipe_digest = setup.plan.recipe.digest()
    if chosen.record.get("recipe_digest") != recipe_digest:
        raise SetupError(f"{chosen.name} was trained with another recipe (digest {chosen.record.get('recipe_digest')},"
                         f" this one {recipe_digest}): resume with the run's recipe (see run.json)")
    if chosen.record.get("world_size") != workers.size:
        raise SetupError(f"{chosen.name} was trained on {chosen.record.get('world_size')} workers and this run has "
                         f"{workers.size}: the plan's steps depend on it; resume with -np "
                         f"{chosen.record.get('world_size')}")
    if chosen.record.get("model") != args.model:
        raise SetupError(f"{chosen.name} holds a {chosen.record.get('model')} network, not {args.model}: pass "
                         f"--model {chosen.record.get('model')}")
    workers.print(f"resuming from {chosen.name}: step {step}, epoch {chosen.record['epoch']:.3f}")
    return chosen


def write_run_json(setup: Setup) -> None:
    args, plan = setup.args, setup.plan
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
    info = {"recipe": plan.recipe.to_dict(), "recipe_file": args.recipe, "recipe_digest": plan.recipe.digest(),
            "command": sys.argv, "args": vars(args), "versions": versions, "git_revision": revision,
            "world_size": setup.workers.size, "device": str(setup.ctx), "amp": setup.amp, "model": args.model,
            "classes": setup.classes, "train_images": plan.train_images, "lr_scale": plan.lr_scale,
            "data_root": os.path.abspath(args.data_root),
            "phases": [{"first_step": p.first_step, "end_step": p.end_step, "steps_per_epoch": p.steps_per_epoch,
                        "image_size": p.phase.image_size, "data_dir": p.phase.data_dir} for p in plan.phases]}
    path = os.path.join(args.run_dir, "run.json")
    with atomic_open(path) as f:
        json.dump(info, f, indent=1)


# ------------------------------------------------------------------------------------------------ measuring
def measure(setup: Setup) -> None:
    """--synthetic: train steps on random device data; --io-only: the input pipeline alone. Per phase."""
    args, workers = setup.args, setup.workers
    learner = Learner(setup) if args.synthetic else None
    rows = []
    for phase in setup.plan.phases:
        ph = phase.phase
        if args.synthetic:
            shape = (ph.batch_size, 3, ph.image_size, ph.image_size)
            data = mx.nd.random.randint(0, 256, shape=shape, ctx=setup.ctx).astype("uint8")
            label = mx.nd.random.randint(0, len(setup.classes), shape=(ph.batch_size,), ctx=setup.ctx)
            batches = ((data, label) for _ in range(args.bench_steps + 2))
        else:
            iterator = train_iterator(args.data_root, ph.data_dir, ph.image_size, ph.batch_size,
                                      Shard(workers.rank, workers.size), args.seed, setup.threads,
                                      setup.plan.recipe.min_random_area)
            batches = BatchStream(iterator).take(args.bench_steps + 2)
        for k, (data, label) in enumerate(batches):
            if k == 2:  # two warm-up steps: graph building, memory planning, prefetch
                start = time.perf_counter()
            if learner:
                learner.step(data, label, phase.lr_start)
            else:
                data.as_in_context(setup.ctx).wait_to_read()
        seconds = time.perf_counter() - start
        rows.append((phase.index + 1, ph.image_size, ph.batch_size, args.bench_steps * ph.batch_size / seconds))
    what = "compute (synthetic data)" if args.synthetic else "input pipeline (no model)"
    workers.print(f"{what}, {args.bench_steps} steps per phase, {setup.ctx}, {workers.size} workers")
    workers.print(f"{'phase':>5} {'size':>5} {'batch':>5} {'img/s/worker':>13} {'img/s total':>12}")
    for index, size, batch, rate in rows:
        workers.print(f"{index:>5} {size:>5} {batch:>5} {rate:>13.1f} {rate * workers.size:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workers = Workers.start()
    try:
        setup = prepare(args, workers)
        if args.synthetic or args.io_only:
            measure(setup)
            return 0
        resume_from = choose_checkpoint(setup)
        if workers.is_main:
            write_run_json(setup)
            workers.print(f"{setup.plan.total_steps} steps over {len(setup.plan.phases)} phases on {workers.size} "
                          f"worker(s), {setup.ctx}, amp {'on' if setup.amp else 'off'}, lr x {setup.plan.lr_scale:g} "
                          f"({setup.plan.recipe.lr_scaling} scaling from {setup.plan.recipe.reference_workers} "
                          f"workers), {setup.plan.train_images} training images, {len(setup.classes)} classes")
        run = Run(setup, resume_from)
    except (RecipeError, DataError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        run.train()
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
