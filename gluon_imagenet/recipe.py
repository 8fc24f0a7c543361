"""Training recipes: a list of phases plus run-wide settings, loaded from YAML and validated before any work.

A recipe is data. Every field is declared below with its unit; a key that no field declares is an error, not
silently ignored. Loading checks what the recipe file says and raises RecipeError naming the file, the phase,
the field, the bad value and what is allowed; whether packed data is fit to train it on is packed.check_for's
check (the trainer, the doctor and `show --data-root` make it).

Show the plan a recipe makes for a given number of workers and training images:

    python -m gluon_imagenet.recipe show recipes/imagenet104.yaml --workers 8 --train-images 1281167
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from gluon_imagenet.data.packed import check_for, size_problem
from gluon_imagenet.recipe_fields import (RecipeError, _as_float, _as_int, _boolean, _choice, _integer, _number, _pair,
                                          _reject_unknown, _text)

LR_METHODS = ("linear", "exp", "cosine")


LR_SCALING_RULES = ("linear", "none")


# nag: Nesterov momentum, the seed's; MXNet updates its parameters one by one. sgd: heavy-ball momentum through
# MXNet's aggregated multi-tensor update (multi_sgd_mom_update), as NVIDIA's MLPerf ResNet-50 runs.
OPTIMIZERS = ("nag", "sgd")


# Images per worker per step. The largest ResNet-50 batches on one accelerator are a few thousand images; a
# larger value is a typo, and would fail only when the input pipeline tries to allocate it.
MAX_BATCH_SIZE = 16384


@dataclass(frozen=True)
class Phase:
    epochs: tuple[int, int]  # [start, end) in epochs over the whole training set
    lr: tuple[float, float]  # learning rate at the phase's first and last step, for reference_workers workers
    lr_method: str  # how lr goes from lr[0] to lr[1], per iteration: linear, exp (geometric) or cosine
    batch_size: int  # images per worker per step
    image_size: int  # training crop, pixels (square)
    data_dir: str  # packed data folder, relative to the data root: DATA_ROOT/<data_dir>/train.rec

    @property
    def num_epochs(self) -> int:
        return self.epochs[1] - self.epochs[0]


@dataclass(frozen=True)
class EmaSettings:
    """An exponential moving average of the weights and BatchNorm statistics (ema.py), saved beside each
    checkpoint."""
    half_life_epochs: float  # epochs of the phase being trained after which the starting weights weigh 1/2
    every_steps: int = 1  # update every K steps (the decay raised to K)


@dataclass(frozen=True)
class Recipe:
    phases: tuple[Phase, ...]
    reference_workers: int = 8  # number of workers the lr values were written for
    lr_scaling: str = "linear"  # how lr changes with another number of workers: linear (x workers/reference) or none
    weight_decay: float = 0.0  # L2 penalty on weights (not on BatchNorm or biases)
    momentum: float = 0.9  # momentum coefficient (Nesterov's for nag, heavy-ball for sgd)
    optimizer: str = "nag"  # nag or sgd (OPTIMIZERS)
    # AMP's loss scale: "dynamic" (MXNet's scaler: starts at 2**16, halves on overflow and skips the step; it
    # reads one value back from the device every step) or a fixed number (no read-back; an overflow then shows as
    # a non-finite loss, which stops the run through the divergence check). Unused without AMP.
    loss_scale: float | str = "dynamic"
    label_smoothing: float = 0.0  # probability mass spread over all classes, 0 = off
    min_random_area: float = 0.08  # smallest random-resized crop, as a fraction of the image's area
    aspect_ratio: tuple[float, float] = (0.75, 4 / 3)  # random-resized crop's width / height, [min, max]
    mirror: bool = True  # random horizontal flips; turn off where left and right differ (digits, text, signs)
    warmup_epochs: float = 0.0  # lr ramps linearly from ~0 to the schedule over this many epochs, 0 = off
    eval_image_size: int = 0  # evaluation center crop, pixels; 0 = the last phase's image_size
    eval_data_dir: str = ""  # packed data folder holding val.rec; "" = the last phase's data_dir
    ema: EmaSettings | None = None  # weight EMA; None = off
    name: str = ""  # free text shown in logs
    source: str = field(default="", compare=False)  # file the recipe came from (not a YAML key)

    @property
    def total_epochs(self) -> int:
        return self.phases[-1].epochs[1]

    @property
    def resolved_eval_image_size(self) -> int:
        return self.eval_image_size or self.phases[-1].image_size

    @property
    def resolved_eval_data_dir(self) -> str:
        return self.eval_data_dir or self.phases[-1].data_dir

    def phase_label(self, index: int) -> str:
        """How messages name phase `index`: "phase 2 (epochs [3, 5))"."""
        return _phase_name(index, self.phases[index])

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        if out["ema"] is None:  # recipes without it keep the digest they had before the field existed
            out.pop("ema")
        out["phases"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}
            for p in self.phases
        ]
        return out

    def digest(self) -> str:
        """Short hash of the recipe's content: a checkpoint records it so resume refuses another recipe."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_PHASE_FIELDS = {f.name for f in dataclasses.fields(Phase)}


_RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)} - {"source"}


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe file (its packed data: packed.check_for)."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return recipe_from_dict(raw, source=path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently:
    `reference_workers: 1` then `4` would scale every lr by 0.25 without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def recipe_from_dict(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'phases' list, got {type(raw).__name__}")
    _reject_unknown(raw, _RECIPE_FIELDS, source)
    if "phases" not in raw or not isinstance(raw["phases"], list) or not raw["phases"]:
        raise RecipeError(f"{source}: field 'phases': a non-empty list of phases is required")
    phases = tuple(_parse_phase(p, i, source) for i, p in enumerate(raw["phases"]))
    _check_phase_sequence(phases, source)

    where = source
    # A field the recipe leaves out takes the dataclass field's default (Recipe.X): its one owner.
    kwargs: dict[str, Any] = {"phases": phases, "source": source}
    kwargs["reference_workers"] = _integer(raw, "reference_workers", Recipe.reference_workers, where, minimum=1)
    kwargs["lr_scaling"] = _choice(raw, "lr_scaling", Recipe.lr_scaling, LR_SCALING_RULES, where)
    kwargs["weight_decay"] = _number(raw, "weight_decay", Recipe.weight_decay, where, minimum=0.0)
    kwargs["momentum"] = _number(raw, "momentum", Recipe.momentum, where, minimum=0.0, below=1.0)
    kwargs["optimizer"] = _choice(raw, "optimizer", Recipe.optimizer, OPTIMIZERS, where)
    kwargs["loss_scale"] = _loss_scale(raw, where)
    kwargs["label_smoothing"] = _number(raw, "label_smoothing", Recipe.label_smoothing, where, minimum=0.0, below=1.0)
    kwargs["min_random_area"] = _number(raw, "min_random_area", Recipe.min_random_area, where, minimum=0.01)
    if kwargs["min_random_area"] > 1:
        raise RecipeError(f"{where}: field 'min_random_area': {kwargs['min_random_area']} must be <= 1")
    kwargs["aspect_ratio"] = _aspect_ratio(raw, where)
    kwargs["mirror"] = _boolean(raw, "mirror", Recipe.mirror, where)
    kwargs["warmup_epochs"] = _number(raw, "warmup_epochs", Recipe.warmup_epochs, where, minimum=0.0)
    kwargs["eval_image_size"] = _integer(raw, "eval_image_size", Recipe.eval_image_size, where, minimum=0)
    kwargs["eval_data_dir"] = _text(raw, "eval_data_dir", Recipe.eval_data_dir, where)
    kwargs["name"] = _text(raw, "name", Recipe.name, where)
    kwargs["ema"] = _ema(raw, where)
    if kwargs["warmup_epochs"] > phases[-1].epochs[1]:
        raise RecipeError(
            f"{where}: field 'warmup_epochs': {kwargs['warmup_epochs']} is longer than the whole recipe "
            f"({phases[-1].epochs[1]} epochs)")
    recipe = Recipe(**kwargs)
    too_large = size_problem(recipe, None)  # a numeric data_dir names its short side: no data needed to see it
    if too_large:
        raise RecipeError(too_large)
    return recipe


def _phase_name(index: int, phase: Phase | None = None) -> str:
    if phase is None:
        return f"phase {index + 1}"
    return f"phase {index + 1} (epochs [{phase.epochs[0]}, {phase.epochs[1]}))"


def _parse_phase(raw: Any, index: int, source: str) -> Phase:
    where = f"{source}: {_phase_name(index)}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a phase is a mapping of {', '.join(sorted(_PHASE_FIELDS))}, got {raw!r}")
    _reject_unknown(raw, _PHASE_FIELDS, where)
    missing = sorted(_PHASE_FIELDS - set(raw))
    if missing:
        raise RecipeError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    epochs = _pair(raw, "epochs", where, _as_int)
    where = f"{source}: {_phase_name(index)} (epochs [{epochs[0]}, {epochs[1]}))"
    if epochs[0] < 0 or epochs[1] <= epochs[0]:
        raise RecipeError(f"{where}: field 'epochs': {list(epochs)} must be [start, end) with 0 <= start < end")
    lr = _pair(raw, "lr", where, _as_float)
    lr_method = _choice(raw, "lr_method", None, LR_METHODS, where)
    if lr_method == "exp" and min(lr) <= 0:
        raise RecipeError(f"{where}: field 'lr': {list(lr)} must be > 0 at both ends for lr_method 'exp' "
                          "(geometric interpolation); use 'linear' to reach 0")
    if min(lr) < 0:
        raise RecipeError(f"{where}: field 'lr': {list(lr)} must not be negative")
    data_dir = raw["data_dir"]
    if isinstance(data_dir, int) and not isinstance(data_dir, bool):
        data_dir = str(data_dir)  # `data_dir: 160` means the folder "160"
    if not isinstance(data_dir, str) or not data_dir or os.path.isabs(data_dir):
        raise RecipeError(f"{where}: field 'data_dir': {data_dir!r} must be a folder name relative to the data root")
    return Phase(
        epochs=epochs,
        lr=lr,
        lr_method=lr_method,
        batch_size=_integer(raw, "batch_size", None, where, minimum=1, maximum=MAX_BATCH_SIZE),
        image_size=_integer(raw, "image_size", None, where, minimum=8),
        data_dir=data_dir,
    )


def _check_phase_sequence(phases: tuple[Phase, ...], source: str) -> None:
    if phases[0].epochs[0] != 0:
        raise RecipeError(f"{source}: {_phase_name(0, phases[0])}: field 'epochs': the first phase must start at "
                          f"epoch 0, not {phases[0].epochs[0]}")
    for i in range(1, len(phases)):
        before, here = phases[i - 1].epochs[1], phases[i].epochs[0]
        if here != before:
            kind = "gap" if here > before else "overlap"
            raise RecipeError(
                f"{source}: {_phase_name(i, phases[i])}: field 'epochs': {kind} with the previous phase, which "
                f"ends at epoch {before}; this phase must start at epoch {before}, not {here}")


def _aspect_ratio(raw, where):
    if "aspect_ratio" not in raw:
        return Recipe.aspect_ratio
    low, high = _pair(raw, "aspect_ratio", where, _as_float)
    if not 0 < low <= high:
        raise RecipeError(f"{where}: field 'aspect_ratio': {[low, high]} must be [min, max] with 0 < min <= max "
                          "(width / height of the random crop; 1 = square only)")
    return (low, high)


def _loss_scale(raw, where):
    value = raw.get("loss_scale", Recipe.loss_scale)
    if value == "dynamic":
        return value
    try:
        scale = _as_float(value)
    except (TypeError, ValueError):
        scale = 0.0
    if not 1 <= scale <= 2.0 ** 24:
        raise RecipeError(f"{where}: field 'loss_scale': {value!r} must be 'dynamic' or a number in [1, 2**24] "
                          "(the seed used 256)")
    return scale


_EMA_FIELDS = {f.name for f in dataclasses.fields(EmaSettings)}


def _ema(raw, where):
    value = raw.get("ema")
    if value is None:
        return None
    shape = "a mapping {half_life_epochs: H, every_steps: K} (K defaults to 1), or null for off"
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: field 'ema': {value!r} must be {shape}")
    unknown = sorted(set(map(str, value)) - _EMA_FIELDS)
    if unknown:
        raise RecipeError(f"{where}: field 'ema': unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                          f"{', '.join(sorted(_EMA_FIELDS))}")
    if "half_life_epochs" not in value:
        raise RecipeError(f"{where}: field 'ema.half_life_epochs' is missing: {shape}")
    half_life = value["half_life_epochs"]
    try:
        half_life = _as_float(half_life)
    except (TypeError, ValueError):
        half_life = -1.0
    if half_life <= 0:
        raise RecipeError(f"{where}: field 'ema.half_life_epochs': {value['half_life_epochs']!r} must be a number "
                          "of epochs > 0 (e.g. 0.5)")
    every = value.get("every_steps", EmaSettings.every_steps)
    try:
        every = _as_int(every) if not isinstance(every, str) else int("x")
    except (TypeError, ValueError):
        every = 0
    if every < 1:
        raise RecipeError(f"{where}: field 'ema.every_steps': {value.get('every_steps')!r} must be a whole number "
                          ">= 1 (update the average every K steps)")
    return EmaSettings(half_life, every)


def main(argv: list[str] | None = None) -> int:
    from gluon_imagenet.schedule import PlanError, format_plan, make_plan

    parser = argparse.ArgumentParser(prog="python -m gluon_imagenet.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser(
        "show", help="validate a recipe and print its plan",
        description="Validate the recipe (and, with --data-root, the packed data it needs) and print its plan for "
                    "--workers workers and --train-images images: the lr scaling, then one row per phase (epochs, "
                    "steps, first and last step, images, lr at its start and end, lr method, image size, batch "
                    "per worker, data dir, PFLOP) and the totals. Reads only the recipe and the data root, writes "
                    "nothing; exit 2 with the reason when either is wrong.")
    show.add_argument("recipe", help="recipe YAML, e.g. recipes/imagenet104.yaml")
    show.add_argument("--workers", type=int, default=None, help="number of workers (default: the recipe's)")
    show.add_argument("--train-images", type=int, default=1281167, help="training images (default: ImageNet's)")
    show.add_argument("--data-root", default=None, help="also check the packed data under this root")
    show.add_argument("--lr-scaling", choices=LR_SCALING_RULES, default=None,
                      help="override the recipe's lr scaling rule")
    args = parser.parse_args(argv)
    try:
        for flag, value in (("--workers", args.workers), ("--train-images", args.train_images)):
            if value is not None and value < 1:  # 0 would silently show the reference plan
                raise RecipeError(f"{flag} {value}: must be a whole number >= 1 (leave --workers out for the "
                                  "recipe's reference_workers)")
        recipe = load_recipe(args.recipe)
        problems = check_for(recipe, args.data_root, eval_split=True) if args.data_root is not None else []
        if problems:
            raise RecipeError("; ".join(map(str, problems)))
        workers = args.workers if args.workers is not None else recipe.reference_workers
        plan = make_plan(recipe, train_images=args.train_images, workers=workers, lr_scaling=args.lr_scaling)
    except (RecipeError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return print_quietly(format_plan(plan))


def print_quietly(text: str) -> int:
    """Print to a reader that may stop early (`recipe show ... | head -1`): a closed pipe ends the command
    quietly, as for any Unix tool, instead of a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the broken pipe there: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())


# The run-wide fields a resume compares: everything but the phases (compared one by one) and where it came from.
_RUN_WIDE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("phases", "source"))


def resume_edit_problem(trained: Recipe, new: Recipe, started_phases: int) -> str:
    """Why `new` cannot continue a run trained with `trained` whose first `started_phases` phases have started
    ("" when it can). Run-wide fields and every started phase must be unchanged (they made the parameters and the
    step axis the checkpoint sits on); phases not started yet may change in any way, be added or removed."""
    for name in _RUN_WIDE_FIELDS:
        before, after = getattr(trained, name), getattr(new, name)
        if before != after:
            return f"run-wide field {name!r} is {_shown(before)} there and {_shown(after)} here"
    if len(new.phases) < started_phases:
        return (f"phase {started_phases} has started, and this recipe has {len(new.phases)} phase(s): keep every "
                "started phase")
    for index in range(started_phases):
        for name in _PHASE_FIELDS_IN_ORDER:
            before, after = getattr(trained.phases[index], name), getattr(new.phases[index], name)
            if before != after:
                return (f"{_phase_name(index, trained.phases[index])} has started and its field {name!r} is "
                        f"{_shown(before)} there and {_shown(after)} here")
    return ""


_PHASE_FIELDS_IN_ORDER = tuple(f.name for f in dataclasses.fields(Phase))


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):  # as the recipe writes it: {half_life_epochs: ..., every_steps: ...}
        return repr(dataclasses.asdict(value))
    return repr(list(value) if isinstance(value, tuple) else value)
