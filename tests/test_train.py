"""gluon_imagenet.train on the CPU with real MXNet, real ImageRecordIter and real horovodrun."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TWO_PHASES, metrics, run_tool, train_cmd, write_recipe
from gluon_imagenet import checkpoint
from gluon_imagenet.devices import cpu_supports_bfloat16
from gluon_imagenet.recipe import load_recipe
from gluon_imagenet.schedule import lr_at, make_plan


def test_single_process_loss_falls(single_run):
    _, run_dir, _ = single_run
    losses = [m["loss"] for m in metrics(run_dir)]
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:5]) / 5, losses


def test_logged_lr_equals_the_schedule(single_run, packed_root):
    recipe, run_dir, _ = single_run
    plan = make_plan(load_recipe(recipe), train_images=240, workers=1)
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == list(range(plan.total_steps))
    assert [m["lr"] for m in logged] == pytest.approx([lr_at(plan, s) for s in range(plan.total_steps)], rel=1e-12)
    assert [m["phase"] for m in logged] == [0] * plan.phases[0].steps + [1] * plan.phases[1].steps


def test_checkpoints_and_run_record(single_run):
    recipe, run_dir, stdout = single_run
    plan = make_plan(load_recipe(recipe), train_images=240, workers=1)
    good, bad = checkpoint.scan(run_dir)
    assert bad == []
    # one per epoch: 15 steps per epoch at batch 16, 30 at batch 8
    assert [c.step for c in good] == [15, 30, 45, 75, 105] == [plan.phases[0].steps_per_epoch * e for e in (1, 2, 3)] \
        + [45 + 30 * e for e in (1, 2)]
    last = good[-1].record.to_dict()
    assert (last["epoch"], last["images_seen"], last["world_size"], last["final"]) == (5.0, 45 * 16 + 60 * 8, 1, True)
    assert last["image_size"] == 64 and good[0].record.image_size == 32
    assert 0 < last["train_seconds"] <= last["wall_seconds"]
    assert last["recipe_digest"] == load_recipe(recipe).digest()
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    assert run["recipe"]["phases"][1]["lr"] == [0.2, 0.01]
    assert run["versions"]["mxnet"] == "1.9.1" and run["world_size"] == 1 and len(run["classes"]) == 10
    assert (run["eval_image_size"], run["eval_data_dir"]) == (64, "72")  # resolved once, from the recipe
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", run["git_revision"])
    assert re.search(r"^\s+2\s+4\s+105/105\s", stdout, re.M)  # fixed-column progress line


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_run(single_run, packed_root, tmp_path):
    recipe, reference_dir, _ = single_run
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, *train_cmd(recipe, packed_root, run_dir, "--save-every-steps", "4")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill mid-epoch of the second phase, past a mid-epoch checkpoint
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and metrics(run_dir)[-1]["step"] >= 54:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    good, _ = checkpoint.scan(run_dir)
    assert good[-1].step == 52 and not good[-1].record.final  # the newest: mid-epoch, every 4 steps

    resumed = run_tool(train_cmd(recipe, packed_root, run_dir, "--save-every-steps", "4", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from ckpt-00000052: step 52" in resumed.stdout
    again, reference = metrics(run_dir), metrics(reference_dir)
    assert [(m["step"], m["lr"], m["epoch"], m["phase"]) for m in again] == \
        [(m["step"], m["lr"], m["epoch"], m["phase"]) for m in reference]
    good, _ = checkpoint.scan(run_dir)
    assert good[-1].step == 105 and good[-1].record.final
    assert good[-1].record.wall_seconds > good[-2].record.wall_seconds


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back(single_run, packed_root, tmp_path):
    recipe, reference_dir, _ = single_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference_dir, run_dir)
    for name in os.listdir(run_dir):  # keep the run up to epoch 4 (step 75), damage that one
        if name.startswith("ckpt-") and int(name[5:13]) > 75:
            os.remove(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "ckpt-00000075.params"), "r+b") as f:
        f.truncate(1000)
    proc = run_tool(train_cmd(recipe, packed_root, run_dir, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ckpt-00000075 is unusable" in proc.stderr
    assert "resuming from ckpt-00000045: step 45" in proc.stdout
    assert checkpoint.scan(run_dir)[0][-1].step == 105


@pytest.mark.slow
def test_horovod_two_ranks_uneven_data(tmp_path):
    from gluon_imagenet.data.demo import generate

    generate(str(tmp_path / "src"), train_per_class=23, val_per_class=2, seed=8, classes=("disc", "ring", "star"))
    proc = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(tmp_path / "rec"), "--sizes",
                     "40", "72"])
    assert proc.returncode == 0
    recipe = dict(TWO_PHASES, reference_workers=2)
    recipe["phases"] = [dict(p, epochs=e) for p, e in zip(TWO_PHASES["phases"], ([0, 2], [2, 3]))]
    path = write_recipe(str(tmp_path), recipe)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    run_dir = str(tmp_path / "run")
    proc = subprocess.run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
                           *train_cmd(path, str(tmp_path / "rec"), run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 69 images over 2 ranks of 16 (then 8) per step: 3 steps per epoch (then 5), shards of 34/35 wrap around.
    finished = re.findall(r"rank (\d)/2: finished at step (\d+)", proc.stdout)
    digests = re.findall(r"rank \d/2: finished at step 11, parameter digest (\w+)", proc.stdout)
    assert sorted(finished) == [("0", "11"), ("1", "11")] and len(digests) == 2
    assert digests[0] == digests[1], "ranks ended with different parameters"
    plan = make_plan(load_recipe(path), train_images=69, workers=2)
    assert plan.total_steps == 11
    assert [m["step"] for m in metrics(run_dir)] == list(range(11))
    assert [c.step for c in checkpoint.scan(run_dir)[0]] == [3, 6, 11]


@pytest.mark.parametrize("change, extra, message", [
    (lambda r: r["phases"][1].update(data_dir="96"), [], "'96' has no train.rec"),
    (lambda r: r["phases"][1].update(image_size=80), [], "80 px is larger than the 72 px short side"),
    (lambda r: r.update(colour="blue"), [], "unknown field(s) 'colour'"),
    pytest.param(None, ["--amp"], "--amp on a CPU trains in bfloat16, which needs a CPU with AVX-512 bfloat16",
                 marks=pytest.mark.skipif(cpu_supports_bfloat16(), reason="this CPU runs bfloat16 AMP")),
    (None, ["--log-every", "0"], "--log-every 0"),
    (None, ["--save-every-steps", "-3"], "--save-every-steps -3: must be >= 0"),
    (None, ["--threads", "-1"], "--threads -1: must be >= 0"),
    (None, ["--nan-patience", "-1"], "--nan-patience -1: must be >= 0"),
    (None, ["--keep-mid-epoch", "-1"], "--keep-mid-epoch -1: must be >= 0"),
    (lambda r: r["phases"][0].update(batch_size=1000000000), [], "'batch_size': 1000000000 must be <= 16384"),
])
def test_bad_input_exits_2_before_work(packed_root, tmp_path, change, extra, message):
    recipe = json.loads(json.dumps(TWO_PHASES))
    if change:
        change(recipe)
    path = write_recipe(str(tmp_path), recipe)
    proc = run_tool(train_cmd(path, packed_root, str(tmp_path / "run"), *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_existing_run_needs_resume(single_run, packed_root):
    recipe, run_dir, _ = single_run
    proc = run_tool(train_cmd(recipe, packed_root, run_dir))
    assert proc.returncode == 2 and "pass --resume" in proc.stderr


def test_other_recipe_cannot_resume(single_run, packed_root, tmp_path):
    _, run_dir, _ = single_run
    other = json.loads(json.dumps(TWO_PHASES))
    other["momentum"] = 0.8
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    proc = run_tool(train_cmd(write_recipe(str(tmp_path), other), packed_root, copy, "--resume"))
    assert proc.returncode == 2 and "trained with another recipe" in proc.stderr


def test_diverging_loss_stops_with_the_last_good_checkpoint(packed_root, tmp_path):
    recipe = json.loads(json.dumps(TWO_PHASES))
    recipe["phases"][0]["lr"] = [0.05, 0.05]
    recipe["phases"][1]["lr"] = [1.0e6, 1.0e6]
    recipe["phases"][1]["lr_method"] = "linear"
    run_dir = str(tmp_path / "run")
    proc = run_tool(train_cmd(write_recipe(str(tmp_path), recipe), packed_root, run_dir, "--nan-patience", "3"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "not finite for 4 consecutive steps" in proc.stderr and "ckpt-00000045" in proc.stderr
    assert [c.step for c in checkpoint.scan(run_dir)[0]] == [15, 30, 45]


@pytest.mark.parametrize("mode", ["--synthetic", "--io-only"])
def test_measure_modes_print_a_table_per_phase(packed_root, tmp_path, mode):
    path = write_recipe(str(tmp_path))
    proc = run_tool(["-m", "gluon_imagenet.train", "--recipe", path, "--data-root", packed_root, "--model",
                     "resnet18_v1b", mode, "--bench-steps", "3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.M)
    assert [r[:3] for r in rows] == [("1", "32", "16"), ("2", "64", "8")]
    assert all(float(r[3]) > 0 for r in rows)


def copy_run_until(run_dir, step, to):
    """A copy of a run dir as it was at checkpoint `step` (later checkpoints left out)."""
    os.makedirs(to)
    for name in os.listdir(run_dir):
        if name in ("run.json", "metrics.jsonl") or (name.startswith("ckpt-") and int(name[5:13]) <= step):
            shutil.copy(os.path.join(run_dir, name), to)
    return str(to)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """3 classes, 21 training images: other classes than the shapes, and fewer images than a batch of 32."""
    from gluon_imagenet.data.demo import generate

    folder = tmp_path_factory.mktemp("tiny")
    generate(str(folder / "src"), train_per_class=7, val_per_class=1, seed=3, classes=("disc", "ring", "star"))
    proc = run_tool(["tools/im2rec_multi.py", str(folder / "src"), "--root", str(folder / "rec"), "--sizes", "40",
                     "72"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(folder / "rec")


@pytest.fixture(scope="module")
def fewer_images_root(shapes_tree, tmp_path_factory):
    """The shapes' classes with 10 training images fewer (230)."""
    folder = tmp_path_factory.mktemp("fewer")
    shutil.copytree(shapes_tree, folder / "src")
    disc = folder / "src" / "train" / "disc"
    for name in sorted(os.listdir(disc))[:10]:
        os.remove(disc / name)
    proc = run_tool(["tools/im2rec_multi.py", str(folder / "src"), "--root", str(folder / "rec"), "--sizes", "40",
                     "72"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(folder / "rec")


@pytest.mark.parametrize("root, message", [
    ("tiny_root", "ckpt-00000030 was trained on 10 classes (bars, cross, diamond, disc, ...) and data root {root!r} "
                  "has 3 (disc, ring, star): resume with the data root it was trained on ({trained})"),
    ("fewer_images_root", "ckpt-00000030 was trained on 240 training images in data dir '40' and data root {root!r} "
                          "has 230 there"),
])
def test_a_refused_resume_with_other_data_leaves_the_run_as_it_was(single_run, packed_root, tmp_path, request, root,
                                                                   message):
    recipe, run_dir, _ = single_run
    copy = copy_run_until(run_dir, 30, tmp_path / "run")
    before = {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy)}
    other = request.getfixturevalue(root)
    proc = run_tool(train_cmd(recipe, other, copy, "--resume"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(root=other, trained=os.path.abspath(packed_root)) in proc.stderr
    assert "Traceback" not in proc.stderr
    after = {name: open(os.path.join(copy, name), "rb").read() for name in os.listdir(copy) if name != "train.lock"}
    assert after == before  # run.json byte-identical, nothing added


def test_fewer_training_images_than_a_batch_is_refused_before_work(tiny_root, tmp_path):
    recipe = dict(TWO_PHASES, eval_image_size=32, phases=[dict(TWO_PHASES["phases"][0], batch_size=32)])
    run_dir = tmp_path / "run"
    proc = run_tool(train_cmd(write_recipe(str(tmp_path), recipe), tiny_root, str(run_dir)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: phase 1: batch_size 32 is more than the 21 image(s) per rank (21 training image(s)): lower "
        "batch_size to <= 21, or pack more training images")
    assert not [name for name in os.listdir(run_dir) if name != "train.lock"]


def test_a_resume_with_a_smaller_last_phase_batch_trains_the_new_plan(single_run, packed_root, tmp_path):
    """What a run whose last phase does not fit in memory needs: the phase-boundary checkpoint resumed with a
    smaller batch for the phase that has not started."""
    recipe, run_dir, _ = single_run
    copy = copy_run_until(run_dir, 45, tmp_path / "run")
    edited = json.loads(json.dumps(TWO_PHASES))
    edited["phases"][1]["batch_size"] = 6  # phase 2 starts at step 45
    path = write_recipe(str(tmp_path), edited, "smaller.yaml")
    proc = run_tool(train_cmd(path, packed_root, copy, "--resume", "--log-every", "20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from ckpt-00000045: step 45" in proc.stdout
    before, after = make_plan(load_recipe(recipe), 240, 1), make_plan(load_recipe(path), 240, 1)
    assert after.total_steps == 45 + 2 * 40 == 125
    logged = metrics(copy)
    assert [m["step"] for m in logged] == list(range(125))
    assert [m["lr"] for m in logged] == pytest.approx([lr_at(before if s < 45 else after, s) for s in range(125)],
                                                      rel=1e-12)
    assert [m["phase"] for m in logged] == [0] * 45 + [1] * 80
    good, _ = checkpoint.scan(copy)
    assert [c.step for c in good] == [15, 30, 45, 85, 125] and good[-1].record.final
    assert good[-1].record.recipe_digest == after.recipe.digest()
    with open(os.path.join(copy, "run.json")) as f:
        run = json.load(f)
    assert [(r["digest"], r["from_step"]) for r in run["recipes"]] == [(before.recipe.digest(), 0),
                                                                       (after.recipe.digest(), 45)]
    assert run["recipe_digest"] == after.recipe.digest() and run["recipe"]["phases"][1]["batch_size"] == 6
    assert [(p["first_step"], p["end_step"]) for p in run["phases"]] == [(0, 45), (45, 125)]
    assert run["trained_on"]["train_images"] == {"40": 240, "72": 240}


@pytest.mark.slow
def test_a_batch_larger_than_a_ranks_shard_is_refused_by_every_rank(tiny_root, tmp_path):
    recipe = dict(TWO_PHASES, reference_workers=2, eval_image_size=32,
                  phases=[dict(TWO_PHASES["phases"][0], batch_size=11)])  # 21 images: shards of 11 and 10
    run_dir = tmp_path / "run"
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    proc = subprocess.run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
                           *train_cmd(write_recipe(str(tmp_path), recipe), tiny_root, str(run_dir))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert "Exit code: 2" in output, output[-3000:]
    refusal = ("error: phase 1: batch_size 11 is more than the 10 image(s) per rank (21 training image(s) over 2 "
               "ranks, the smallest shard holding 10): lower batch_size to <= 10")
    assert output.count(refusal) == 2  # each rank finds it before any collective
    assert os.listdir(run_dir) == ["train.lock"]
