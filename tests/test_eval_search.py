"""Evaluation as a search (sweep_eval --eval-scales, --flip, --weights) and what export --best makes of it: the
mirror average against a by-hand computation with the real network, the scale rows and the best-setting choice,
EMA weights beside a checkpoint (read, reported apart, damaged or missing), and the exported setting."""
import csv
import glob
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from conftest import run_tool
from gluon_imagenet import best, checkpoint, predict
from gluon_imagenet.export import cli as export_cli
from gluon_imagenet.model import build_model
from gluon_imagenet.rundir import read_run
from gluon_imagenet.sweep_eval.cli import main as sweep_main
from gluon_imagenet.sweep_eval.cli import parse_args
from gluon_imagenet.sweep_eval.jobs import flip_averaged
from gluon_imagenet.sweep_eval.plan import SweepError, plan_jobs
from gluon_imagenet.sweep_eval.report import format_table, per_checkpoint, plot_data

EMA_OF = "ckpt-00000045"  # its weights become ckpt-00000105's "EMA weights": a network that scores otherwise
WITH_EMA = "ckpt-00000105"
WITHOUT_EMA = "ckpt-00000075"


def copy_checkpoints(src, dst, names):
    os.makedirs(dst)
    shutil.copy2(os.path.join(src, "run.json"), dst)
    for name in names:
        for ext in (".json", ".params", ".states"):
            shutil.copy2(os.path.join(src, name + ext), dst)
    return str(dst)


def add_ema(run_dir, name, weights_from):
    """Give checkpoint NAME EMA weights as the trainer writes them: the file beside it, checksummed in its record."""
    path = os.path.join(run_dir, name + ".ema.params")
    shutil.copy2(weights_from, path)
    json_path = os.path.join(run_dir, name + ".json")
    with open(json_path) as f:
        record = json.load(f)
    record["files"][".ema.params"] = {"bytes": os.path.getsize(path), "sha256": checkpoint.sha256_of(path)}
    record["ema"] = {"half_life_epochs": 0.5, "every_steps": 1}
    with open(json_path, "w") as f:
        json.dump(record, f)


@pytest.fixture(scope="module")
def searched(single_run, packed_root, tmp_path_factory):
    """The run's last two checkpoints (64 px, data 72), ckpt-105 with EMA weights, swept at scales 1 and 1.125
    (72 px) with and without flip: 4 results for ckpt-75, 8 for ckpt-105."""
    _, src, _ = single_run
    run_dir = copy_checkpoints(src, tmp_path_factory.mktemp("search") / "run", [WITHOUT_EMA, WITH_EMA])
    add_ema(run_dir, WITH_EMA, os.path.join(src, EMA_OF + ".params"))
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--data-root", packed_root,
                     "--batch-size", "16", "--eval-scales", "1,1.125", "--flip", "--target-top1", "0.99"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(run_dir, "sweep.json")) as f:
        rows = list(json.load(f)["results"].values())
    return run_dir, proc, rows, src


def the(rows, checkpoint_name, scale=1.0, flip=False, weights="raw"):
    found = [r for r in rows if (r["checkpoint"], r["eval_scale"], r["flip"], r["weights"]) ==
             (checkpoint_name, scale, flip, weights)]
    assert len(found) == 1, found
    return found[0]


def val_inputs(data_root, data_dir, size, crop_fraction=0.875):
    """(NCHW uint8 images, labels) decoded one at a time with mx.image, as ImageRecordIter's validation step."""
    records = mx.recordio.MXIndexedRecordIO(os.path.join(data_root, data_dir, "val.idx"),
                                            os.path.join(data_root, data_dir, "val.rec"), "r")
    images, labels = [], []
    for key in records.keys:
        header, payload = mx.recordio.unpack(records.read_idx(key))
        image = mx.image.resize_short(mx.image.imdecode(payload), int(round(size / crop_fraction)), interp=1)
        image, _ = mx.image.center_crop(image, (size, size))
        images.append(image.asnumpy().transpose(2, 0, 1))
        labels.append(int(header.label))
    return np.stack(images), np.array(labels)


def network(params):
    net = build_model("resnet18_v1b", 10)
    net.load_parameters(params, ctx=mx.cpu())
    return net


def softmax(scores):
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hits(probabilities, labels):
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    return int((ranked[:, 0] == labels).sum()), int((ranked[:, :5] == labels[:, None]).sum())


# ------------------------------------------------------------------------------------------------ flip
def test_flip_averages_the_softmax_of_each_image_and_its_mirror(searched, packed_root):
    run_dir, _, rows, _ = searched
    images, labels = val_inputs(packed_root, "72", 64)
    net = network(os.path.join(run_dir, WITH_EMA + ".params"))
    # By hand: the image and its mirror (numpy, width reversed) through the real network, softmax averaged.
    by_hand = (softmax(net(mx.nd.array(images, dtype="uint8")).asnumpy()) +
               softmax(net(mx.nd.array(np.ascontiguousarray(images[..., ::-1]), dtype="uint8")).asnumpy())) / 2
    plain = softmax(net(mx.nd.array(images, dtype="uint8")).asnumpy())
    assert np.abs(by_hand - plain).max() > 1e-3  # the mirror changes the answer: the test can tell them apart
    ours = flip_averaged(net, mx.nd.array(images, dtype="uint8")).asnumpy()
    np.testing.assert_allclose(ours, by_hand, rtol=1e-5, atol=1e-6)
    # And the sweep's stored result over the whole validation set counts exactly those hits.
    row = the(rows, WITH_EMA, flip=True)
    assert (round(row["top1"] * row["images"]), round(row["top5"] * row["images"])) == hits(by_hand, labels)
    assert (the(rows, WITH_EMA)["top1"] * 70, the(rows, WITH_EMA)["top5"] * 70) == pytest.approx(hits(plain, labels))


# ------------------------------------------------------------------------------------------------ scales
def test_every_scale_and_flip_is_its_own_result(searched, packed_root):
    run_dir, proc, rows, _ = searched
    mine = sorted((r["image_size"], r["data_dir"], r["eval_scale"], r["flip"]) for r in rows
                  if r["checkpoint"] == WITHOUT_EMA)
    assert mine == [(64, "72", 1.0, False), (64, "72", 1.0, True), (72, "72", 1.125, False), (72, "72", 1.125, True)]
    assert len({r["image_size"] for r in rows}) == 2 and len(rows) == 12 and {r["images"] for r in rows} == {70}
    images, labels = val_inputs(packed_root, "72", 72)  # x1.125 of 64 px: 72 px
    net = network(os.path.join(run_dir, WITHOUT_EMA + ".params"))
    row = the(rows, WITHOUT_EMA, scale=1.125)
    assert (round(row["top1"] * 70), round(row["top5"] * 70)) == hits(net(mx.nd.array(images, dtype="uint8")).asnumpy(),
                                                                      labels)
    with open(os.path.join(run_dir, "sweep.csv")) as f:
        stored = list(csv.DictReader(f))
    assert len(stored) == 12 and {(r["eval_scale"], r["flip"], r["weights"]) for r in stored} >= {
        ("1.125", "True", "ema"), ("1.0", "False", "raw")}


def test_the_report_shows_the_default_and_the_best_setting_and_both_times(searched):
    run_dir, proc, rows, _ = searched
    chosen = best.best_row(rows, "top1")
    scale_flip = f"x{chosen['eval_scale']:g}{' flip' if chosen['flip'] else ''}"
    assert (f"the best is {chosen['checkpoint']} (setting {scale_flip} {chosen['weights']}, top-1 "
            f"{chosen['top1']:.2%}") in proc.stdout
    assert "time to top-1 >= 99.00% (default setting (x1 raw, no flip)): not reached" in proc.stdout
    assert "time to top-1 >= 99.00% (best setting per checkpoint): not reached" in proc.stdout
    lines = {line.split()[0]: [] for line in proc.stdout.splitlines() if line.startswith("ckpt-")}
    for line in proc.stdout.splitlines():
        if line.startswith("ckpt-"):
            lines[line.split()[0]].append(line)
    for entry in per_checkpoint(rows, "top1"):
        shown = lines[entry["checkpoint"]]
        assert "default" in shown[0] and f"{entry['default']['top1']:.2%}" in shown[0]
        if entry["best"] is not entry["default"]:
            b = entry["best"]
            assert len(shown) == 2 and f"best: x{b['eval_scale']:g}{' flip' if b['flip'] else ''}" in shown[1]
            assert b["weights"] in shown[1].split() and f"{b['top1']:.2%}" in shown[1]
    data = plot_data(rows, read_run(run_dir), (None, 0.99))
    assert data["top1"] == [the(rows, c)["top1"] for c in (WITHOUT_EMA, WITH_EMA)]  # the default curve
    assert data["best"]["top1"] == [e["best"]["top1"] for e in per_checkpoint(rows, "top1")]


def test_the_best_setting_is_the_best_result_and_of_equals_the_cheaper():
    base = {"checkpoint": "c", "step": 9, "top5": 1.0, "image_size": 64, "images": 10, "epoch": 1.0,
            "train_seconds": 1.0}
    rows = [dict(base, top1=0.5, eval_scale=1.0, flip=False, weights="raw"),
            dict(base, top1=0.7, eval_scale=1.3, flip=True, weights="ema"),
            dict(base, top1=0.7, eval_scale=1.15, flip=True, weights="ema"),
            dict(base, top1=0.7, eval_scale=1.15, flip=False, weights="ema"),
            dict(base, top1=0.6, eval_scale=1.0, flip=False, weights="raw", checkpoint="d", step=10)]
    assert best.best_row(rows, "top1") is rows[3]  # equal top-1: no flip, then the scale nearest 1
    assert best.best_row(rows[:3], "top1") is rows[2]
    entries = per_checkpoint(rows, "top1")
    assert [(e["default"]["top1"], e["best"]["top1"]) for e in entries] == [(0.5, 0.7), (0.6, 0.6)]
    table = format_table(rows, metric="top1").splitlines()
    assert "best: x1.15" in table[2] and " ema " in table[2] and "default (best)" in table[3]


def test_a_scale_reads_the_smallest_packed_data_that_holds_it(single_run, packed_root, tmp_path):
    _, src, _ = single_run
    run_dir = copy_checkpoints(src, tmp_path / "run", ["ckpt-00000015", EMA_OF])  # 32 px, data 40
    args = parse_args(["--run-dir", run_dir, "--data-root", packed_root, "--eval-scales", "1,1.5,1.05"])
    jobs, _, _ = plan_jobs(args, read_run(run_dir), packed_root)
    # x1.05 rounds back to 32 px: one evaluation, named by the first scale.
    assert sorted({(j.image_size, j.data_dir, j.eval_scale) for j in jobs}) == [(32, "40", 1.0), (48, "72", 1.5)]
    assert sweep_main(["--run-dir", run_dir, "--data-root", packed_root, "--eval-scales", "1,4"]) == 2  # 128 px


@pytest.mark.parametrize("argv, message", [
    (["--eval-scales", "1,x"], "error: --eval-scales 1,x: 'x' is not a number"),
    (["--eval-scales", "1,1.0"], "error: --eval-scales 1,1.0: 1 is given twice"),
    (["--eval-scales", "0,1"], "error: --eval-scales 0,1: must be factors > 0"),
    (["--eval-scales", "nan"], "error: --eval-scales nan: must be factors > 0"),
    (["--eval-scale", "-1"], "error: --eval-scale -1: must be a factor > 0"),
    (["--eval-scale", "1.2", "--eval-scales", "1,1.2"], "error: --eval-scale 1.2 and --eval-scales 1,1.2: give one"),
])
def test_bad_scales_are_refused_before_any_work(searched, packed_root, capsys, argv, message):
    run_dir = searched[0]
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "*"))}
    assert sweep_main(["--run-dir", run_dir, "--data-root", packed_root, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "*"))} == before


def test_eval_scale_is_the_one_element_case(searched, packed_root):
    args = parse_args(["--run-dir", searched[0], "--eval-scale", "1.125"])
    assert args.scales == (1.125,)
    with pytest.raises(SweepError):
        parse_args(["--run-dir", searched[0], "--eval-scales", "1,-2"])  # parse_args checks and parses the scales


# ------------------------------------------------------------------------------------------------ EMA weights
def test_raw_and_ema_weights_are_reported_apart(searched, packed_root):
    run_dir, proc, rows, src = searched
    images, labels = val_inputs(packed_root, "72", 64)
    batch = mx.nd.array(images, dtype="uint8")
    for weights, params in (("raw", os.path.join(run_dir, WITH_EMA + ".params")),
                            ("ema", os.path.join(src, EMA_OF + ".params"))):
        row = the(rows, WITH_EMA, weights=weights)
        assert (round(row["top1"] * 70), round(row["top5"] * 70)) == hits(network(params)(batch).asnumpy(), labels)
    raw, ema = the(rows, WITH_EMA), the(rows, WITH_EMA, weights="ema")
    assert (raw["top1"], raw["top5"]) != (ema["top1"], ema["top5"])
    with open(os.path.join(run_dir, WITH_EMA + ".json")) as f:
        assert ema["ema_sha256"] == json.load(f)["files"][".ema.params"]["sha256"] and raw["ema_sha256"] is None
    assert not [r for r in rows if r["checkpoint"] == WITHOUT_EMA and r["weights"] == "ema"]
    assert f"{WITH_EMA}.ema" not in proc.stderr  # the EMA file is no checkpoint of its own ("partial")


@pytest.mark.parametrize("case", ["damaged", "missing", "--weights ema without them"])
def test_damaged_or_missing_ema_weights_are_reported(searched, tmp_path, packed_root, capsys, case):
    run_dir = str(shutil.copytree(searched[0], tmp_path / "run"))
    ema = os.path.join(run_dir, WITH_EMA + ".ema.params")
    extra = []
    if case == "damaged":
        with open(ema, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif case == "missing":
        os.remove(ema)
    else:
        extra = ["--weights", "ema"]
    code = sweep_main(["--run-dir", run_dir, "--data-root", packed_root, "--batch-size", "16", *extra])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    expected = {"damaged": f"skipping the EMA weights of {WITH_EMA}: {WITH_EMA}.ema.params is damaged (checksum "
                           "differs)",
                "missing": f"skipping the EMA weights of {WITH_EMA}: {WITH_EMA}.ema.params is missing",
                "--weights ema without them": f"skipping {WITHOUT_EMA}: no EMA weights"}[case]
    assert expected in err
    shown = [line.split() for line in out.splitlines() if line.startswith("ckpt-")]
    assert [s[0] for s in shown] == ([WITH_EMA] if extra else [WITHOUT_EMA, WITH_EMA])
    assert all(("ema" in s) == bool(extra) and ("raw" in s) != bool(extra) for s in shown)  # the weights column


# ------------------------------------------------------------------------------------------------ export
def test_export_best_takes_the_best_weights_and_setting(searched, tmp_path, shapes_tree):
    src_run, _, _, src = searched
    run_dir = str(shutil.copytree(src_run, tmp_path / "run"))
    path = os.path.join(run_dir, "sweep.json")
    with open(path) as f:
        data = json.load(f)
    for row in data["results"].values():  # the EMA weights at x1.125 with flip made best, whatever they scored
        if (row["checkpoint"], row["weights"], row["eval_scale"], row["flip"]) == (WITH_EMA, "ema", 1.125, True):
            row["top1"] = row["top5"] = 1.0
    with open(path, "w") as f:
        json.dump(data, f)
    out = str(tmp_path / "model")
    assert export_cli.main(["--run-dir", run_dir, "--best", "--out", out]) == 0
    with open(os.path.join(out, "provenance.json")) as f:
        provenance = json.load(f)
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert (provenance["checkpoint"], provenance["weights"], provenance["eval_scale"], provenance["flip"]) == (
        WITH_EMA, "ema", 1.125, True)
    assert provenance["weights_sha256"] == checkpoint.sha256_of(os.path.join(run_dir, WITH_EMA + ".ema.params"))
    assert meta["preprocess"]["flip"] is True and meta["preprocess"]["crop"] == 72
    net, meta = predict.load(out)
    probe = mx.nd.array(np.random.default_rng(3).integers(0, 256, (2, 3, 72, 72)), dtype="uint8")
    np.testing.assert_allclose(net(probe).asnumpy(), network(os.path.join(src, EMA_OF + ".params"))(probe).asnumpy(),
                               rtol=1e-4, atol=1e-4)  # the EMA weights, not the raw ones
    image = sorted(glob.glob(os.path.join(shapes_tree, "val", "*", "*.jpg")))[0]
    (_, got), = predict.predict(net, meta, [image], top=10)[0]
    x = predict.prepare(predict.read_image(image)[0], meta["preprocess"])[np.newaxis]
    expected = (softmax(net(mx.nd.array(x, dtype="uint8")).asnumpy().astype(np.float64)) +
                softmax(net(mx.nd.array(np.ascontiguousarray(x[..., ::-1]), dtype="uint8")).asnumpy()
                        .astype(np.float64))) / 2
    assert [i for i, _ in got] == list(np.argsort(-expected[0], kind="stable"))
    np.testing.assert_allclose([p for _, p in got], np.sort(expected[0])[::-1], rtol=1e-5)


def test_scales_and_flip_share_one_iterator_per_size_per_worker(searched, packed_root, monkeypatch):
    from gluon_imagenet.data import iterators
    from gluon_imagenet.devices import Device
    from gluon_imagenet.sweep_eval.evaluate import Evaluator

    run_dir, _, rows, _ = searched
    created, real = [], iterators.val_iterator

    def counted(*args, **kwargs):  # the real iterator, counted
        created.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(iterators, "val_iterator", counted)
    args = parse_args(["--run-dir", run_dir, "--data-root", packed_root, "--batch-size", "16", "--eval-scales",
                       "1,1.125", "--flip"])
    jobs, _, _ = plan_jobs(args, read_run(run_dir), packed_root)
    assert len(jobs) == 6 and all(j.flips == (False, True) for j in jobs)  # 2 sizes x (1 + 2 weights)
    evaluator = Evaluator(Device("cpu"), threads=1)
    results = dict(kv for job in jobs for kv in evaluator.evaluate_all(job))
    assert len(created) == 2  # one per size: flip and the EMA weights reuse it (reset between passes)
    stored = {(r["checkpoint"], r["eval_scale"], r["flip"], r["weights"]): (r["top1"], r["top5"]) for r in rows}
    assert {(r["checkpoint"], r["eval_scale"], r["flip"], r["weights"]): (r["top1"], r["top5"])
            for r in results.values()} == stored
