"""Recipe loading: every validation error names the problem, before any work starts."""
import copy
import os
import subprocess
import sys

import pytest
import yaml

from gluon_imagenet.recipe import RecipeError, load_recipe, recipe_from_dict

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
    for d in dirs:
        os.makedirs(tmp_path / d, exist_ok=True)
        for split in splits:
            for ext in ("rec", "idx"):
                (tmp_path / d / f"{split}.{ext}").write_bytes(b"")
    return str(tmp_path)


def test_data_root_is_checked(tmp_path):
    root = make_root(tmp_path, ["160", "320"])
    assert load_recipe(SEED, data_root=root).phases
    os.remove(tmp_path / "320" / "train.idx")
    with pytest.raises(RecipeError, match=r"phase 3 .*'data_dir': '320' has no train.idx"):
        load_recipe(SEED, data_root=root)


def test_missing_data_dir_is_named(tmp_path):
    root = make_root(tmp_path, ["160"])
    with pytest.raises(RecipeError, match=r"phase 3 .*'data_dir': '320' has no train.rec"):
        load_recipe(SEED, data_root=root)
    with pytest.raises(RecipeError, match="data root .* does not exist"):
        load_recipe(SEED, data_root=str(tmp_path / "nowhere"))


def test_size_from_pack_metadata(tmp_path):
    root = make_root(tmp_path, ["small"])
    (tmp_path / "small" / "pack.json").write_text('{"short_side": 40}')
    raw = {"phases": [{"epochs": [0, 1], "lr": [0.1, 0.1], "lr_method": "linear", "batch_size": 4,
                       "image_size": 48, "data_dir": "small"}]}
    recipe_from_dict(copy.deepcopy(raw))  # without a data root the folder name tells nothing: accepted
    with pytest.raises(RecipeError, match="48 px is larger than the 40 px short side of data dir 'small'"):
        recipe_from_dict(raw, data_root=root)


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
