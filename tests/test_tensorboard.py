"""TensorBoard event files of the trainer and the sweep (gluon_imagenet.tensorboard), read back from disk."""
import glob
import json
import os
import shutil

import pytest

from conftest import TWO_PHASES, metrics, run_tool, train_cmd, write_recipe
from gluon_imagenet.recipe import load_recipe
from gluon_imagenet.schedule import make_plan
from gluon_imagenet.tensorboard import TrainingBoard, read_events, read_scalars
from gluon_imagenet.train.progress import StepRecord


def test_training_curves_match_the_log(single_run):
    """Every step's loss and lr, and every logged img/s, at step = steps done; phase, image size, batch size."""
    _, run_dir, stdout = single_run
    board = os.path.join(run_dir, "tensorboard")
    assert f"TensorBoard event files in {board}" in stdout
    scalars = read_scalars(os.path.join(board, "train"))
    logged = metrics(run_dir)
    steps = [m["step"] + 1 for m in logged]
    assert steps == list(range(1, len(logged) + 1))
    assert [s for s, _ in scalars["train/loss"]] == steps
    # Event values are float32.
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([m["lr"] for m in logged], rel=1e-6)
    rated = [(m["step"] + 1, m["img_per_s"]) for m in logged if "img_per_s" in m]
    assert len(rated) > 10
    assert [s for s, _ in scalars["train/img_per_s"]] == [s for s, _ in rated]
    # metrics.jsonl rounds img/s to 0.01
    assert [v for _, v in scalars["train/img_per_s"]] == pytest.approx([v for _, v in rated], abs=0.0051)
    with open(os.path.join(run_dir, "run.json")) as f:
        phases = json.load(f)["phases"]
    for (step, phase), (_, size), (_, batch) in zip(scalars["train/phase"], scalars["train/image_size"],
                                                      scalars["train/batch_size"]):
        index = int(phase) - 1
        assert phases[index]["first_step"] < step <= phases[index]["end_step"]
        assert size == phases[index]["image_size"] and batch == TWO_PHASES["phases"][index]["batch_size"]
    assert {int(v) for _, v in scalars["train/phase"]} == {1, 2}


def test_resumed_run_continues_the_curves_without_repeated_steps(single_run, packed_root, tmp_path):
    """A run resumed from an older checkpoint (the newer ones lost) draws the steps trained again once: the new
    event file starts with the purge marker at the first step trained again."""
    recipe, src, _ = single_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(src, run_dir)
    records = sorted(glob.glob(os.path.join(run_dir, "ckpt-*.json")))
    resume_at = int(os.path.basename(records[-2])[5:13])
    for ext in (".json", ".params", ".states"):
        os.remove(records[-1][: -len(".json")] + ext)
    before = glob.glob(os.path.join(run_dir, "tensorboard", "train", "events.*"))
    proc = run_tool(train_cmd(recipe, packed_root, run_dir, "--resume"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = glob.glob(os.path.join(run_dir, "tensorboard", "train", "events.*"))
    new = [f for f in files if f not in before]
    assert len(new) == 1
    marker = [e for e in read_events(new[0]) if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in marker] == [(resume_at + 1, marker[0].session_log.START)]
    scalars = read_scalars(os.path.join(run_dir, "tensorboard", "train"))
    logged = metrics(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [m["step"] + 1 for m in logged] == list(range(1, len(logged) + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in logged], rel=1e-6)


def test_a_run_without_tensorboardx_trains_and_says_how_to_get_it(packed_root, tmp_path):
    """tensorboardX hidden (a package on PYTHONPATH whose import fails, as a missing one does)."""
    hidden = tmp_path / "hidden" / "tensorboardX"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboardX'\")\n")
    one_epoch = dict(TWO_PHASES["phases"][0], epochs=[0, 1])
    recipe = write_recipe(str(tmp_path), dict(TWO_PHASES, eval_image_size=32, phases=[one_epoch]))
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "hidden"))
    proc = run_tool(train_cmd(recipe, packed_root, run_dir), env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "warning: tensorboardX is not installed" in proc.stderr
    assert "pip install -c requirements/constraints.txt tensorboardX==" in proc.stderr
    assert not os.path.exists(os.path.join(run_dir, "tensorboard"))
    assert len(metrics(run_dir)) == 15 and glob.glob(os.path.join(run_dir, "ckpt-*.params"))


def test_a_restart_from_step_0_replaces_the_points_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    """No checkpoint to resume from: the new attempt starts at step 0 and its points replace the dead one's."""
    recipe = load_recipe(write_recipe(str(tmp_path)))
    plan = make_plan(recipe, 240, 1)
    for attempt, steps in ((1.0, 5), (2.0, 3)):
        board = TrainingBoard(str(tmp_path / "tb"), 0, plan, 1)
        for step in range(steps):
            board.add(StepRecord(step, 0, 0, 0.1, attempt + step, float(step)), None, 1e9 + step)
        board.flush()
    loss = read_scalars(str(tmp_path / "tb" / "train"))["train/loss"]
    assert loss == [(1, 2.0), (2, 3.0), (3, 4.0)]


def test_each_evaluation_setting_is_its_own_tensorboard_run():
    from gluon_imagenet.tensorboard import row_setting

    base = "sweep-phase-crop0.875"
    assert row_setting(base, {"eval_scale": 1.0, "flip": False, "weights": "raw"}) == base
    assert row_setting(base, {}) == base  # results stored before the settings existed
    assert row_setting(base, {"eval_scale": 1.15, "flip": True, "weights": "ema"}) == \
        "sweep-phase-x1.15-flip-ema-crop0.875"
    assert row_setting("sweep-fixed-224px-crop0.9", {"eval_scale": 1.3, "flip": False, "weights": "raw"}) == \
        "sweep-fixed-224px-x1.3-crop0.9"
