"""The training run: phase after phase, one input stream per phase, the learning rate from the schedule at every
step, losses read back at log and checkpoint steps, divergence decided by all ranks together, checkpoints.

Every rank runs exactly the planned steps (schedule.py). A rank never decides alone to stop or to skip a
collective: the loss check and the checkpoint's success are allreduced, so under horovodrun either every rank
goes on or every rank stops with the same exit code.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass

import mxnet as mx

from gluon_imagenet import checkpoint
from gluon_imagenet.model import is_running_stat
from gluon_imagenet.data.iterators import Augmentation, BatchStream, Shard, train_iterator
from gluon_imagenet.schedule import PhasePlan, Plan, epoch_at, epochs_done, images_at, lr_at, phase_at
from gluon_imagenet.train.progress import ProgressLog, StepRecord


class Diverged(Exception):
    """The loss stayed non-finite (on some rank) for more steps than allowed."""


class SaveFailed(Exception):
    """A checkpoint could not be written (disk full, permissions): earlier checkpoints are intact."""


@dataclass(frozen=True)
class RunOptions:
    run_dir: str | None  # None: measure-only runs write nothing
    data_root: str
    model: str
    seed: int
    threads: int  # decode threads per rank
    log_every: int
    nan_patience: int  # consecutive non-finite steps tolerated
    save_every_steps: int  # 0: checkpoints at epoch ends only
    keep_mid_epoch: int  # mid-epoch checkpoints kept (0: all)
    trained_on: dict | None = None  # classes, training images and data identity per data dir (resume.trained_on)
    tensorboard_dir: str | None = None  # None: no event files


def augmentation_of(recipe) -> Augmentation:
    return Augmentation(recipe.min_random_area, tuple(recipe.aspect_ratio), recipe.mirror)


def phase_iterator(plan: Plan, phase: PhasePlan, start_step: int, options: RunOptions, ranks, device):
    """The phase's input stream from `start_step` on. Seeded by the step it starts at: an uninterrupted phase
    starts at its first step, so a run resumed at a phase boundary replays the same images in the same order;
    one resumed inside a phase draws a new order (re-creating the stream of an earlier step would mean decoding
    every batch since the phase began)."""
    return train_iterator(options.data_root, phase.data_dir, phase.image_size, phase.batch_size,
                          Shard(ranks.rank, ranks.size), options.seed + start_step, options.threads,
                          augmentation_of(plan.recipe), device.iterator_device_id)


class Run:
    def __init__(self, plan: Plan, learner, ranks, device, options: RunOptions, classes: int,
                 resume_from: checkpoint.Checkpoint | None):
        self.plan, self.learner, self.ranks, self.device, self.options = plan, learner, ranks, device, options
        self.classes = classes
        record = resume_from.record if resume_from else checkpoint.Record()
        self.start_step = record.step or 0
        self.wall_before = record.wall_seconds or 0.0  # accounting continues across resumes
        self.train_seconds = record.train_seconds or 0.0
        self.wall_start = time.time()
        self.bad_steps = 0  # consecutive steps whose loss was not finite on some rank
        self.last_good = resume_from.name if resume_from else None
        self.pending: list[tuple[int, int, int, float, float, mx.nd.NDArray]] = []  # losses not read back yet
        self.last_loss = math.nan
        metrics = f"{options.run_dir}/metrics.jsonl" if options.run_dir else None
        self.log = ProgressLog(metrics, plan, ranks.size, options.log_every, self.start_step, ranks.is_main,
                               options.tensorboard_dir)
        if learner.ema and resume_from:
            restore_ema(learner.ema, resume_from, ranks)

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.wall_start

    def train(self) -> str:
        for phase in self.plan.phases:
            if phase.end_step > self.start_step:
                self.train_phase(phase, max(self.start_step, phase.first_step))
        self.ranks.finish()
        digest = parameter_digest(self.learner.net)
        # Every rank reports: equal digests show the ranks stayed in step.
        print(f"rank {self.ranks.rank}/{self.ranks.size}: finished at step {self.plan.total_steps}, "
              f"parameter digest {digest}", flush=True)
        self.ranks.print(f"done: {self.plan.total_steps} steps, {self.wall_seconds():.0f} s wall, "
                         f"{self.train_seconds:.0f} s training; checkpoints in {self.options.run_dir}")
        return digest

    def train_phase(self, phase: PhasePlan, start: int) -> None:
        """Global steps [start, phase end), from one input stream for the phase's image size and batch size."""
        first_epoch, _ = epoch_at(self.plan, start)
        self.ranks.print(f"phase {phase.index + 1}: epochs {first_epoch}-{phase.epochs[1]}, {phase.image_size} px, "
                         f"batch {phase.batch_size} x {self.ranks.size}, data {phase.data_dir}, lr "
                         f"{phase.lr_start:g} -> {phase.lr_end:g} ({phase.lr_method})")
        if self.learner.ema:
            self.learner.ema.start_phase(phase.steps_per_epoch, start)
        tick = time.time()
        iterator = phase_iterator(self.plan, phase, start, self.options, self.ranks, self.device)
        batches = BatchStream(iterator)
        step, every = start, self.options.save_every_steps
        for epoch in range(first_epoch, phase.epochs[1]):
            epoch_end = phase.first_step + (epoch + 1 - phase.epochs[0]) * phase.steps_per_epoch
            for data, label in batches.take(epoch_end - step):
                lr = lr_at(self.plan, step)
                loss = self.learner.step(data, label, lr)
                # Wait for the step before, not this one: the device stays one step ahead and host memory holds
                # at most two batches in flight. Not under AMP's dynamic loss scale: MXNet's scaler reads one value
                # back per step inside Trainer.step (has_overflow), so the host waits for each step's gradients
                # there; a static `loss_scale` keeps the step free of reads.
                if self.pending:
                    self.pending[-1][-1].wait_to_read()
                self.pending.append((step, epoch, phase.index, lr, self.wall_seconds(), loss))
                step += 1
                if every and step % every == 0 and step < epoch_end:
                    tick = self.save_timed(step, tick)
                elif self.log.is_log_step(step - 1, phase):
                    self.check_losses()
            tick = self.save_timed(step, tick)
        del batches, iterator  # release this phase's decode threads and buffers before the next phase

    def check_losses(self) -> float:
        """Read the pending losses back (one synchronisation), log them, and stop every rank together when some
        rank's loss stayed non-finite for more than nan_patience consecutive steps. Returns the last loss."""
        if not self.pending:
            return self.last_loss
        losses = mx.nd.concat(*[p[-1].reshape((1,)) for p in self.pending], dim=0).asnumpy().tolist()
        # Summed over ranks: a step is bad when its loss was not finite on any rank (its gradient, averaged
        # over ranks, then reaches every rank).
        bad = self.ranks.allreduce_sums([0.0 if math.isfinite(x) else 1.0 for x in losses], "loss_check")
        records = []
        for (step, epoch, phase, lr, wall, _), loss, nonfinite in zip(self.pending, losses, bad):
            records.append(StepRecord(step, epoch, phase, lr, loss, wall))
            self.bad_steps = self.bad_steps + 1 if nonfinite else 0
            if self.bad_steps > self.options.nan_patience:
                self.pending = []
                self.log.write(records)
                raise Diverged(f"the loss was not finite for {self.bad_steps} consecutive steps (up to step {step}, "
                               f"lr {lr:g}); the last good checkpoint is {self.last_good or 'none'} in "
                               f"{self.options.run_dir}. Lower the learning rate or check the data, then --resume.")
        self.pending = []
        self.log.write(records)
        self.last_loss = losses[-1]
        return self.last_loss

    def save_timed(self, step: int, tick: float) -> float:
        """Save, keeping the time spent saving out of the training seconds; returns the new start tick."""
        loss = self.check_losses()
        self.train_seconds += time.time() - tick
        self.save(step, loss)
        return time.time()

    def save(self, step: int, loss: float) -> None:
        self.ranks.average_running_stats(self.learner.net)  # every rank takes part
        if self.learner.ema:
            self.ranks.average_arrays(self.learner.ema.arrays_that_differ_across_ranks(), "ema")
        if self.bad_steps:
            self.ranks.print(f"warning: not saving step {step}: the loss is not finite", file=sys.stderr)
            return
        if not running_stats_finite(self.learner.net):  # the same averaged values on every rank: a joint decision
            # One non-finite forward pass (a float16 overflow, an extreme image) poisons BatchNorm's running
            # averages for good, while training-mode outputs (batch statistics) and the loss stay finite.
            raise Diverged(f"BatchNorm running statistics are not finite at step {step} (a non-finite forward pass: "
                           f"an extreme or corrupt image, or a float16 overflow); the last good checkpoint is "
                           f"{self.last_good or 'none'} in {self.options.run_dir}: --resume from it")
        failure = ""
        if self.ranks.is_main:
            try:
                extra = {checkpoint.EMA_EXT: self.learner.ema.save} if self.learner.ema else {}
                saved = checkpoint.save(self.options.run_dir, step, self.learner.net, self.learner.trainer,
                                        self.record(step, loss), extra)
                self.last_good = saved.name
                if self.options.keep_mid_epoch:
                    checkpoint.prune_mid_epoch(self.options.run_dir, self.options.keep_mid_epoch)
            except OSError as e:
                failure = f"{e.strerror or e}"
            except mx.base.MXNetError as e:  # MXNet's writers: "... Check failed: fwrite(...) == size: ..."
                failure = str(e).strip().splitlines()[-1].replace("MXNetError: ", "")
        # Every rank learns whether rank 0 could save: one rank stopping alone would leave the others waiting.
        if self.ranks.allreduce_sum(1.0 if failure else 0.0, "save_check"):
            raise SaveFailed(f"could not write checkpoint step {step} in {self.options.run_dir}"
                             f"{' (' + failure + ')' if failure else ''}; the earlier checkpoints are intact "
                             f"(newest: {self.last_good or 'none'}): free space or fix the folder, then --resume")

    def record(self, step: int, loss: float) -> checkpoint.Record:
        """The checkpoint's record after `step` steps (checkpoint.save adds the step and the files)."""
        epoch, _ = epoch_at(self.plan, step - 1)
        phase = phase_at(self.plan, step - 1)
        ema = self.learner.ema
        scaler = self.learner.loss_scaler_state()
        return checkpoint.Record(
            epoch=epochs_done(self.plan, step), epoch_index=epoch, phase=phase.index, image_size=phase.image_size,
            data_dir=phase.data_dir, images_seen=images_at(self.plan, step), wall_seconds=self.wall_seconds(),
            train_seconds=self.train_seconds, recipe_digest=self.plan.recipe.digest(), world_size=self.ranks.size,
            model=self.options.model, classes=self.classes, lr=lr_at(self.plan, step - 1), loss=loss,
            final=step == self.plan.total_steps, amp=self.learner.amp_dtype, recipe=self.plan.recipe.to_dict(),
            trained_on=self.options.trained_on or None,  # what a resume compares (resume.check)
            ema={"half_life_epochs": ema.half_life_epochs, "every_steps": ema.every_steps} if ema else None,
            loss_scaler=scaler or None, loss_scale=scaler["loss_scale"] if scaler else None)


def restore_ema(ema, ckpt: checkpoint.Checkpoint, ranks) -> None:
    """The averages saved with the checkpoint; a checkpoint saved without them (an older trainer) starts them
    from its weights, and says so."""
    if checkpoint.EMA_EXT in ckpt.record.files:
        ema.load(ckpt.ema_params_path)
    else:
        ranks.print(f"warning: {ckpt.name} has no {checkpoint.EMA_EXT} file: the weight EMA starts again from its "
                    "weights", file=sys.stderr)


def running_stats_finite(net) -> bool:
    flags = [mx.nd.contrib.isfinite(p.data()).min() for name, p in net._collect_params_with_prefix().items()
             if is_running_stat(name, p)]
    return bool(mx.nd.concat(*[f.reshape((1,)) for f in flags], dim=0).min().asscalar()) if flags else True


def parameter_digest(net) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(net._collect_params_with_prefix().items()):
        digest.update(name.encode())
        digest.update(param.data().asnumpy().tobytes())
    return digest.hexdigest()[:16]
