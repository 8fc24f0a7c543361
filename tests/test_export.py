"""Exporting a checkpoint as a model folder, and predicting with it (gluon_imagenet.export, gluon_imagenet.predict)."""
import contextlib
import glob
import io
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from conftest import run_tool
from gluon_imagenet import export, predict


def call(main, args):
    """(exit code, stdout, stderr) of a command's main() run in this process: the same code as
    `python -m gluon_imagenet.<module>`, without paying for another MXNet start on a shared 2-core machine
    (one subprocess test below checks the command as typed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def copy_run(src, dst, last=2):
    """run.json and the newest `last` checkpoints of a run (the run fixture is shared: never written into)."""
    os.makedirs(dst)
    shutil.copy2(os.path.join(src, "run.json"), dst)
    records = sorted(glob.glob(os.path.join(src, "ckpt-*.json")))[-last:]
    for record in records:
        for ext in (".json", ".params", ".states"):
            shutil.copy2(record[: -len(".json")] + ext, dst)
    return [os.path.basename(r)[: -len(".json")] for r in records]


@pytest.fixture(scope="module")
def swept_run(single_run, tmp_path_factory):
    """A copy of the trained run with its last two checkpoints, evaluated by the sweep."""
    run_dir = str(tmp_path_factory.mktemp("export") / "run")
    copy_run(single_run[1], run_dir)
    proc = run_tool(["-m", "gluon_imagenet.sweep_eval", "--run-dir", run_dir, "--workers", "1", "--batch-size",
                     "32", "--target-top1", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(run_dir, "sweep.json")) as f:
        rows = list(json.load(f)["results"].values())
    assert len(rows) == 2
    return run_dir, rows


@pytest.fixture(scope="module")
def exported(swept_run):
    run_dir, rows = swept_run
    code, out, err = call(export.main, ["--run-dir", run_dir, "--best"])
    assert code == 0, out + err
    best = max(rows, key=lambda r: (r["top1"], r["top5"], r["step"]))
    return os.path.join(run_dir, "export", best["checkpoint"]), best, out


def val_images(shapes_tree):
    """(path, true class) of every generated validation image."""
    return [(p, os.path.basename(os.path.dirname(p))) for p in sorted(glob.glob(os.path.join(shapes_tree, "val", "*",
                                                                                                  "*.jpg")))]


# ------------------------------------------------------------------------------------------------ export
def test_export_best_writes_a_complete_folder(exported, swept_run, packed_root):
    out, best, stdout = exported
    run_dir, _ = swept_run
    assert sorted(os.listdir(out)) == ["model-0000.params", "model-symbol.json", "model.json", "provenance.json"]
    assert os.listdir(os.path.join(run_dir, "export")) == [best["checkpoint"]]  # no temporary folder left
    assert "top-1, then top-5" in stdout and best["checkpoint"] in stdout
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(packed_root, best["data_dir"], "pack.json")) as f:
        pack = json.load(f)
    assert meta["classes"] == run["classes"]
    assert meta["input"]["shape"] == ["batch", 3, best["image_size"], best["image_size"]]
    assert meta["input"]["dtype"] == "uint8"
    prep = meta["preprocess"]
    assert (prep["crop"], prep["crop_fraction"], prep["data_dir"]) == (best["image_size"], 0.875, best["data_dir"])
    assert prep["resize"] == int(round(best["image_size"] / 0.875))
    assert (prep["packed_short_side"], prep["jpeg_quality"]) == (pack["short_side"], pack["quality"])
    with open(os.path.join(out, "provenance.json")) as f:
        prov = json.load(f)
    assert (prov["checkpoint"], prov["step"], prov["epoch"]) == (best["checkpoint"], best["step"], best["epoch"])
    assert prov["sweep_accuracy"]["top1"] == best["top1"] and prov["sweep_accuracy"]["images"] == best["images"]
    assert prov["recipe"]["digest"] == run["recipe_digest"] and prov["git_revision"] == run["git_revision"]
    assert prov["versions"] == run["versions"]


def test_packer_chain_is_found(packed_root):
    """packed_root was packed at 72 and 40 in one run: the 40 px images were resized from the 72 px ones."""
    from gluon_imagenet.export import packer_settings

    assert packer_settings(packed_root, "40")["packer_sizes"] == [72, 40]
    assert packer_settings(packed_root, "72")["packer_sizes"] == [72]


@pytest.mark.parametrize("data_dir, crop, crop_fraction", [
    ("72", 64, 0.875),  # the run's evaluation
    ("40", 32, 0.875),  # a smaller pack, resized by the packer from the 72 px image
    ("72", 56, 0.875),
    ("40", 40, 1.0),  # no margin: the resize equals the crop
    ("72", 64, 1.2),  # resize below the crop: ImageRecordIter enlarges once more
])
def test_prepare_matches_image_record_iter_pixel_for_pixel(shapes_tree, packed_root, data_dir, crop, crop_fraction):
    """predict's preprocessing of the original file == the sweep's input from the packed record, exactly."""
    from gluon_imagenet.data import val_iterator
    from gluon_imagenet.export import packer_settings
    from gluon_imagenet.predict import prepare, read_image

    with open(os.path.join(packed_root, data_dir, "val.lst")) as f:
        paths = [line.rstrip("\n").split("\t")[2] for line in f]
    batch = next(iter(val_iterator(packed_root, data_dir, crop, len(paths), 1, crop_fraction)))
    expected = batch.data[0].asnumpy().astype(np.uint8)
    prep = dict(packer_settings(packed_root, data_dir), crop=crop, resize=int(round(crop / crop_fraction)))
    for i, path in enumerate(paths):
        image, why = read_image(os.path.join(shapes_tree, path))
        assert not why
        got = prepare(image, prep)
        assert got.shape == (3, crop, crop) and got.dtype == np.uint8
        assert np.array_equal(got, expected[i]), f"{path}: max difference {np.abs(got - expected[i].astype(int)).max()}"


@pytest.mark.parametrize("case, message", [
    ("no run.json", "run.json' does not exist"),
    ("unknown checkpoint", "is not in"),
    ("damaged checkpoint", "damaged (checksum differs)"),
    ("best without sweep", "holds no results"),
    ("out is not a model folder", "not a model folder written by export"),
    ("best result of other parameters", "evaluated other parameters than"),
])
def test_export_errors_exit_2_and_write_nothing(single_run, tmp_path, case, message):
    run_dir = str(tmp_path / "run")
    names = copy_run(single_run[1], run_dir, last=1)
    args = ["--run-dir", run_dir]
    if case == "no run.json":
        os.remove(os.path.join(run_dir, "run.json"))
    elif case == "unknown checkpoint":
        args += ["--checkpoint", "ckpt-99999999"]
        message = f"available: {names[0]}"
    elif case == "damaged checkpoint":
        with open(os.path.join(run_dir, names[0] + ".params"), "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        args += ["--checkpoint", names[0]]
    elif case == "best without sweep":
        args += ["--best"]
    elif case == "best result of other parameters":
        # A sweep result whose parameters' checksum is not the checkpoint's: the checkpoint was rewritten since.
        with open(os.path.join(run_dir, "run.json")) as f:
            data_root = json.load(f)["data_root"]
        row = {"checkpoint": names[0], "step": 1, "epoch": 1.0, "train_seconds": 1.0, "wall_seconds": 1.0,
               "image_size": 64, "data_dir": "72", "top1": 0.5, "top5": 0.9, "images": 70, "params_sha256": "0" * 64,
               "data_root": data_root}  # a whole row, as the sweep writes it
        with open(os.path.join(run_dir, "sweep.json"), "w") as f:
            json.dump({"results": {names[0]: row}}, f)
        args += ["--best"]
    else:
        keep = tmp_path / "mine"
        keep.mkdir()
        (keep / "notes.txt").write_text("not a model")
        args += ["--out", str(keep)]
    before = sorted(os.listdir(tmp_path))
    code, out, err = call(export.main, args)
    assert code == 2, out + err
    assert message in err
    assert not os.path.exists(os.path.join(run_dir, "export"))
    assert sorted(os.listdir(tmp_path)) == before
    if case == "out is not a model folder":
        assert (tmp_path / "mine" / "notes.txt").read_text() == "not a model"


def test_export_by_step_number_replaces_an_older_export(single_run, tmp_path):
    run_dir = str(tmp_path / "run")
    names = copy_run(single_run[1], run_dir, last=1)
    step = str(int(names[0].split("-")[1]))
    out = str(tmp_path / "model")
    code, first, err = call(export.main, ["--run-dir", run_dir, "--checkpoint", step, "--out", out])
    assert code == 0, err
    assert "not evaluated by a sweep" in first
    code, again, err = call(export.main, ["--run-dir", run_dir, "--checkpoint", step, "--out", out])
    assert code == 0, err
    assert f"replaced {out}" in again
    assert sorted(os.listdir(tmp_path)) == ["model", "run"]  # no .partial or .old folder left
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    with open(os.path.join(run_dir, "run.json")) as f:
        recipe = json.load(f)["recipe"]
    # No sweep: the recipe's evaluation size and the default crop.
    assert meta["preprocess"]["crop"] == (recipe["eval_image_size"] or recipe["phases"][-1]["image_size"])
    assert meta["preprocess"]["crop_fraction"] == 0.875


# ------------------------------------------------------------------------------------------------ predict
def test_predict_agrees_with_the_sweep(exported, shapes_tree):
    """Same images, same preprocessing: the same top-1 count as the sweep for that checkpoint. Zero difference
    allowed: predict reproduces the packer's resize chain and JPEG round trip, so every network input is
    identical to the sweep's (test_prepare_matches_image_record_iter_pixel_for_pixel)."""
    out, best, _ = exported
    images = val_images(shapes_tree)
    code, stdout, err = call(predict.main, [out, *[p for p, _ in images], "--json", "--top", "1"])
    assert code == 0, err
    predictions = json.loads(stdout)["predictions"]
    assert len(predictions) == len(images) == best["images"]
    truth = dict(images)
    hits = sum(p["top"][0]["class"] == truth[p["image"]] for p in predictions)
    assert hits == round(best["top1"] * best["images"])


def test_predict_json_output(exported, shapes_tree):
    out, _, _ = exported
    images = [p for p, _ in val_images(shapes_tree)[:3]]
    code, stdout, err = call(predict.main, [out, *images, "--json", "--top", "3"])
    assert code == 0, err
    result = json.loads(stdout)
    with open(os.path.join(out, "model.json")) as f:
        classes = json.load(f)["classes"]
    assert result["model"] == out and result["errors"] == []
    assert [p["image"] for p in result["predictions"]] == images
    for p in result["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert all(classes[t["index"]] == t["class"] for t in p["top"])


def test_predict_reports_an_unreadable_image_and_predicts_the_others(exported, shapes_tree, tmp_path):
    out, _, _ = exported
    good = val_images(shapes_tree)[0][0]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not a JPEG")
    missing = str(tmp_path / "missing.jpg")
    strip = str(tmp_path / "strip.png")  # decodable, but 73 x 219,000 px once its short side is resized
    cv2.imwrite(strip, np.zeros((1, 3000, 3), np.uint8))
    code, stdout, err = call(predict.main, [out, str(garbage), good, missing, strip, "--top", "2"])
    assert code == 1, stdout + err
    assert f"error: {garbage}: not a decodable image" in err
    assert f"error: {missing}: unreadable: No such file or directory" in err
    assert f"error: {strip}: a 3000x1 px image cannot be brought to the network's input" in err
    lines = stdout.splitlines()
    assert lines[0] == good and len(lines) == 3 and lines[1].rstrip().endswith("%")  # the good one, top 2
    code, stdout, _ = call(predict.main, [out, str(garbage), good, "--json"])
    assert code == 1
    result = json.loads(stdout)
    assert [p["image"] for p in result["predictions"]] == [good]
    assert result["errors"] == [{"image": str(garbage), "error": "not a decodable image"}]


@pytest.mark.parametrize("args, message", [
    (["{missing}", "x.jpg"], "does not exist"),
    (["{model}", "x.jpg", "--top", "0"], "--top 0: must be >= 1"),
])
def test_predict_bad_arguments_exit_2(exported, tmp_path, args, message):
    out, _, _ = exported
    args = [a.format(missing=str(tmp_path / "nowhere"), model=out) for a in args]
    code, _, err = call(predict.main, args)
    assert code == 2 and message in err, err


def test_predict_damaged_model_folder_exits_2(exported, tmp_path):
    out, _, _ = exported
    broken = str(tmp_path / "model")
    shutil.copytree(out, broken)
    with open(os.path.join(broken, "model-0000.params"), "r+b") as f:
        f.truncate(1000)
    code, _, err = call(predict.main, [broken, "x.jpg"])
    assert code == 2 and "cannot be loaded" in err and "export the model again" in err, err


def test_predict_command_imports_no_training_code(exported, shapes_tree):
    """`python -m gluon_imagenet.predict` as typed; the model folder plus MXNet is all it needs: no network
    definition, trainer or gluoncv."""
    out, _, _ = exported
    image, true_class = val_images(shapes_tree)[0]
    code = ("import runpy, sys; sys.argv = ['predict', sys.argv[1], sys.argv[2], '--top', '1']\n"
            "try:\n    runpy.run_module('gluon_imagenet.predict', run_name='__main__')\n"
            "finally:\n    print('modules:', ' '.join(sorted(sys.modules)))")
    proc = run_tool(["-c", code, out, image])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == image and len(lines) == 3
    loaded = set(lines[-1].split()[1:])
    assert {"mxnet", "cv2"} <= loaded  # (run as __main__, predict itself is not listed under its name)
    training = {f"gluon_imagenet.{m}" for m in ("model", "train", "data", "checkpoint", "recipe", "schedule", "dist",
                                                "sweep_eval", "export")} | {"gluoncv"}
    assert not loaded & training
