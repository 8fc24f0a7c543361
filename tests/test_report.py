"""The one-page run report (gluon_imagenet.report) and the sweep's TensorBoard events, on a swept copy of a run."""
import contextlib
import io
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from conftest import metrics, run_tool
from gluon_imagenet import report
from gluon_imagenet.rundir import RunRecord
from gluon_imagenet.tensorboard import read_scalars

CRIMSON = (0x3C, 0x14, 0xDC)  # BGR of the star that marks the first checkpoint reaching the target


def call(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report.main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def swept_copy(single_run, tmp_path_factory):
    """The whole trained run (every checkpoint, metrics.jsonl, its TensorBoard folder), evaluated by the sweep."""
    run_dir = str(tmp_path_factory.mktemp("report") / "run")
    shutil.copytree(single_run[1], run_dir, ignore=shutil.ignore_patterns("train.lock", "sweep*", "export"))
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--workers", "1", "--batch-size",
                     "32", "--target-top1", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(run_dir, "sweep.json")) as f:
        rows = sorted(json.load(f)["results"].values(), key=lambda r: r["step"])
    assert len(rows) == 5
    return run_dir, rows


def test_sweep_draws_accuracy_per_checkpoint_on_tensorboard(swept_copy):
    run_dir, rows = swept_copy
    scalars = read_scalars(os.path.join(run_dir, "tensorboard", "sweep-phase-crop0.875"))
    for metric in ("top1", "top5", "image_size"):
        assert [s for s, _ in scalars[f"accuracy/{metric}"]] == [r["step"] for r in rows]
        assert [v for _, v in scalars[f"accuracy/{metric}"]] == pytest.approx([r[metric] for r in rows], rel=1e-6)
        by_time = scalars[f"accuracy_vs_train_seconds/{metric}"]
        assert [s for s, _ in by_time] == [round(r["train_seconds"]) for r in rows]
    # The trainer's curves are in the same folder, on the same step axis: the last checkpoint is the last step.
    train = read_scalars(os.path.join(run_dir, "tensorboard", "train"))
    assert train["train/loss"][-1][0] == rows[-1]["step"]


def test_report_shows_the_run(swept_copy):
    run_dir, rows = swept_copy
    best = max(r["top1"] for r in rows)
    code, out, err = call([run_dir, "--target-top1", str(best)])
    assert code == 0, err
    path = os.path.join(run_dir, "report.png")
    assert out.strip() == f"report: {path}"
    image = cv2.imread(path)
    assert image.shape == (9 * 90, 13 * 90, 3)
    assert (image == CRIMSON).all(axis=2).sum() > 50  # the target is reached: the star is drawn
    code, _, err = call([run_dir, "--target-top1", "1", "--out", os.path.join(run_dir, "unreached.png")])
    assert code == 0, err
    assert not (cv2.imread(os.path.join(run_dir, "unreached.png")) == CRIMSON).all(axis=2).any()


def test_report_numbers(swept_copy):
    run_dir, _ = swept_copy
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    logged = metrics(run_dir)
    rates = report.phase_rates(logged, RunRecord.from_dict(run).phases)
    for phase, rate in zip(run["phases"], rates):
        inside = [m["img_per_s"] for m in logged if "img_per_s" in m and phase["first_step"] <= m["step"] <
                  phase["end_step"]]
        assert rate == np.median(inside[1:])
    # TensorBoard's debiased moving average: the first value is kept, then (0.5 * 1 + 0.5 * 3) / (1 - 0.25)...
    assert report.smoothed([1.0, 3.0, float("nan"), 3.0], 0.5) == pytest.approx(
        [1.0, (0.25 + 1.5) / 0.75, float("nan"), (0.875 + 1.5) / 0.875], nan_ok=True)
    text = report.header(RunRecord.from_dict(run), report.newest_record(run_dir), logged)
    assert "test-two-phases" in text and "1 worker(s) on cpu" in text and "AMP off" in text
    assert f"step {run['phases'][-1]['end_step']}/{run['phases'][-1]['end_step']}" in text


def test_report_of_a_folder_that_is_not_a_run_exits_2(tmp_path):
    code, out, err = call([str(tmp_path)])
    assert code == 2 and err.startswith("error: ") and "run.json" in err, err
    assert os.listdir(tmp_path) == []


def test_report_draws_every_checkpoints_default_setting_beside_its_best(swept_copy, tmp_path):
    # With other settings evaluated (here --flip), the main curve stays the default setting of every checkpoint:
    # picking each checkpoint's best row first left out those whose best was not the default.
    run_dir = str(tmp_path / "run")
    shutil.copytree(swept_copy[0], run_dir)
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--workers", "1", "--batch-size",
                     "32", "--target-top1", "0", "--flip"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = report.sweep_rows(run_dir)
    assert len(rows) == 10 and sum(bool(r.get("flip")) for r in rows) == 5
    with open(os.path.join(run_dir, "run.json")) as f:
        data = report.plot_data(rows, RunRecord.from_dict(json.load(f)), (None, 0.0))
    assert len(data["top1"]) == 5 and data["best"] is not None and len(data["best"]["top1"]) == 5
    assert call([run_dir])[0] == 0
