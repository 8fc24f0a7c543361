"""The training plan and the learning-rate schedule: pure functions of (recipe, workers, training images, step).

The plan is computed once: every phase's steps per epoch come from its per-worker batch size and the number of
workers, so phase boundaries fall on fixed global steps. Every rank runs exactly those steps, whatever the size
of its shard. The learning rate is then a function of the global step alone, interpolated per iteration within
a phase (linear, exp = geometric, or cosine), as the seed's `lr_method` describes.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass


class PlanError(ValueError):
    """A plan that cannot be made (no training images, no workers, an unknown rule)."""


# ResNet-50 forward pass at 224 px: ~4.1 GMAC per image; forward + backward ~3x that; 1 MAC = 2 FLOPs.
RESNET50_TRAIN_FLOPS_224 = 3 * 4.1e9 * 2


def steps_per_epoch(train_images: int, batch_size: int, workers: int) -> int:
    """Steps that cover every training image once when each of `workers` ranks takes `batch_size` per step.
    Rounded up: ranks whose shard runs out first wrap around rather than stop (Horovod must not wait)."""
    return math.ceil(train_images / (batch_size * workers))


def lr_scale_for_workers(workers: int, reference_workers: int, rule: str) -> float:
    """The factor applied to every recipe lr when training on `workers` instead of `reference_workers`.

    linear: the linear scaling rule (Goyal et al. 2017): the global batch grows with the workers, so does lr.
    none: use the recipe's lr as written.
    """
    if rule == "none":
        return 1.0
    if rule == "linear":
        return workers / reference_workers
    raise PlanError(f"lr scaling rule {rule!r} is not one of linear, none")


def train_flops_per_image(image_size: int) -> float:
    """Approximate ResNet-50 training FLOPs (forward + backward) for one square image; scales with pixels."""
    return RESNET50_TRAIN_FLOPS_224 * (image_size / 224) ** 2


@dataclass(frozen=True)
class PhasePlan:
    index: int  # 0-based phase number
    phase: "recipe.Phase"  # this module reads recipes (recipe.py), never imports them
    steps_per_epoch: int
    first_step: int  # global step of the phase's first step
    end_step: int  # global step just after its last step
    lr_start: float  # scaled for the plan's workers
    lr_end: float
    workers: int

    # The phase's own settings, read through the plan (a PhasePlan is a recipe phase placed on the step axis).
    @property
    def epochs(self) -> tuple[int, int]:
        return self.phase.epochs

    @property
    def image_size(self) -> int:
        return self.phase.image_size

    @property
    def batch_size(self) -> int:
        return self.phase.batch_size

    @property
    def data_dir(self) -> str:
        return self.phase.data_dir

    @property
    def lr_method(self) -> str:
        return self.phase.lr_method

    @property
    def steps(self) -> int:
        return self.end_step - self.first_step

    @property
    def images(self) -> int:
        """Images processed (including the wrap-around that fills the last step of each epoch)."""
        return self.steps * self.batch_size * self.workers

    @property
    def flops(self) -> float:
        return self.images * train_flops_per_image(self.image_size)

    def lr(self, step: int) -> float:
        """Learning rate at global `step` inside this phase, before warm-up."""
        progress = (step - self.first_step) / self.steps  # 0 at the first step, -> 1 at the next phase's first
        return interpolate(self.lr_method, self.lr_start, self.lr_end, progress)


@dataclass(frozen=True)
class Plan:
    recipe: "recipe.Recipe"
    workers: int
    train_images: int
    lr_scale: float
    warmup_steps: int
    phases: tuple[PhasePlan, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end_step

    @property
    def total_epochs(self) -> int:
        return self.recipe.total_epochs

    @property
    def lr_scaling(self) -> str:
        return self.recipe.lr_scaling


def interpolate(method: str, start: float, end: float, progress: float) -> float:
    """Value at `progress` in [0, 1] going from start to end."""
    if method == "linear":
        return start + (end - start) * progress
    if method == "exp":
        return start * (end / start) ** progress
    if method == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    raise PlanError(f"lr_method {method!r} is not one of linear, exp, cosine")


def make_plan(recipe: "recipe.Recipe", train_images: int, workers: int, lr_scaling: str | None = None) -> Plan:
    """The plan for `workers` ranks over `train_images`. `lr_scaling` overrides the recipe's rule (the command
    lines' --lr-scaling): the plan's recipe then carries it, so its digest (which resume checks) does too."""
    if lr_scaling:
        recipe = dataclasses.replace(recipe, lr_scaling=lr_scaling)
    if train_images < 1:
        raise PlanError(f"train_images: {train_images} must be >= 1 (is the packed train.rec empty?)")
    if workers < 1:
        raise PlanError(f"workers: {workers} must be >= 1")
    scale = lr_scale_for_workers(workers, recipe.reference_workers, recipe.lr_scaling)
    phases, step = [], 0
    for index, phase in enumerate(recipe.phases):
        per_epoch = steps_per_epoch(train_images, phase.batch_size, workers)
        end = step + per_epoch * phase.num_epochs
        phases.append(PhasePlan(index, phase, per_epoch, step, end, phase.lr[0] * scale, phase.lr[1] * scale,
                                workers))
        step = end
    plan = Plan(recipe, workers, train_images, scale, 0, tuple(phases))
    if not recipe.warmup_epochs:
        return plan
    return dataclasses.replace(plan, warmup_steps=round(step_at_epoch(plan, recipe.warmup_epochs)))


def phase_at(plan: Plan, step: int) -> PhasePlan:
    if not 0 <= step < plan.total_steps:
        raise IndexError(f"step {step} is outside the plan's [0, {plan.total_steps})")
    starts = [p.first_step for p in plan.phases]
    return plan.phases[bisect.bisect_right(starts, step) - 1]


def lr_at(plan: Plan, step: int) -> float:
    """The learning rate for global `step` (0-based), scaled for the plan's workers, warm-up included."""
    lr = phase_at(plan, step).lr(step)
    if step < plan.warmup_steps:
        lr *= (step + 1) / plan.warmup_steps
    return lr


def epoch_at(plan: Plan, step: int) -> tuple[int, int]:
    """(epoch, step within that epoch) of global `step`; step == total_steps gives (total_epochs, 0)."""
    if step == plan.total_steps:
        return plan.total_epochs, 0
    p = phase_at(plan, step)
    done, within = divmod(step - p.first_step, p.steps_per_epoch)
    return p.epochs[0] + done, within


def epochs_done(plan: Plan, step: int) -> float:
    """Epochs completed after `step` steps, fractional within an epoch."""
    if step >= plan.total_steps:
        return float(plan.total_epochs)
    epoch, within = epoch_at(plan, step)
    return epoch + within / phase_at(plan, step).steps_per_epoch


def images_at(plan: Plan, step: int) -> int:
    """Images processed by all workers together in the first `step` steps."""
    return sum(max(0, min(step, p.end_step) - p.first_step) * p.batch_size * p.workers for p in plan.phases)


def step_at_epoch(plan: Plan, epoch: float) -> float:
    """Global step where (fractional) `epoch` begins."""
    for p in plan.phases:
        start, end = p.epochs
        if epoch <= end:
            return p.first_step + (max(epoch, start) - start) * p.steps_per_epoch
    return float(plan.total_steps)


def format_plan(plan: Plan) -> str:
    r = plan.recipe
    lines = [
        f"recipe {r.source or r.name}: {len(plan.phases)} phases, {plan.total_epochs} epochs, "
        f"{plan.train_images:,} training images, {plan.workers} workers",
        f"lr scaling: {r.lr_scaling} rule, recipe written for {r.reference_workers} workers -> "
        f"lr x {plan.lr_scale:g}" + (f"; warm-up over the first {plan.warmup_steps} steps" if plan.warmup_steps
                                     else ""),
        "",
        f"{'phase':>5} {'epochs':>9} {'steps':>8} {'first':>8} {'last':>8} {'images':>14} {'lr start':>9} "
        f"{'lr end':>9} {'method':>6} {'size':>5} {'batch':>5} {'data':>6} {'PFLOP':>9}",
    ]
    for p in plan.phases:
        ph = p.phase
        lines.append(
            f"{p.index + 1:>5} {f'{ph.epochs[0]}-{ph.epochs[1]}':>9} {p.steps:>8,} {p.first_step:>8,} "
            f"{p.end_step - 1:>8,} {p.images:>14,} {p.lr_start:>9.4g} {p.lr_end:>9.4g} {ph.lr_method:>6} "
            f"{ph.image_size:>5} {ph.batch_size:>5} {ph.data_dir:>6} {p.flops / 1e15:>9,.1f}")
    images = sum(p.images for p in plan.phases)
    flops = sum(p.flops for p in plan.phases)
    lines.append(f"{'total':>5} {plan.total_epochs:>9} {plan.total_steps:>8,} {'':>8} {'':>8} {images:>14,} "
                 f"{'':>9} {'':>9} {'':>6} {'':>5} {'':>5} {'':>6} {flops / 1e15:>9,.1f}")
    lines.append("")
    lines.append("batch is per worker; images include the wrap-around filling each epoch's last step; PFLOP is "
                 "ResNet-50 forward+backward (~3 x 4.1 GMAC/image at 224 px, scaled by pixels)")
    return "\n".join(lines)


def shard_sizes(train_images: int, parts: int) -> list[int]:
    """Images in each rank's part of a .rec, as ImageRecordIter's `num_parts`/`part_index` cut it (dmlc's indexed
    RecordIO splitter: ceil(images / parts) records each, the last parts taking what is left, possibly none).
    Measured here: 21 images in 4 parts are 6, 6, 6, 3; in 8 parts the last one is empty."""
    per_part = math.ceil(train_images / parts)
    return [max(0, min(per_part, train_images - k * per_part)) for k in range(parts)]


def check_batches_fit(plan: Plan) -> None:
    """Refuse a phase whose batch is larger than some rank's shard. ImageRecordIter fills a batch from one pass
    over its shard: with fewer images than the batch it trains a step, then fails at its reset ("number of
    input images must be bigger than the batch size"), and an empty shard (more ranks than images) stops at
    once; both only after the run started and wrote its first checkpoint."""
    smallest = min(shard_sizes(plan.train_images, plan.workers))
    for p in plan.phases:
        if p.batch_size > smallest:
            spread = (f"{plan.train_images} training image(s)" if plan.workers == 1 else
                      f"{plan.train_images} training image(s) over {plan.workers} ranks, the smallest shard "
                      f"holding {smallest}")
            fix = f"lower batch_size to <= {smallest}" if smallest else "use fewer ranks"
            raise PlanError(f"phase {p.index + 1}: batch_size {p.batch_size} is more than the {smallest} image(s) "
                            f"per rank ({spread}): {fix}, or pack more training images")
