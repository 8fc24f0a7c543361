"""What `--resume` checks before anything is written: the chosen checkpoint's record against the new run's facts.

A checkpoint continues only the run that made it: the same classes, the same training images (count and packed
content, per data dir), the same workers, model and AMP setting, and a recipe whose run-wide fields and started
phases are unchanged (phases none of whose steps the checkpoint holds may be edited, added or removed:
recipe.resume_edit_problem). Each mismatch is one line naming the fact, the checkpoint's value, this run's and
the fix. Records written before a fact was recorded lack it: what is not recorded is not compared.

run.json keeps the history of recipes ("recipes": which digest trained from which step on), while its "recipe",
"recipe_digest" and "phases" stay the current plan (the sweep and export read those).
"""
from __future__ import annotations

from gluon_imagenet.data.packed import data_identity, packed_count
from gluon_imagenet.recipe import recipe_from_dict, resume_edit_problem
from gluon_imagenet.recipe_fields import RecipeError
from gluon_imagenet.rundir import RunRecord
from gluon_imagenet.schedule import PlanError, make_plan


class ResumeRefused(Exception):
    """The checkpoint cannot continue this run; the message names the fact and the fix."""


def trained_on(plan, classes: list[str], data_root: str) -> dict:
    """The data facts recorded in run.json and every checkpoint record (key "trained_on")."""
    data_dirs = sorted({p.data_dir for p in plan.phases})
    return {"classes": list(classes),
            "train_images": {d: packed_count(data_root, d, "train") for d in data_dirs},
            "train_data": {d: data_identity(data_root, d, "train") for d in data_dirs}}


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _names(classes: list) -> str:
    shown = ", ".join(map(str, classes[:4]))
    return shown + (", ..." if len(classes) > 4 else "")


def check(ckpt, plan, facts: dict, world_size: int, model: str, amp_dtype: str | None, data_root: str,
          run_record: RunRecord | None) -> None:
    """Raise ResumeRefused when checkpoint `ckpt` (checkpoint.Checkpoint) cannot continue into `plan`;
    `run_record`: the run dir's run.json (None: missing or unreadable)."""
    record, name = ckpt.record, ckpt.name
    run_record = run_record or RunRecord()
    recorded = {key: value for key, value in _mapping(record.trained_on).items()
                if isinstance(value, (dict, list))}
    trained_root = run_record.data_root
    other_data = (f"resume with the data root it was trained on{f' ({trained_root})' if trained_root else ''}, "
                  "or train this data in a new --run-dir")
    classes = facts["classes"]
    if isinstance(recorded.get("classes"), list):
        if recorded["classes"] != classes:
            old = recorded["classes"]
            if len(old) == len(classes):  # the same count: name the first label that differs
                label = next(i for i, (a, b) in enumerate(zip(old, classes)) if a != b)
                raise ResumeRefused(f"{name} was trained with class {label} = {old[label]!r} and data root "
                                    f"{data_root!r} has {classes[label]!r} there (other or shifted classes): "
                                    f"{other_data}")
            raise ResumeRefused(f"{name} was trained on {len(old)} classes ({_names(old)}) and data root "
                                f"{data_root!r} has {len(classes)} ({_names(classes)}): {other_data}")
    elif isinstance(record.classes, int) and record.classes != len(classes):  # records before names
        raise ResumeRefused(f"{name} was trained on {record.classes} classes and data root {data_root!r} has "
                            f"{len(classes)}: {other_data}")
    for data_dir, count in sorted(facts["train_images"].items()):
        old = _mapping(recorded.get("train_images")).get(data_dir)
        if old is not None and old != count:
            raise ResumeRefused(f"{name} was trained on {old} training images in data dir {data_dir!r} and data "
                                f"root {data_root!r} has {count} there (the plan's steps per epoch depend on "
                                f"them): {other_data}")
    for data_dir, identity in sorted(facts["train_data"].items()):
        old = _mapping(recorded.get("train_data")).get(data_dir)
        if old is not None and old != identity:
            raise ResumeRefused(f"{name} was trained on other packed images in data dir {data_dir!r} (identity "
                                f"{old}, data root {data_root!r} now has {identity}: packed again from other "
                                f"images?): {other_data}")
    if record.recorded("world_size") and record.world_size != world_size:
        raise ResumeRefused(f"{name} was trained on {record.world_size} workers and this run has {world_size}: "
                            f"the plan's steps depend on it; resume with -np {record.world_size}")
    if record.recorded("model") and record.model != model:
        raise ResumeRefused(f"{name} holds a {record.model} network, not {model}: pass --model {record.model}")
    if record.recorded("amp") and record.amp != amp_dtype:
        old = record.amp
        fix = f"pass --amp on a device that runs {old}" if old else "pass --no-amp"
        raise ResumeRefused(f"{name} was trained with AMP {old or 'off'} and this run has AMP {amp_dtype or 'off'} "
                            f"(the optimizer state and loss scaler differ): {fix}")
    _check_recipe(ckpt, plan, recorded, run_record)


def _trained_recipe(record, run_record: RunRecord):
    """The recipe the checkpoint was trained with, when known: its own record's, else run.json's when that one
    has the checkpoint's digest (records written before recipes were recorded in them)."""
    raw = record.recipe
    if not isinstance(raw, dict) and run_record.recipe_digest == record.recipe_digest:
        raw = run_record.recipe
    if not isinstance(raw, dict):
        return None
    try:
        return recipe_from_dict(raw, source="the checkpoint's recipe")
    except RecipeError:
        return None


def _check_recipe(ckpt, plan, recorded: dict, run_record: RunRecord) -> None:
    record, name, step, new = ckpt.record, ckpt.name, ckpt.step, plan.recipe
    trained = _trained_recipe(record, run_record)
    if trained is None:
        if (record.recipe_digest if record.recorded("recipe_digest") else new.digest()) != new.digest():
            raise ResumeRefused(f"{name} was trained with another recipe (digest {record.recipe_digest}, "
                                f"this one {new.digest()}): resume with the run's recipe (see run.json)")
        trained = new
    images = next(iter(_mapping(recorded.get("train_images")).values()), None) or run_record.train_images \
        or plan.train_images
    try:
        before = make_plan(trained, images, record.world_size if record.recorded("world_size") else plan.workers)
    except PlanError as e:
        raise ResumeRefused(f"{name}: the plan it was trained on cannot be made again ({e})") from None
    # A phase has started once the checkpoint holds one of its steps: the phase that begins at the checkpoint's
    # step (a phase-boundary checkpoint, where a batch too large for the device's memory first shows) may still
    # change.
    started = sum(1 for p in before.phases if p.first_step < step)
    fix = (f"edit only the phases after phase {started} (not started at step {step}), or resume with the run's "
           "recipe (see run.json)")
    problem = resume_edit_problem(trained, new, started)
    if problem:
        raise ResumeRefused(f"{name} was trained with another recipe: {problem}; {fix}")
    for old, now in zip(before.phases[:started], plan.phases):
        if (old.first_step, old.steps_per_epoch) != (now.first_step, now.steps_per_epoch):
            raise ResumeRefused(
                f"{name}: phase {old.index + 1} has started and would move on the step axis (first step "
                f"{old.first_step}, {old.steps_per_epoch} steps per epoch when trained; {now.first_step} and "
                f"{now.steps_per_epoch} now, {plan.train_images} training images on {plan.workers} workers): resume "
                f"with the data and workers it was trained on")
    if before.warmup_steps != plan.warmup_steps and step < max(before.warmup_steps, plan.warmup_steps):
        raise ResumeRefused(f"{name}: the warm-up ends at step {before.warmup_steps} as trained and at step "
                            f"{plan.warmup_steps} with this recipe (warmup_epochs reaches an edited phase) while "
                            f"step {step} is inside it: {fix}")


def recipe_history(run_record: RunRecord | None, ckpt, plan) -> list[dict]:
    """run.json's "recipes" for a run continuing from `ckpt` (None: from step 0) with `plan`'s recipe: which
    recipe (digest) trained from which step on. Entries from the checkpoint's step on are dropped (those steps are
    trained again); a changed recipe adds an entry from that step."""
    step = ckpt.step if ckpt else 0
    run_record = run_record or RunRecord()
    history = run_record.recipes
    if not isinstance(history, list) or not all(
            isinstance(e, dict) and isinstance(e.get("digest"), str) and isinstance(e.get("from_step"), int)
            for e in history):
        history = []
        if run_record.recipe_digest:
            history = [{"digest": run_record.recipe_digest, "recipe": run_record.recipe, "from_step": 0}]
        elif ckpt is not None and ckpt.record.recipe_digest:
            history = [{"digest": ckpt.record.recipe_digest, "recipe": ckpt.record.recipe, "from_step": 0}]
    kept = [e for e in history if step and e["from_step"] < step]
    digest = plan.recipe.digest()
    if not kept or kept[-1]["digest"] != digest:
        kept.append({"digest": digest, "recipe": plan.recipe.to_dict(), "from_step": step})
    return kept
