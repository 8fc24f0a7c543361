"""run.json's RunRecord and a checkpoint's Record: their round trips, the records older trainers wrote, and the
one-line errors for a run.json of the wrong shape."""
import json
import os

import pytest

from conftest import TWO_PHASES
from gluon_imagenet import checkpoint
from gluon_imagenet.recipe import recipe_from_dict
from gluon_imagenet.rundir import RUN_JSON, PlannedPhase, RunDirError, RunRecord, read_run

# The keys run.json held before RunRecord, in the order the trainer wrote them: old files must still read.
KEYS_BEFORE_RUNRECORD = ["recipe", "recipe_file", "recipe_digest", "command", "args", "versions", "git_revision",
                         "world_size", "device", "amp", "amp_dtype", "model", "classes", "train_images", "lr_scale",
                         "lr_scaling", "data_root", "environment", "phases", "trained_on", "recipes"]


def old_style_run_json() -> dict:
    """run.json as the trainer wrote it before the evaluation setting was recorded in it."""
    recipe = recipe_from_dict(TWO_PHASES)
    return json.loads(json.dumps({  # as JSON holds it (lists, not the recipe's tuples)
        "recipe": recipe.to_dict(), "recipe_file": "recipe.yaml", "recipe_digest": recipe.digest(),
        "command": ["-m", "gluon_imagenet.train"], "args": {"tensorboard": None, "no_tensorboard": False},
        "versions": {"python": "3.11.7", "mxnet": "1.9.1", "horovod": None}, "git_revision": "unknown",
        "world_size": 1, "device": "cpu", "amp": False, "amp_dtype": None, "model": "resnet18_v1b",
        "classes": [f"c{i}" for i in range(10)], "train_images": 240, "lr_scale": 1.0, "lr_scaling": "linear",
        "data_root": "/data/recordio", "environment": {},
        "phases": [{"first_step": 0, "end_step": 45, "steps_per_epoch": 15, "image_size": 32, "data_dir": "40"},
                   {"first_step": 45, "end_step": 105, "steps_per_epoch": 30, "image_size": 64, "data_dir": "72"}],
        "trained_on": {"classes": [f"c{i}" for i in range(10)], "train_images": {"40": 240, "72": 240},
                       "train_data": {"40": "pack:a", "72": "pack:b"}},
        "recipes": [{"digest": recipe.digest(), "recipe": recipe.to_dict(), "from_step": 0}]}))


def write_run_json(folder, content) -> str:
    path = os.path.join(folder, RUN_JSON)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


def test_run_record_round_trip(tmp_path):
    run = RunRecord.from_dict(dict(old_style_run_json(), eval_image_size=64, eval_data_dir="72"))
    run.write(str(tmp_path))
    assert not os.path.exists(tmp_path / (RUN_JSON + ".partial"))  # written atomically, the temporary renamed
    with open(tmp_path / RUN_JSON) as f:
        on_disk = json.load(f)
    # The same keys as before, in the same order, and the evaluation setting after them.
    assert list(on_disk) == KEYS_BEFORE_RUNRECORD + ["eval_image_size", "eval_data_dir"]
    assert on_disk["phases"][1] == {"first_step": 45, "end_step": 105, "steps_per_epoch": 30, "image_size": 64,
                                    "data_dir": "72"}
    again = read_run(str(tmp_path))
    assert again == run and again.to_dict() == on_disk
    assert again.phases[1] == PlannedPhase(45, 105, 30, 64, "72")
    assert (again.final_step, again.last_epoch) == (105, 5.0)
    assert again.evaluation_defaults() == (64, "72")


def test_the_stored_evaluation_setting_is_read_without_the_recipe():
    # Resolved when run.json was written: the recipe is not parsed again (here it could not be).
    run = RunRecord(recipe={"not": "a recipe"}, eval_image_size=96, eval_data_dir="128")
    assert run.evaluation_defaults() == (96, "128")


def test_an_old_style_run_json_still_reads(tmp_path):
    old = old_style_run_json()
    write_run_json(tmp_path, old)
    run = RunRecord.read(str(tmp_path))
    assert run.to_dict() == dict(old, eval_image_size=None, eval_data_dir=None)
    assert run.classes == old["classes"] and run.phases[0].data_dir == "40" and run.data_root == "/data/recordio"
    # The recipe's own rule, applied to its recipe: eval_image_size 64, the last phase's data dir.
    assert run.evaluation_defaults() == (64, "72")
    assert run.tensorboard_dir("/runs/r") == os.path.join("/runs/r", "tensorboard")
    # Unknown keys (a newer trainer's) are ignored; a partial record reads with the rest None.
    assert RunRecord.from_dict({"phases": [{"first_step": 0}], "future": 1}) == RunRecord(
        phases=[PlannedPhase(first_step=0)])


def test_an_old_recipe_that_no_longer_parses_is_one_line():
    run = RunRecord.from_dict(dict(old_style_run_json(), recipe={"phases": [{"epochs": [0, 1]}]}))
    with pytest.raises(RunDirError) as e:
        run.evaluation_defaults()
    assert "\n" not in str(e.value) and "run.json's recipe" in str(e.value)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist: not a run folder written by gluon_imagenet.train"),
    ("{not json", "is damaged (not JSON"),
    ("[1, 2]", "holds a list, not an object"),
    ({"phases": []}, "has no recipe with phases"),
    (dict(old_style_run_json(), phases=[{"first_step": 0}]), "has no plan (phases with first_step, end_step"),
    (dict(old_style_run_json(), recipe={"phases": [{"lr": 1}]}), "has a recipe phase without epochs"),
])
def test_a_run_json_of_the_wrong_shape_is_one_line(tmp_path, content, message):
    path = os.path.join(tmp_path, RUN_JSON) if content is None else write_run_json(tmp_path, content)
    with pytest.raises(RunDirError) as e:
        read_run(str(tmp_path))
    assert "\n" not in str(e.value) and path in str(e.value) and message in str(e.value), str(e.value)


def test_a_missing_run_dir_names_it(tmp_path):
    with pytest.raises(RunDirError, match="--run-dir .*nowhere.* does not exist"):
        read_run(str(tmp_path / "nowhere"))


def test_resume_reads_what_it_can(tmp_path):
    assert RunRecord.read_if_any(str(tmp_path)) is None  # no run.json: the checkpoint records hold the facts
    write_run_json(tmp_path, "[]")
    assert RunRecord.read_if_any(str(tmp_path)) is None
    write_run_json(tmp_path, {"data_root": "/old/rec"})  # a shape the sweep refuses: resume still reads it
    assert RunRecord.read_if_any(str(tmp_path)).data_root == "/old/rec"


# ------------------------------------------------------------------------------------------------ checkpoints
def full_record() -> checkpoint.Record:
    recipe = recipe_from_dict(TWO_PHASES)
    return checkpoint.Record(
        step=52, files={".params": {"bytes": 10, "sha256": "a" * 64}, ".states": {"bytes": 5, "sha256": "b" * 64}},
        epoch=2.4667, epoch_index=3, phase=1, image_size=64, data_dir="72", images_seen=720, wall_seconds=12.5,
        train_seconds=10.0, recipe_digest=recipe.digest(), world_size=1, model="resnet18_v1b", classes=10, lr=0.1,
        loss=1.25, final=False, amp="bfloat16", recipe=recipe.to_dict(), trained_on={"classes": ["a"]},
        ema={"half_life_epochs": 0.5, "every_steps": 2},
        loss_scaler={"loss_scale": 256.0, "next_loss_scale": 256.0, "unskipped": 0}, loss_scale=256.0)


def test_checkpoint_record_round_trip(tmp_path):
    record = checkpoint.Record.from_dict(json.loads(json.dumps(full_record().to_dict())))  # lists, not tuples
    assert record.missing == frozenset()
    path = str(tmp_path / "ckpt-00000052.json")
    with open(path, "w") as f:
        json.dump(record.to_dict(), f, indent=1, sort_keys=True)
    again = checkpoint.read_record(path)
    assert again == record and again.to_dict() == record.to_dict()
    assert again.missing == frozenset() and again.recorded("world_size")
    assert again.is_mid_epoch and again.params_sha256 == "a" * 64


def test_a_checkpoint_record_written_by_checkpoint_save_reads_back(tmp_path):
    import mxnet as mx

    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=None)
    record = checkpoint.Record(epoch=1.0, world_size=2, model="resnet18_v1b", amp=None)
    saved = checkpoint.save(str(tmp_path), 15, net, trainer, record)
    ckpt, problem = checkpoint.problem(saved.json_path)
    assert problem == "" and ckpt.record == saved.record
    assert (ckpt.record.step, ckpt.record.epoch, ckpt.record.world_size) == (15, 1.0, 2)
    assert set(ckpt.record.files) == {".params", ".states"}
    with open(saved.json_path) as f:
        on_disk = json.load(f)
    # None is not written, except AMP's: "amp": null says AMP was off (resume compares it).
    assert on_disk == {"step": 15, "files": on_disk["files"], "epoch": 1.0, "world_size": 2,
                       "model": "resnet18_v1b", "amp": None}


def test_an_old_checkpoint_record_still_loads(tmp_path):
    # A record from before the recipe, the data facts and AMP were recorded: what is missing is not compared.
    path = str(tmp_path / "ckpt-00000030.json")
    with open(path, "w") as f:
        json.dump({"step": 30, "epoch": 2.0, "world_size": 1, "model": "resnet18_v1b", "classes": 10,
                   "files": {".params": {"bytes": 1, "sha256": "c" * 64}}, "unknown_key": 1}, f)
    record = checkpoint.read_record(path)
    assert (record.step, record.classes, record.recipe, record.trained_on) == (30, 10, None, None)
    assert not record.recorded("amp") and not record.recorded("recipe_digest") and record.recorded("model")
    assert not record.is_mid_epoch
    for content in ("[]", "{not json"):
        with open(path, "w") as f:
            f.write(content)
        with pytest.raises(ValueError):
            checkpoint.read_record(path)
    assert checkpoint.problem(path)[1].startswith("unreadable record")
