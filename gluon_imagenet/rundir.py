"""A run folder's own record, run.json, and the names of the files the trainer keeps beside the checkpoints.

run.json is written by the trainer (rank 0) once every check has passed, through RunRecord.write, and read by
the sweep, export, report, resume and TensorBoard through RunRecord.read / read_run (checked: any problem is one
line naming the file) or RunRecord.read_if_any (resume: a missing or damaged run.json is not an error, the
checkpoint records hold the facts). Its keys are RunRecord's fields, in this order; a run.json written before a
field existed reads with that field None (the evaluation defaults then come from its recipe, here only).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from gluon_imagenet.data.packed import DEFAULT_DATA_ROOT
from gluon_imagenet.files import atomic_open

RUN_JSON = "run.json"
TRAIN_LOCK = "train.lock"  # held by rank 0 for the whole run: a second trainer is refused, the sweep's --watch asks it
TENSORBOARD_DIR = "tensorboard"  # the trainer's event files unless --tensorboard DIR / --no-tensorboard


class RunDirError(Exception):
    """run.json is missing or not the shape the trainer writes; the message names the file and what is wrong."""


def tensorboard_dir(run_dir: str, tensorboard: str | None, no_tensorboard: bool) -> str | None:
    """Where the trainer writes its event files (None: --no-tensorboard): the trainer and the sweep ask here."""
    if no_tensorboard:
        return None
    return tensorboard or os.path.join(run_dir, TENSORBOARD_DIR)


@dataclass(frozen=True)
class PlannedPhase:
    """One phase of the plan on the step axis, as run.json's "phases" lists it."""
    first_step: int | None = None  # the phase's first global step
    end_step: int | None = None  # one past its last global step
    steps_per_epoch: int | None = None  # for the run's world size and training images
    image_size: int | None = None  # training crop in pixels
    data_dir: str | None = None  # packed data dir under the data root it trains on

    @classmethod
    def from_dict(cls, raw: dict) -> "PlannedPhase":
        return cls(**{f.name: raw.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class RunRecord:
    """run.json: what a run trains, on what, with which code, and its plan. A field an older run.json lacks is
    None (phases: empty)."""
    recipe: dict | None = None  # the current recipe (recipe.to_dict); the plan below is made from it
    recipe_file: str | None = None  # the --recipe path the trainer was given
    recipe_digest: str | None = None  # recipe.digest() of `recipe`
    command: list | None = None  # the trainer's sys.argv
    args: dict | None = None  # the trainer's options by flag name (train.options.TrainOptions.as_dict())
    versions: dict | None = None  # python, mxnet, gluoncv, numpy, horovod versions (None: not installed)
    git_revision: str | None = None  # the trainer's git HEAD, or "unknown"
    world_size: int | None = None  # Horovod ranks (1: one process)
    device: str | None = None  # rank 0's device, e.g. "cpu" or "gpu(0)"
    amp: bool | None = None  # whether mixed precision is on
    amp_dtype: str | None = None  # float16 / bfloat16, None when AMP is off
    model: str | None = None  # network name (names.MODELS)
    classes: list | None = None  # class names, in label order
    train_images: int | None = None  # training images the plan counts per epoch
    lr_scale: float | None = None  # the factor the recipe's learning rates are multiplied by
    lr_scaling: str | None = None  # the rule that gave lr_scale (recipe.LR_SCALING_RULES)
    data_root: str | None = None  # absolute packed data root the run trains on
    environment: dict | None = None  # MXNet/Horovod environment settings: {name: {value, applied, source, reason}}
    phases: list[PlannedPhase] = field(default_factory=list)  # the current plan's phases, in order
    trained_on: dict | None = None  # classes, training images and data identity per data dir (resume.trained_on)
    recipes: list | None = None  # recipe history: [{digest, recipe, from_step}] (resume.recipe_history)
    eval_image_size: int | None = None  # the recipe's evaluation crop, resolved when run.json was written
    eval_data_dir: str | None = None  # the packed data dir that evaluation crop is read from

    # ------------------------------------------------------------------------------------------------ dicts
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["phases"] = [dataclasses.asdict(p) for p in self.phases]
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "RunRecord":
        """Any object run.json may hold, written by this trainer or an older one: missing keys are None, unknown
        ones are ignored (read_run checks the shape the sweep needs first)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        phases = raw.get("phases")
        values["phases"] = [PlannedPhase.from_dict(p) for p in phases if isinstance(p, dict)] \
            if isinstance(phases, list) else []
        return cls(**values)

    # ------------------------------------------------------------------------------------------------ files
    def write(self, run_dir: str) -> None:
        """Atomically: a crash leaves the previous run.json, never half of one."""
        with atomic_open(os.path.join(run_dir, RUN_JSON)) as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def read(cls, run_dir: str) -> "RunRecord":
        """run.json, checked for what the sweep, export and report read from it; any problem is one RunDirError
        line naming the file."""
        if not os.path.isdir(run_dir):
            raise RunDirError(f"--run-dir {run_dir!r} does not exist")
        path = os.path.join(run_dir, RUN_JSON)
        if not os.path.isfile(path):
            raise RunDirError(f"{path!r} does not exist: not a run folder written by gluon_imagenet.train")
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            raise RunDirError(f"{path} is damaged (not JSON: {e}); gluon_imagenet.train rewrites it on --resume") \
                from None
        problem = shape_problem(run)
        if problem:
            raise RunDirError(f"{path} {problem}: not a run.json written by gluon_imagenet.train")
        return cls.from_dict(run)

    @classmethod
    def read_if_any(cls, run_dir: str) -> "RunRecord | None":
        """run.json as far as it is readable, or None when it is missing, not JSON or not an object (resume: the
        checkpoint records still hold the facts)."""
        try:
            with open(os.path.join(run_dir, RUN_JSON)) as f:
                run = json.load(f)
        except (OSError, ValueError):
            return None
        return cls.from_dict(run) if isinstance(run, dict) else None

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def last_epoch(self) -> float:
        """The epoch the recipe ends at (read() checked that every recipe phase has epochs [start, end])."""
        return float(self.recipe["phases"][-1]["epochs"][1])

    @property
    def final_step(self) -> int:
        """The plan's last step: the final checkpoint's."""
        return int(self.phases[-1].end_step)

    def evaluation_defaults(self) -> tuple[int, str]:
        """(eval image size, eval data dir): the recipe's evaluation setting, resolved when run.json was written;
        for a run.json written before it was recorded, by the recipe's own rule from its recipe."""
        if self.eval_image_size is not None and self.eval_data_dir is not None:
            return self.eval_image_size, self.eval_data_dir
        from gluon_imagenet.recipe import recipe_from_dict
        from gluon_imagenet.recipe_fields import RecipeError

        try:
            recipe = recipe_from_dict(self.recipe, source="run.json's recipe")
        except RecipeError as e:
            raise RunDirError(str(e)) from None
        return recipe.resolved_eval_image_size, recipe.resolved_eval_data_dir

    def data_root_or(self, given: str | None) -> str:
        """The data root a reader of this run uses (the sweep, export): the one given (--data-root), else the one
        the run trained on, else the packer's default."""
        return given or self.data_root or DEFAULT_DATA_ROOT

    def tensorboard_dir(self, run_dir: str) -> str | None:
        """The trainer's event folder for this run (None: trained with --no-tensorboard)."""
        args = self.args or {}
        return tensorboard_dir(run_dir, args.get("tensorboard"), bool(args.get("no_tensorboard")))


def shape_problem(run) -> str:
    """'' when `run` (run.json's content) has what the sweep, export and report read, else what is missing."""
    if not isinstance(run, dict):
        return f"holds a {type(run).__name__}, not an object"
    recipe, phases = run.get("recipe"), run.get("phases")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("phases"), list) or not recipe["phases"]:
        return "has no recipe with phases"
    if not isinstance(phases, list) or not phases or not all(
            isinstance(p, dict) and isinstance(p.get("first_step"), int) and isinstance(p.get("end_step"), int)
            and isinstance(p.get("image_size"), int) and isinstance(p.get("data_dir"), str) for p in phases):
        return "has no plan (phases with first_step, end_step, image_size, data_dir)"
    if not all(isinstance(p, dict) and isinstance(p.get("epochs"), list) and len(p["epochs"]) == 2
               for p in recipe["phases"]):
        return "has a recipe phase without epochs [start, end]"
    return ""


def read_run(run_dir: str) -> RunRecord:
    """RunRecord.read: run.json, checked (RunDirError: one line)."""
    return RunRecord.read(run_dir)
