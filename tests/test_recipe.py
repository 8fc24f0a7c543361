"""Recipe loading: every validation error names the problem, before any work starts."""
import copy
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from gluon_imagenet.data.packed import check_for
from gluon_imagenet.data.recordio import IndexedRecordWriter, image_record
from gluon_imagenet.recipe import EmaSettings, Recipe, load_recipe, recipe_from_dict
from gluon_imagenet.recipe_fields import RecipeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "recipes", "imagenet104.yaml")


def seed_dict():
    with open(SEED) as f:
        return yaml.safe_load(f)


def test_seed_recipe_is_the_published_strategy():
    r = load_recipe(SEED)
    assert [(p.epochs, p.lr, p.lr_method, p.batch_size, p.image_size, p.data_dir) for p in r.phases] == [
        ((0, 6), (1.0, 2.0), "linear", 740, 128, "160"),
        ((6, 21), (2.0, 0.45), "linear", 740, 128, "160"),
        ((21, 32), (0.45, 0.02), "exp", 256, 224, "320"),
        ((32, 36), (0.02, 0.004), "exp", 196, 224, "320"),
        ((36, 40), (0.004, 0.002), "exp", 128, 288, "320"),
    ]
    assert (r.weight_decay, r.momentum, r.reference_workers) == (2e-4, 0.9, 8)
    assert (r.resolved_eval_image_size, r.resolved_eval_data_dir) == (288, "320")


@pytest.mark.parametrize("recipe_file", sorted(f for f in os.listdir(os.path.join(ROOT, "recipes"))
                                               if f.endswith(".yaml")))
def test_every_shipped_recipe_loads(recipe_file):
    assert load_recipe(os.path.join(ROOT, "recipes", recipe_file)).phases


def edit(change):
    raw = seed_dict()
    change(raw)
    return raw


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(bn_wd=0), ["unknown field", "'bn_wd'"]),
    (lambda r: r["phases"][2].update(lr_shape="exp"), ["phase 3", "unknown field", "'lr_shape'"]),
    (lambda r: r["phases"][2].update(epochs=[22, 32]), ["phase 3", "'epochs'", "gap", "start at epoch 21, not 22"]),
    (lambda r: r["phases"][2].update(epochs=[20, 32]), ["phase 3", "'epochs'", "overlap", "not 20"]),
    (lambda r: r["phases"][0].update(epochs=[1, 6]), ["phase 1", "'epochs'", "start at epoch 0, not 1"]),
    (lambda r: r["phases"][1].update(epochs=[6, 6]), ["phase 2", "'epochs'", "[6, 6]"]),
    (lambda r: r["phases"][3].update(lr=[0.02, 0.0]), ["phase 4", "'lr'", "[0.02, 0.0]", "> 0", "'exp'"]),
    (lambda r: r["phases"][3].update(lr=[-0.02, 0.004]), ["phase 4", "'lr'", "-0.02"]),
    (lambda r: r["phases"][1].update(lr=[2.0, -0.1]), ["phase 2", "'lr'", "negative"]),
    (lambda r: r["phases"][4].update(lr_method="step"), ["phase 5", "'lr_method'", "'step'", "linear, exp, cosine"]),
    (lambda r: r["phases"][4].update(image_size=352), ["phase 5", "'image_size'", "352", "320"]),
    (lambda r: r["phases"][0].update(image_size=176), ["phase 1", "'image_size'", "176 px", "'160'"]),
    (lambda r: r["phases"][1].update(batch_size=0), ["phase 2", "'batch_size'", "0", ">= 1"]),
    (lambda r: r["phases"][1].update(batch_size="many"), ["phase 2", "'batch_size'", "'many'", "whole number"]),
    (lambda r: r["phases"][1].pop("data_dir"), ["phase 2", "missing", "'data_dir'"]),
    (lambda r: r["phases"][1].update(lr=[2.0]), ["phase 2", "'lr'", "pair"]),
    (lambda r: r.update(eval_image_size=336), ["'eval_image_size'", "336", "320"]),
    (lambda r: r.update(momentum=1.2), ["'momentum'", "1.2", "< 1.0"]),
    (lambda r: r.update(reference_workers=0), ["'reference_workers'", ">= 1"]),
    (lambda r: r.update(lr_scaling="sqrt"), ["'lr_scaling'", "'sqrt'", "linear, none"]),
    (lambda r: r.update(phases=[]), ["'phases'", "non-empty"]),
    (lambda r: r.update(warmup_epochs=41), ["'warmup_epochs'", "41"]),
])
def test_validation_errors_name_the_problem(change, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(edit(change), source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: ")
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_yaml_number_without_dot_is_read_as_a_number():
    # PyYAML reads 2e-4 as the string '2e-4'.
    raw = edit(lambda r: r.update(weight_decay="2e-4"))
    assert recipe_from_dict(raw).weight_decay == 2e-4


def make_root(tmp_path, dirs, splits=("train", "val")):
    """Each split one well-formed record (packed by other tools: no pack.json), so only what is missing fails."""
    for d in dirs:
        os.makedirs(tmp_path / d, exist_ok=True)
        for split in splits:
            writer = IndexedRecordWriter(str(tmp_path / d / f"{split}.idx"), str(tmp_path / d / f"{split}.rec"))
            writer.write_idx(0, image_record(0, 0, b"not an image: the check reads no pixels"))
            writer.close()
    return str(tmp_path)


def refusal(recipe, data_root):
    """The one problem packed.check_for finds, with the val split as `recipe show --data-root` and the doctor
    check it."""
    problems = check_for(recipe, data_root, eval_split=True)
    assert len(problems) == 1, problems
    return str(problems[0])


def test_data_root_is_checked(tmp_path):
    root = make_root(tmp_path, ["160", "320"])
    assert check_for(load_recipe(SEED), root, eval_split=True) == []
    os.remove(tmp_path / "320" / "train.idx")
    assert re.search(r"phase 3 .*'data_dir': '320' has no train.idx", refusal(load_recipe(SEED), root))


def test_missing_data_dir_is_named(tmp_path):
    root = make_root(tmp_path, ["160"])
    assert re.search(r"phase 3 .*'data_dir': '320' has no train.rec", refusal(load_recipe(SEED), root))
    assert re.search("data root .* does not exist", refusal(load_recipe(SEED), str(tmp_path / "nowhere")))


def test_size_from_pack_metadata(tmp_path):
    root = make_root(tmp_path, ["small"])
    (tmp_path / "small" / "pack.json").write_text('{"short_side": 40}')
    raw = {"phases": [{"epochs": [0, 1], "lr": [0.1, 0.1], "lr_method": "linear", "batch_size": 4,
                       "image_size": 48, "data_dir": "small"}]}
    recipe = recipe_from_dict(copy.deepcopy(raw))  # without a data root the folder name tells nothing: accepted
    assert re.search("48 px is larger than the 40 px short side of data dir 'small'", refusal(recipe, root))


def test_a_field_left_out_takes_its_dataclass_default():
    """Recipe's and EmaSettings' field defaults are the only ones: recipe_from_dict and data.Augmentation read
    them."""
    phases = [{"epochs": [0, 1], "lr": [0.1, 0.1], "lr_method": "linear", "batch_size": 4, "image_size": 32,
               "data_dir": "x"}]
    recipe = recipe_from_dict({"phases": phases})
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.name != "phases"}
    assert {name: getattr(recipe, name) for name in defaults} == dict(defaults, source="<recipe>")
    ema = recipe_from_dict({"phases": phases, "ema": {"half_life_epochs": 1}}).ema
    assert ema == EmaSettings(1.0, {f.name: f.default for f in dataclasses.fields(EmaSettings)}["every_steps"])


def test_bad_recipe_on_the_command_line_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edit(lambda r: r["phases"][0].update(lr_method="cos"))))
    proc = subprocess.run([sys.executable, "-m", "gluon_imagenet.recipe", "show", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "phase 1" in proc.stderr and "'cos'" in proc.stderr
    assert proc.stdout == ""


def test_unreadable_or_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(str(tmp_path / "none.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("phases: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(broken))


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    # PyYAML keeps the last value silently: this recipe would have trained with lr x 0.25.
    with open(SEED) as f:
        text = f.read()
    path = tmp_path / "twice.yaml"
    path.write_text(text.replace("reference_workers: 8", "reference_workers: 1\nreference_workers: 4", 1))
    line = text[: text.index("reference_workers: 8")].count("\n") + 1
    with pytest.raises(RecipeError, match=rf"'reference_workers' is given twice \(lines {line} and {line + 1}\)"):
        load_recipe(str(path))
    path.write_text(text.replace("lr_method: linear,", "lr_method: linear, lr_method: exp,", 1))
    with pytest.raises(RecipeError, match="'lr_method' is given twice"):
        load_recipe(str(path))


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(mirror="no"), ["'mirror'", "'no'", "true or false"]),
    (lambda r: r.update(aspect_ratio=[1.5, 0.5]), ["'aspect_ratio'", "0 < min <= max"]),
    (lambda r: r.update(aspect_ratio=[0, 1]), ["'aspect_ratio'", "0 < min <= max"]),
    (lambda r: r.update(aspect_ratio=1.0), ["'aspect_ratio'", "pair"]),
])
def test_augmentation_fields_are_validated(change, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(edit(change), source="my.yaml")
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_augmentation_defaults_and_values():
    assert (load_recipe(SEED).mirror, load_recipe(SEED).aspect_ratio) == (True, (0.75, 4 / 3))
    recipe = recipe_from_dict(edit(lambda r: r.update(mirror=False, aspect_ratio=[1, 1])))
    assert (recipe.mirror, recipe.aspect_ratio) == (False, (1.0, 1.0))


# --- resume across an edited recipe: the table of accepted and refused edits (resume.check, no training) ---

def three_phases():
    from conftest import TWO_PHASES

    recipe = copy.deepcopy(TWO_PHASES)
    recipe["phases"].append({"epochs": [5, 6], "lr": [0.01, 0.001], "lr_method": "linear", "batch_size": 8,
                             "image_size": 64, "data_dir": "72"})
    return recipe  # 240 images, 1 worker: steps 0-44 (15 per epoch), 45-104 (30 per epoch), 105-134


def facts(classes=10, images=240, identity="pack:a"):
    return {"classes": [f"c{i}" for i in range(classes)], "train_images": {"40": images, "72": images},
            "train_data": {"40": identity, "72": identity + "2"}}


def trained_checkpoint(step, trained, **record):
    from gluon_imagenet.checkpoint import Checkpoint, Record
    from gluon_imagenet.schedule import make_plan

    recipe = make_plan(recipe_from_dict(trained), 240, 1).recipe
    base = {"recipe": recipe.to_dict(), "recipe_digest": recipe.digest(), "world_size": 1, "model": "resnet18_v1b",
            "classes": 10, "amp": None, "trained_on": facts()}
    return Checkpoint(step, f"/runs/r/ckpt-{step:08d}.json", Record.from_dict(dict(base, **record)))


def resume_problem(ckpt, edited, run_facts=None, workers=1, model="resnet18_v1b", amp=None, run_record=None):
    from gluon_imagenet.rundir import RunRecord
    from gluon_imagenet.schedule import make_plan
    from gluon_imagenet.train.resume import ResumeRefused, check

    run_facts = run_facts or facts()
    plan = make_plan(recipe_from_dict(edited), run_facts["train_images"]["40"], workers)
    try:
        check(ckpt, plan, run_facts, workers, model, amp, "/data", RunRecord.from_dict(run_record or {}))
    except ResumeRefused as e:
        return str(e)
    return ""


def edited(change):
    recipe = three_phases()
    change(recipe)
    return recipe


EDITS = [  # (checkpoint step, edit, "" if accepted else part of the refusal)
    (30, lambda r: None, ""),
    (30, lambda r: r["phases"][1].update(batch_size=4), ""),
    (30, lambda r: r["phases"][1].update(lr=[0.1, 0.001], lr_method="linear"), ""),
    (30, lambda r: (r["phases"][1].update(epochs=[3, 7]), r["phases"][2].update(epochs=[7, 8])), ""),
    (30, lambda r: r["phases"][1].update(image_size=32, data_dir="40"), ""),
    (30, lambda r: r["phases"].pop(), ""),  # removing a later phase
    (30, lambda r: r["phases"].append(dict(r["phases"][2], epochs=[6, 9])), ""),  # adding one
    (60, lambda r: r["phases"][2].update(batch_size=2), ""),  # phase 2 in progress, phase 3 not started
    (134, lambda r: r["phases"].append(dict(r["phases"][2], epochs=[6, 7])), ""),  # a finished run extended
    (30, lambda r: r["phases"][0].update(batch_size=12),
     "phase 1 (epochs [0, 3)) has started and its field 'batch_size' is 16 there and 12 here"),
    (30, lambda r: r["phases"][0].update(lr=[0.05, 0.3]), "its field 'lr' is [0.05, 0.2] there and [0.05, 0.3] here"),
    (30, lambda r: (r["phases"][0].update(epochs=[0, 4]), r["phases"][1].update(epochs=[4, 5])),
     "phase 1 (epochs [0, 3)) has started and its field 'epochs' is [0, 3] there and [0, 4] here"),
    (30, lambda r: r.update(momentum=0.8), "run-wide field 'momentum' is 0.9 there and 0.8 here"),
    (30, lambda r: r.update(lr_scaling="none"), "run-wide field 'lr_scaling' is 'linear' there and 'none' here"),
    (30, lambda r: r.update(mirror=False), "run-wide field 'mirror'"),
    # A phase has started once the checkpoint holds one of its steps: at the phase boundary (step 45) it has not.
    (45, lambda r: r["phases"][1].update(batch_size=4), ""),
    (45, lambda r: r["phases"].pop(1) and r["phases"][1].update(epochs=[3, 4]), ""),
    (46, lambda r: r["phases"][1].update(batch_size=4), "phase 2 (epochs [3, 5)) has started and its field "
                                                        "'batch_size' is 8 there and 4 here"),
    (60, lambda r: r["phases"][1].update(image_size=48), "field 'image_size' is 64 there and 48 here"),
    (120, lambda r: r["phases"].pop(), "phase 3 has started, and this recipe has 2 phase(s)"),
]


@pytest.mark.parametrize("step, change, refusal", EDITS)
def test_resume_accepts_edits_of_phases_not_started_and_refuses_the_rest(step, change, refusal):
    problem = resume_problem(trained_checkpoint(step, three_phases()), edited(change))
    if refusal:
        assert refusal in problem and "was trained with another recipe" in problem
        assert "edit only the phases after phase" in problem
    else:
        assert problem == ""


def test_a_warm_up_reaching_an_edited_phase_is_refused():
    trained = dict(three_phases(), warmup_epochs=4)  # the warm-up ends inside phase 2
    changed = dict(edited(lambda r: r["phases"][1].update(batch_size=4)), warmup_epochs=4)
    problem = resume_problem(trained_checkpoint(30, trained), changed)
    assert "the warm-up ends at step 75 as trained and at step 105 with this recipe" in problem


@pytest.mark.parametrize("kwargs, refusal", [
    (dict(run_facts=facts(classes=5)), "ckpt-00000030 was trained on 10 classes (c0, c1, c2, c3, ...) and data root "
                                       "'/data' has 5 (c0, c1, c2, c3, ...): resume with the data root it was trained "
                                       "on, or train this data in a new --run-dir"),
    (dict(run_facts=dict(facts(), classes=["c0", "c1", "c2", "c3", "c4", "cX", "c6", "c7", "c8", "c9"])),
     "trained with class 5 = 'c5' and data root '/data' has 'cX' there (other or shifted classes)"),
    (dict(run_facts=facts(images=250)), "trained on 240 training images in data dir '40' and data root '/data' has "
                                        "250 there"),
    (dict(run_facts=facts(identity="sha256:b")), "trained on other packed images in data dir '40' (identity pack:a, "
                                                 "data root '/data' now has sha256:b"),
    (dict(workers=2), "trained on 1 workers and this run has 2: the plan's steps depend on it; resume with -np 1"),
    (dict(model="resnet50_v1b"), "holds a resnet18_v1b network, not resnet50_v1b: pass --model resnet18_v1b"),
    (dict(amp="bfloat16"), "was trained with AMP off and this run has AMP bfloat16 (the optimizer state and loss "
                           "scaler differ): pass --no-amp"),
    (dict(run_record={"data_root": "/old/rec"}, run_facts=facts(classes=4)),
     "resume with the data root it was trained on (/old/rec)"),
])
def test_resume_refuses_other_facts_naming_them(kwargs, refusal):
    assert refusal in resume_problem(trained_checkpoint(30, three_phases()), three_phases(), **kwargs)


def test_records_written_before_the_facts_were_recorded_compare_what_they_hold():
    from gluon_imagenet.schedule import make_plan

    digest = make_plan(recipe_from_dict(three_phases()), 240, 1).recipe.digest()
    old = trained_checkpoint(30, three_phases())
    legacy = type(old)(30, old.json_path, type(old.record).from_dict({
        "recipe_digest": digest, "world_size": 1, "model": "resnet18_v1b", "classes": 10, "amp": None}))
    assert resume_problem(legacy, three_phases(), run_facts=facts(images=250, identity="x")) == ""
    assert "trained on 10 classes and data root '/data' has 5" in resume_problem(legacy, three_phases(),
                                                                                 run_facts=facts(classes=5))
    # The recipe from run.json when it has the checkpoint's digest: an edit of a later phase is accepted ...
    run_record = {"recipe_digest": digest, "recipe": old.record.recipe, "train_images": 240}
    assert resume_problem(legacy, edited(lambda r: r["phases"][2].update(batch_size=4)), run_record=run_record) == ""
    # ... and without a recipe to compare with, only the same recipe resumes.
    assert "trained with another recipe (digest" in resume_problem(
        legacy, edited(lambda r: r["phases"][2].update(batch_size=4)))
    # run.json's training images (240) put phase 1 on the step axis; 250 images now would move it.
    assert "phase 1 has started and would move on the step axis" in resume_problem(
        legacy, three_phases(), run_record=run_record, run_facts=facts(images=250))


def test_run_json_keeps_which_recipe_trained_which_steps():
    from gluon_imagenet.rundir import RunRecord
    from gluon_imagenet.schedule import make_plan
    from gluon_imagenet.train.resume import recipe_history as history_of

    def recipe_history(run_json: dict, ckpt, plan):  # run.json's content as RunRecord reads it
        return history_of(RunRecord.from_dict(run_json), ckpt, plan)

    first, second = (make_plan(recipe_from_dict(r), 240, 1) for r in
                     (three_phases(), edited(lambda r: r["phases"][2].update(batch_size=4))))
    fresh = recipe_history({}, None, first)
    assert [(e["digest"], e["from_step"]) for e in fresh] == [(first.recipe.digest(), 0)]
    run = {"recipe_digest": first.recipe.digest(), "recipe": first.recipe.to_dict(), "recipes": fresh}
    history = recipe_history(run, trained_checkpoint(60, three_phases()), second)
    assert [(e["digest"], e["from_step"]) for e in history] == [(first.recipe.digest(), 0),
                                                                (second.recipe.digest(), 60)]
    assert history[1]["recipe"]["phases"][2]["batch_size"] == 4
    # Resumed again with the same recipe: nothing new; resumed from before the edit: the edit's entry goes.
    assert recipe_history(dict(run, recipes=history), trained_checkpoint(90, three_phases()), second) == history
    assert recipe_history(dict(run, recipes=history), trained_checkpoint(45, three_phases()), first) == fresh
    # run.json from before the history was kept: its recipe trained from step 0.
    assert [e["from_step"] for e in recipe_history(run | {"recipes": None}, trained_checkpoint(60, three_phases()),
                                                   second)] == [0, 60]
