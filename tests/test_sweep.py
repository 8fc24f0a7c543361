"""gluon_imagenet.sweep_eval over a tiny trained run: exact counts, an independent check, workers, damage."""
import csv
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from conftest import run_tool
from gluon_imagenet.model import build_model
from gluon_imagenet.sweep_eval import time_to_accuracy


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
                     "--target-top1", "0.99"])
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
