"""gluon_imagenet.sweep_eval over a tiny trained run: exact counts, an independent check, workers, damage, stale
results, --watch ending, concurrent sweeps, bad input, the plot."""
import csv
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import matplotlib
import matplotlib.image
import mxnet as mx
import numpy as np
import pytest

from conftest import ROOT, run_tool
from gluon_imagenet import checkpoint, locks, retention, stops
from gluon_imagenet.data import packed
from gluon_imagenet.devices import Device
from gluon_imagenet.model import build_model
from gluon_imagenet.rundir import RunRecord, read_run
from gluon_imagenet.sweep_eval.cli import main as sweep_main
from gluon_imagenet.sweep_eval.cli import parse_args
from gluon_imagenet.sweep_eval.evaluate import Evaluator, worker_main
from gluon_imagenet.sweep_eval.plan import plan_jobs
from gluon_imagenet.sweep_eval.report import best_row, format_table, plot, plot_data, time_to_accuracy
from gluon_imagenet.sweep_eval.results import ResultStore
from gluon_imagenet.sweep_eval.verify import Verifier


@pytest.fixture(scope="module")
def swept(single_run, packed_root, tmp_path_factory):
    """The single run's checkpoints swept by one CPU worker (phase size policy)."""
    _, run_dir, _ = single_run
    copy = str(tmp_path_factory.mktemp("swept") / "run")
    shutil.copytree(run_dir, copy)
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root", packed_root,
                     "--workers", "1", "--batch-size", "16", "--target-top1", "0.99"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return copy, proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def independent_top1(params, model, classes, data_root, data_dir, size, crop_fraction=0.875):
    """Decode, resize and center-crop each validation record with mx.image, one image at a time."""
    records = mx.recordio.MXIndexedRecordIO(os.path.join(data_root, data_dir, "val.idx"),
                                            os.path.join(data_root, data_dir, "val.rec"), "r")
    net = build_model(model, classes)
    net.load_parameters(params, ctx=mx.cpu())
    hits = 0
    for key in records.keys:
        header, payload = mx.recordio.unpack(records.read_idx(key))
        image = mx.image.imdecode(payload)  # RGB, like ImageRecordIter
        image = mx.image.resize_short(image, int(round(size / crop_fraction)), interp=1)
        image, _ = mx.image.center_crop(image, (size, size))
        batch = mx.nd.array(image.asnumpy().transpose(2, 0, 1)[np.newaxis], dtype="uint8")
        hits += int(net(batch).argmax(axis=1).asscalar() == header.label)
    return hits, len(records.keys)


def test_counts_every_validation_image_once(swept):
    run_dir, proc = swept
    rows = read_csv(os.path.join(run_dir, "sweep.csv"))
    assert [int(r["step"]) for r in rows] == [15, 30, 45, 75, 105]
    assert {r["images"] for r in rows} == {"70"}  # 7 per class x 10: not a multiple of the batch of 16
    assert [r["image_size"] for r in rows] == ["32", "32", "32", "64", "64"]  # phase size policy


def test_top1_equals_an_independent_computation(swept, packed_root):
    run_dir, _ = swept
    row = read_csv(os.path.join(run_dir, "sweep.csv"))[-1]
    hits, total = independent_top1(os.path.join(run_dir, row["checkpoint"] + ".params"), "resnet18_v1b", 10,
                                   packed_root, row["data_dir"], int(row["image_size"]))
    assert total == int(row["images"]) == 70
    assert abs(float(row["top1"]) * total - hits) <= 1  # resize kernels may differ on one borderline image


def test_reports_plainly_when_no_checkpoint_reaches_the_target(swept):
    _, proc = swept
    assert "no checkpoint reached top-1 >= 99.00%" in proc.stdout
    assert "ckpt-00000105" in proc.stdout


def test_two_workers_give_the_same_table(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("sweep.*"))
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root", packed_root,
                     "--workers", "2", "--batch-size", "16", "--target-top1", "0.99"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_csv(os.path.join(copy, "sweep.csv")) == read_csv(os.path.join(run_dir, "sweep.csv"))
    with open(os.path.join(copy, "sweep.json")) as f:
        devices = {r["device"] for r in json.load(f)["results"].values()}
    assert devices == {"cpu"} and os.path.getsize(os.path.join(copy, "sweep.png")) > 0


def test_rerun_evaluates_only_new_checkpoints(swept, packed_root):
    run_dir, _ = swept
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--data-root", packed_root,
                     "--batch-size", "16", "--target-top1", "0.99"])  # the batch size is part of the settings
    assert proc.returncode == 0
    assert "5 checkpoint(s) already evaluated" in proc.stdout and "checkpoints:" not in proc.stderr


def test_fixed_size_policy_and_selection(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("sweep.*"))
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root", packed_root,
                     "--size-policy", "fixed", "--last", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(os.path.join(copy, "sweep.csv"))
    assert [(r["step"], r["image_size"], r["data_dir"]) for r in rows] == [("75", "64", "72"), ("105", "64", "72")]


def test_damaged_checkpoint_is_skipped(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("sweep.*"))
    with open(os.path.join(copy, "ckpt-00000030.params"), "r+b") as f:
        f.truncate(4096)
    os.remove(os.path.join(copy, "ckpt-00000075.json"))  # interrupted while saving
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root", packed_root,
                     "--workers", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping ckpt-00000030: ckpt-00000030.params has 4096 bytes" in proc.stderr
    assert "skipping ckpt-00000075: partial" in proc.stderr
    assert [r["step"] for r in read_csv(os.path.join(copy, "sweep.csv"))] == ["15", "45", "105"]


def test_nothing_evaluable_exits_nonzero(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("sweep.*"))
    for name in os.listdir(copy):
        if name.endswith(".states"):
            os.remove(os.path.join(copy, name))
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root", packed_root])
    assert proc.returncode == 1
    assert "no checkpoint could be evaluated" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "{tmp}/nowhere"], "does not exist"),
    (["--run-dir", "{empty}"], "run.json"),
    (["--run-dir", "{nockpt}"], "no checkpoints"),
    (["--run-dir", "{run}", "--data-root", "{tmp}/nodata"], "data root"),
    (["--run-dir", "{run}", "--gpus", "0,3"], "does not exist here"),
    (["--run-dir", "{run}", "--data-root", "{noval}"], "no validation data"),
    (["--run-dir", "{run}", "--from-epoch", "5.5", "--watch"], "--from-epoch 5.5: the recipe ends at epoch 5"),
])
def test_errors_before_any_work(swept, packed_root, tmp_path, args, message):
    run_dir, _ = swept
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "nockpt")
    shutil.copy(os.path.join(run_dir, "run.json"), tmp_path / "nockpt")
    shutil.copytree(packed_root, tmp_path / "noval")
    for size in ("40", "72"):
        os.remove(tmp_path / "noval" / size / "val.rec")
    names = {"tmp": tmp_path, "empty": tmp_path / "empty", "nockpt": tmp_path / "nockpt", "run": run_dir,
             "noval": tmp_path / "noval"}
    argv = [a.format(**names) for a in args]
    if "--data-root" not in argv:
        argv += ["--data-root", packed_root]
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", *argv])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("top5, top1, expected", [
    (0.93, None, 2), (0.5, None, 0), (None, 0.6, 3), (0.93, 0.7, 3), (0.99, None, None), (None, 0.95, None)])
def test_time_to_accuracy_picks_the_first_over_the_target(top5, top1, expected):
    rows = [{"step": s, "top1": t1, "top5": t5} for s, t1, t5 in
            [(0, 0.2, 0.6), (1, 0.5, 0.9), (2, 0.55, 0.94), (3, 0.75, 0.96), (4, 0.7, 0.97)]]
    hit = time_to_accuracy(rows, top5, top1)
    assert (hit["step"] if hit else None) == expected


# ------------------------------------------------------------------------------------------------ helpers
def copy_run(run_dir, dest, keep_results=False):
    shutil.copytree(run_dir, dest, ignore=None if keep_results else shutil.ignore_patterns("sweep.*"))
    return str(dest)


def sweep(run_dir, data_root, *extra, **kwargs):
    return run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--data-root", data_root, *extra],
                    **kwargs)


def rewrite_params(run_dir, name, payload: bytes):
    """Give checkpoint NAME another .params file with a record that matches it, as a retrained run would."""
    with open(os.path.join(run_dir, name + ".params"), "wb") as f:
        f.write(payload)
    json_path = os.path.join(run_dir, name + ".json")
    with open(json_path) as f:
        record = json.load(f)
    record["files"][".params"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    with open(json_path, "w") as f:
        json.dump(record, f)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def rows_of(run_dir, name):
    return [r for r in read_csv(os.path.join(run_dir, "sweep.csv")) if r["checkpoint"] == name]


# ------------------------------------------------------------------------------------------------ stale answers
@pytest.mark.parametrize("change", ["crop fraction", "batch size", "data root"])
def test_another_setting_is_evaluated_again(swept, packed_root, tmp_path, change):
    run_dir, _ = swept  # evaluated with --batch-size 16, crop 0.875
    copy = copy_run(run_dir, tmp_path / "run", keep_results=True)
    root, extra = packed_root, ["--batch-size", "16", "--last", "1"]
    if change == "crop fraction":
        extra += ["--crop-fraction", "0.6"]
    elif change == "batch size":
        extra = ["--batch-size", "32", "--last", "1"]
    else:  # the same folder names under another root: other data
        root = str(shutil.copytree(packed_root, tmp_path / "recordio"))
    proc = sweep(copy, root, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already evaluated" not in proc.stdout and "checkpoints:" in proc.stderr
    assert len(rows_of(copy, "ckpt-00000105")) == 2  # the old answer and the new one, side by side


def test_a_retrained_checkpoint_is_evaluated_again(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run", keep_results=True)
    old = rows_of(copy, "ckpt-00000075")[0]
    # Deleted and trained again: ckpt-00000105 now holds ckpt-00000075's weights (both evaluated at 64 px, data 72).
    rewrite_params(copy, "ckpt-00000105", read_bytes(os.path.join(copy, "ckpt-00000075.params")))
    proc = sweep(copy, packed_root, "--batch-size", "16", "--last", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already evaluated" not in proc.stdout
    rows = rows_of(copy, "ckpt-00000105")
    assert len(rows) == 1  # the old file's answer is dropped, not reported next to the new one
    assert (rows[0]["top1"], rows[0]["top5"]) == (old["top1"], old["top5"])


# ------------------------------------------------------------------------------------------------ the best
@pytest.mark.parametrize("top5, top1, best", [(None, 0.99, "a"), (0.999, None, "b"), (0.999, 0.999, "a")])
def test_the_best_is_ranked_by_the_metric_of_the_target(top5, top1, best):
    rows = [{"checkpoint": "a", "step": 1, "top1": 0.931, "top5": 0.95},
            {"checkpoint": "b", "step": 2, "top1": 0.867, "top5": 0.99}]
    assert time_to_accuracy(rows, top5, top1) is None
    assert best_row(rows, top5, top1)["checkpoint"] == best


def test_the_sweep_names_the_best_top1_when_a_top1_target_is_asked(swept):
    run_dir, proc = swept  # --target-top1 0.99
    rows = read_csv(os.path.join(run_dir, "sweep.csv"))
    best = max(rows, key=lambda r: (float(r["top1"]), float(r["top5"])))
    assert f"the best is {best['checkpoint']} " in proc.stdout


# ------------------------------------------------------------------------------------------------ memory, device
def test_a_worker_keeps_one_iterator_per_setting_and_resets_it(swept, packed_root, monkeypatch):
    from gluon_imagenet.data import iterators

    run_dir, _ = swept
    created = []
    real = iterators.val_iterator

    def counted(*args, **kwargs):  # the real iterator, counted
        created.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(iterators, "val_iterator", counted)
    args = parse_args(["--run-dir", run_dir, "--data-root", packed_root, "--batch-size", "16"])
    jobs, _, _ = plan_jobs(args, read_run(run_dir), packed_root)
    evaluator = Evaluator(Device("cpu"), threads=1)
    rows = [evaluator.evaluate(job) for job in jobs + jobs[-2:]]  # 7 evaluations over 2 settings (32 and 64 px)
    assert len(created) == 2 and {c["device_id"] for c in created} == {Device("cpu").iterator_device_id}
    assert [(r["top1"], r["top5"]) for r in rows[-2:]] == [(r["top1"], r["top5"]) for r in rows[3:5]]
    stored = read_csv(os.path.join(run_dir, "sweep.csv"))
    assert [float(r["top1"]) for r in stored] == [r["top1"] for r in rows[:5]]
    assert {r["images"] for r in rows} == {70}


# ------------------------------------------------------------------------------------------------ --watch
def test_watch_hashes_each_checkpoint_once(swept, packed_root, tmp_path, monkeypatch):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    hashed = []
    original = checkpoint.sha256_of

    def counted(path):  # the real hash, counted
        hashed.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(checkpoint, "sha256_of", counted)
    args = parse_args(["--run-dir", copy, "--data-root", packed_root, "--watch"])
    run, verifier = read_run(copy), Verifier(copy)
    jobs, bad, _ = plan_jobs(args, run, packed_root, verifier)
    assert len(jobs) == 5 and not bad and len(hashed) == 10  # .params and .states of each
    hashed.clear()
    jobs, bad, _ = plan_jobs(args, run, packed_root, verifier)  # the next poll
    assert len(jobs) == 5 and hashed == []
    # A new checkpoint and one written again under its old name are verified; nothing else is read again.
    for ext in (".json", ".params", ".states"):
        shutil.copy(os.path.join(copy, "ckpt-00000075" + ext), os.path.join(copy, "ckpt-00000090" + ext))
    rewrite_params(copy, "ckpt-00000105", read_bytes(os.path.join(copy, "ckpt-00000075.params")))
    jobs, bad, _ = plan_jobs(args, run, packed_root, verifier)
    assert len(jobs) == 6 and not bad
    assert sorted(hashed) == ["ckpt-00000090.params", "ckpt-00000090.states", "ckpt-00000105.params",
                              "ckpt-00000105.states"]


def damage(copy):
    path = os.path.join(copy, "ckpt-00000105.params")
    payload = bytearray(read_bytes(path))
    payload[len(payload) // 2] ^= 0xFF  # same size, another checksum
    with open(path, "wb") as f:
        f.write(payload)


def unloadable(copy):
    rewrite_params(copy, "ckpt-00000105", b"not a parameter file" * 100)


def remove_final(copy):
    for ext in (".json", ".params", ".states"):
        os.remove(os.path.join(copy, "ckpt-00000105" + ext))


@pytest.mark.parametrize("case, trainer, extra, expected", [
    ("damaged", True, ["--last", "1"], "watch ends: the final checkpoint ckpt-00000105 is damaged"),
    ("unloadable", True, ["--from-epoch", "4"], "watch ends: the final checkpoint ckpt-00000105 could not be "
                                                "evaluated"),
    ("not selected", True, ["--every", "2", "--from-epoch", "2"], "watch ends: the final checkpoint ckpt-00000105 "
                                                                  "is there (not in the selection"),
    ("missing", False, ["--last", "1"], "watch ends: training is not running"),
])
def test_watch_ends(swept, packed_root, tmp_path, case, trainer, extra, expected):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    {"damaged": damage, "unloadable": unloadable, "missing": remove_final, "not selected": lambda c: None}[case](copy)
    argv = ["--batch-size", "16", "--watch", "--poll-seconds", "1", *extra]
    if trainer:  # a live trainer holds the run's lock: the sweep must not end just because training stopped
        with locks.hold(os.path.join(copy, "train.lock"), "the test's trainer"):
            proc = sweep(copy, packed_root, *argv, timeout=180)
    else:
        proc = sweep(copy, packed_root, *argv, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout[-2000:]
    if case == "missing":
        assert "the final checkpoint ckpt-00000105 (step 105) is missing" in proc.stdout
    assert read_csv(os.path.join(copy, "sweep.csv"))  # and it reported what it evaluated


@pytest.mark.slow
def test_watch_waits_while_training_runs_and_ends_when_it_stops(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    remove_final(copy)
    lines = queue.Queue()
    with locks.hold(os.path.join(copy, "train.lock"), "the test's trainer"):
        proc = subprocess.Popen([sys.executable, "-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root",
                                 packed_root, "--batch-size", "16", "--last", "1", "--watch", "--poll-seconds", "0.5"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        try:
            seen = []
            while not any("waiting for the final checkpoint ckpt-00000105" in line for line in seen):
                seen.append(lines.get(timeout=120))
            time.sleep(3)  # several polls
            assert proc.poll() is None, "".join(seen)
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=30)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert any("watch ends: training is not running" in line for line in rest), "".join(seen + rest)


# ------------------------------------------------------------------------------------------------ two sweeps at once
@pytest.mark.slow
def test_two_sweeps_at_once_keep_each_others_results(swept, packed_root, tmp_path):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root",
                               packed_root, "--batch-size", "16", "--from-epoch", "3", "--crop-fraction", crop],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for crop in ("0.875", "0.75")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with open(os.path.join(copy, "sweep.json")) as f:
        results = json.load(f)["results"]
    assert sorted((r["step"], r["crop_fraction"]) for r in results.values()) == [
        (s, c) for s in (45, 75, 105) for c in (0.75, 0.875)]
    assert len(read_csv(os.path.join(copy, "sweep.csv"))) == 6


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("flag, value, allowed", [
    ("--last", "-1", ">= 1"), ("--last", "0", ">= 1"), ("--every", "0", ">= 1"), ("--target-top5", "93", "[0, 1]"),
    ("--target-top1", "-0.1", "[0, 1]"), ("--crop-fraction", "0", "(0, 1]"), ("--crop-fraction", "1.2", "(0, 1]"),
    ("--batch-size", "0", ">= 1"), ("--eval-scale", "0", "> 0"), ("--poll-seconds", "0", "> 0"),
    ("--poll-seconds", "-5", "> 0"), ("--workers", "0", ">= 1"), ("--image-size", "0", ">= 1")])
def test_meaningless_values_are_refused_before_any_work(swept, packed_root, tmp_path, capsys, flag, value, allowed):
    run_dir, _ = swept
    before = sorted(os.listdir(run_dir))
    assert sweep_main(["--run-dir", run_dir, "--data-root", packed_root, "--watch", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {value}: must be ") and allowed in err
    assert sorted(os.listdir(run_dir)) == before


@pytest.mark.parametrize("content, message", [
    ("{not json", "is damaged (not JSON"),
    ("[1, 2]", "holds a list"),
    ('{"phases": [{"first_step": 0, "end_step": 9, "image_size": 32, "data_dir": "40"}]}', "has no recipe"),
    ('{"recipe": {"phases": [{"epochs": [0, 1]}]}}', "has no plan"),
])
def test_a_damaged_run_json_is_one_clear_line(packed_root, tmp_path, capsys, content, message):
    (tmp_path / "run.json").write_text(content)
    assert sweep_main(["--run-dir", str(tmp_path), "--data-root", packed_root]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "run.json" in lines[0] and message in lines[0], lines


ROW = {"checkpoint": "ckpt-00000001", "step": 1, "epoch": 1.0, "train_seconds": 1.0, "wall_seconds": 1.0,
       "image_size": 32, "data_dir": "40", "top1": 0.5, "top5": 0.9, "images": 70}


@pytest.mark.parametrize("content", ["{not json", "[]", '{"results": {"k": {"step": 1}}}'])
def test_a_damaged_sweep_json_is_moved_aside(tmp_path, capsys, content):
    (tmp_path / "sweep.json").write_text(content)
    store = ResultStore(str(tmp_path))
    assert store.results == {}
    aside = [name for name in os.listdir(tmp_path) if name.startswith("sweep.json.damaged-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_text() == content
    assert f"moved it to {tmp_path / aside[0]}" in capsys.readouterr().err
    store.add("k2", ROW)  # and goes on
    with open(tmp_path / "sweep.json") as f:
        assert json.load(f) == {"results": {"k2": ROW}}


# ------------------------------------------------------------------------------------------------ the plot
RUN = RunRecord.from_dict({"phases": [{"first_step": 0, "image_size": 128}, {"first_step": 45, "image_size": 224},
                                     {"first_step": 200, "image_size": 288}]})


def plot_rows():
    return [{"checkpoint": f"ckpt-{s:08d}", "step": s, "train_seconds": t, "top1": t1, "top5": t5}
            for s, t, t1, t5 in [(30, 60.0, 0.30, 0.60), (60, 150.0, 0.55, 0.80), (90, 240.0, 0.62, 0.85)]]


def test_plot_data_places_phases_targets_and_the_first_hit():
    data = plot_data(plot_rows(), RUN, (None, 0.5))
    assert data["minutes"] == [1.0, 2.5, 4.0]
    # Step 45 is half way from step 30 (60 s) to step 60 (150 s): 105 s. Step 200 is past the last checkpoint.
    assert [(p["label"], p["minutes"]) for p in data["phases"]] == [("128 px", 0.0), ("224 px", 1.75),
                                                                    ("288 px", None)]
    assert data["boundaries"] == [1.75]
    assert [(t["metric"], t["value"]) for t in data["targets"]] == [("top1", 0.5)]
    hit = data["hit"]
    assert (hit["checkpoint"], hit["minutes"], hit["metric"], hit["value"]) == ("ckpt-00000060", 2.5, "top1", 0.55)
    assert plot_data(plot_rows(), RUN, (0.84, None))["hit"]["checkpoint"] == "ckpt-00000090"
    assert plot_data(plot_rows(), RUN, (0.9, None))["hit"] is None


def test_plot_of_a_real_sweep(swept, tmp_path):
    run_dir, _ = swept
    rows = [dict(r, step=int(r["step"]), train_seconds=float(r["train_seconds"]), top1=float(r["top1"]),
                 top5=float(r["top5"])) for r in read_csv(os.path.join(run_dir, "sweep.csv"))]
    run = read_run(run_dir)
    target = sorted(r["top5"] for r in rows)[2]  # reached by some checkpoint, not by all
    data = plot_data(rows, run, (target, None))
    phase2 = [r for r in rows if r["step"] == run.phases[1].first_step][0]  # a checkpoint ends phase 1
    assert data["boundaries"] == [round(phase2["train_seconds"] / 60, 4)]
    assert [p["label"] for p in data["phases"]] == ["32 px", "64 px"]
    first = next(r for r in rows if r["top5"] >= target)
    assert data["hit"]["checkpoint"] == first["checkpoint"]
    path = str(tmp_path / "sweep.png")
    plot(data, path)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (500, 900)
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.1 and len(np.unique((pixels * 255).astype(int), axis=0)) > 50  # not blank
    crimson = np.all(np.abs(pixels - np.array([220, 20, 60]) / 255) < 0.05, axis=1)
    assert crimson.sum() > 50  # the highlighted first checkpoint reaching the target
    assert matplotlib.image.imread(os.path.join(run_dir, "sweep.png")).shape[:2] == (500, 900)  # the sweep's own


# ------------------------------------------------------------------------------------------------ data root, results
def test_a_data_root_with_other_classes_is_refused(swept, packed_root, tmp_path, capsys):
    run_dir, _ = swept
    before = read_bytes(os.path.join(run_dir, "sweep.json"))
    other = tmp_path / "recordio"
    shutil.copytree(packed_root, other)
    lines = (other / "classes.txt").read_text().splitlines()
    lines[0], lines[1] = lines[0].split("\t")[0] + "\t" + lines[1].split("\t")[1], lines[1].split("\t")[0] + "\t" + \
        lines[0].split("\t")[1]  # two classes swapped: the labels now mean other classes
    (other / "classes.txt").write_text("\n".join(lines) + "\n")
    assert sweep_main(["--run-dir", run_dir, "--data-root", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    assert len(err) == 1 and err[0].startswith(f"error: data root {str(other)!r} holds 10 classes"), err
    assert repr(run["classes"][0]) in err[0] and repr(run["classes"][1]) in err[0] and "--data-root" in err[0]
    assert read_bytes(os.path.join(run_dir, "sweep.json")) == before


def test_results_name_their_data_root_and_its_identity(swept, packed_root):
    run_dir, _ = swept
    rows = read_csv(os.path.join(run_dir, "sweep.csv"))
    assert {r["data_root"] for r in rows} == {os.path.abspath(packed_root)}
    for r in rows:
        assert r["data_id"] == packed.data_identity(packed_root, r["data_dir"], "val")
    assert {r["top5_meaningful"] for r in rows} == {"True"}  # 10 classes


def test_results_of_deleted_checkpoints_are_dropped(swept, packed_root, tmp_path, capsys):
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run", keep_results=True)
    for ext in (".json", ".params", ".states"):
        os.remove(os.path.join(copy, "ckpt-00000015" + ext))
    assert sweep_main(["--run-dir", copy, "--data-root", packed_root, "--batch-size", "16", "--target-top1",
                       "0.99"]) == 0  # everything left is evaluated already: no worker starts
    out = capsys.readouterr().out
    assert f"dropped the results of 1 checkpoint(s) no longer in {copy}" in out and "ckpt-00000015" in out
    assert [r["step"] for r in read_csv(os.path.join(copy, "sweep.csv"))] == ["30", "45", "75", "105"]
    with open(os.path.join(copy, "sweep.json")) as f:
        data = json.load(f)
    assert {r["checkpoint"] for r in data["results"].values()} == {"ckpt-00000030", "ckpt-00000045",
                                                                   "ckpt-00000075", "ckpt-00000105"}
    assert data["ranked_by"] == "top1"  # what export --best follows


# ------------------------------------------------------------------------------------------------ retention
def test_a_checkpoint_pruned_under_the_sweep_is_reported_as_pruned(swept, packed_root, tmp_path):
    """The trainer's retention deletes the record first, then .params and .states (checkpoint.prune_mid_epoch):
    seen between the two, a pruned checkpoint looks like an interrupted save; its worker fails to load it."""
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    args = parse_args(["--run-dir", copy, "--data-root", packed_root, "--batch-size", "16"])
    verifier = Verifier(copy)
    jobs, bad, _ = plan_jobs(args, read_run(copy), packed_root, verifier)
    assert len(jobs) == 5 and not bad
    os.remove(os.path.join(copy, "ckpt-00000030.json"))  # retention, half way
    _, bad, _ = plan_jobs(args, read_run(copy), packed_root, verifier)
    assert bad == [("ckpt-00000030", retention.PRUNED)]
    for ext in (".params", ".states"):
        os.remove(os.path.join(copy, "ckpt-00000030" + ext))
    results = queue.Queue()
    saved = {s: signal.getsignal(s) for s in stops.SIGNALS}
    try:
        worker_main(Device("cpu"), [jobs[1]], 1, results)  # the job planned before the checkpoint was pruned
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert results.get_nowait() == ("pruned", jobs[1].key, retention.PRUNED)


# ------------------------------------------------------------------------------------------------ top-5, few classes
def four_class_run(run_dir, packed_root, tmp_path):
    """A run folder (run.json only) and a data root whose classes are 4 of the 10."""
    folder = tmp_path / "four"
    folder.mkdir()
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    run["classes"] = run["classes"][:4]
    (folder / "run.json").write_text(json.dumps(run))
    root = tmp_path / "recordio4"
    root.mkdir()
    lines = (open(os.path.join(packed_root, "classes.txt")).read().splitlines())[:4]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    for size in ("40", "72"):
        os.symlink(os.path.join(packed_root, size), root / size)
    return str(folder), str(root)


def test_with_few_classes_top5_is_no_target(swept, packed_root, tmp_path, capsys):
    run_dir, _ = swept
    four, root = four_class_run(run_dir, packed_root, tmp_path)
    assert sweep_main(["--run-dir", four, "--data-root", root, "--target-top5", "0.9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target-top5 0.9: the run has 4 classes, so top-5 is 100% for any network")
    assert sweep_main(["--run-dir", four, "--data-root", root]) == 2  # no checkpoints: after the targets
    out = capsys.readouterr().out
    assert "with 4 classes top-5 is 100% for any network: the target is top-1 >= 75.90%" in out
    rows = [{"checkpoint": "ckpt-00000001", "epoch": 1.0, "step": 1, "train_seconds": 1.0, "image_size": 32,
             "top1": 0.5, "top5": 1.0, "images": 8}]
    table = format_table(rows, top5_meaningful=False)
    assert "100.00%" not in table and "n/a" in table.splitlines()[1]
    assert plot_data(rows, RUN, (None, 0.5), top5_meaningful=False)["top5_meaningful"] is False


# ------------------------------------------------------------------------------------------------ clean stops
def workers_of(pid):
    """The sweep's worker processes (not multiprocessing's resource tracker)."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, watch", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_a_stop_ends_the_sweep_and_its_workers(swept, packed_root, tmp_path, signum, code, watch):
    """Ctrl-C reaches the whole process group; SIGTERM (a scheduler, kill) only the sweep: both end it, its
    workers included, in seconds, with one line and no traceback, sweep.lock released."""
    run_dir, _ = swept
    copy = copy_run(run_dir, tmp_path / "run")
    extra = ["--watch", "--poll-seconds", "1"] if watch else []
    with locks.hold(os.path.join(copy, "train.lock"), "the test's trainer"):
        proc = subprocess.Popen([sys.executable, "-m", "gluon_imagenet.sweep_eval", "--run-dir", copy, "--data-root",
                                 packed_root, "--workers", "2", "--batch-size", "16", *extra], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.time() + 60
            while len(workers_of(proc.pid)) < 2 and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # the workers are importing MXNet or evaluating
            workers = workers_of(proc.pid)
            assert len(workers) >= 2 and proc.poll() is None
            start = time.time()
            if signum == signal.SIGINT:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == code, out + err
    assert time.time() - start < 15
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("sweep_eval: stopped"), err
    import psutil

    assert not [w.cmdline() for w in psutil.wait_procs(workers, timeout=5)[1]]  # none left running
    assert locks.holder(os.path.join(copy, "sweep.lock")) is None
