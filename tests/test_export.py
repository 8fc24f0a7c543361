"""Exporting a checkpoint as a model folder, and predicting with it (gluon_imagenet.export, gluon_imagenet.predict)."""
import contextlib
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, TWO_PHASES, run_tool
from gluon_imagenet import checkpoint, predict
from gluon_imagenet.export import choose as export_choose
from gluon_imagenet.export import cli as export_cli
from gluon_imagenet.export import folder as export_folder


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
    code, out, err = call(export_cli.main, ["--run-dir", run_dir, "--best"])
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
    from gluon_imagenet.export.folder import packer_settings

    assert packer_settings(packed_root, "40")["packer_sizes"] == [72, 40]
    assert packer_settings(packed_root, "72")["packer_sizes"] == [72]


def test_packer_chain_of_an_older_pack_json_is_guessed_with_a_warning(packed_root, tmp_path, capsys):
    """pack.json written before the chain was recorded: the larger packs of the root, said so."""
    from gluon_imagenet.export.folder import packer_settings

    for size in ("40", "72"):
        with open(os.path.join(packed_root, size, "pack.json")) as f:
            meta = json.load(f)
        for entry in meta["splits"].values():
            del entry["chain"]
        os.makedirs(tmp_path / size)
        (tmp_path / size / "pack.json").write_text(json.dumps(meta))
    assert packer_settings(str(tmp_path), "40")["packer_sizes"] == [72, 40]
    assert "does not record the sizes" in capsys.readouterr().err


def test_recorded_chain_reproduces_the_packed_pixels_after_packing_other_sizes_later(tmp_path):
    """40 80 packed together, then 40 120 (--force): the 40 px images now come from 120 px ones, not 80. The
    chain export records (pack.json's, not a guess from the root's folders) must give the sweep's exact input."""
    from gluon_imagenet.data import packed
    from gluon_imagenet.data.demo import generate
    from gluon_imagenet.data.iterators import val_iterator
    from gluon_imagenet.export.folder import packer_settings
    from gluon_imagenet.predict import prepare, read_image

    src, root = str(tmp_path / "src"), str(tmp_path / "rec")
    generate(src, train_per_class=1, val_per_class=5, seed=21, classes=("disc", "ring"))
    for sizes in (["40", "80"], ["40", "120", "--force"]):
        proc = run_tool(["tools/im2rec_multi.py", src, "--root", root, "--sizes", *sizes, "--workers", "1"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert packed.resize_chain(root, "40", "val") == [120, 40]
    assert packed.resize_chain(root, "80", "val") == [80]
    prep = dict(packer_settings(root, "40"), crop=32, resize=int(round(32 / 0.875)))
    assert prep["packer_sizes"] == [120, 40]
    with open(os.path.join(root, "40", "val.lst")) as f:
        paths = [line.rstrip("\n").split("\t")[2] for line in f]
    expected = next(iter(val_iterator(root, "40", 32, len(paths), 1))).data[0].asnumpy().astype(np.uint8)
    for i, path in enumerate(paths):
        image, why = read_image(os.path.join(src, path))
        assert not why
        assert np.array_equal(prepare(image, prep), expected[i]), path


@pytest.mark.parametrize("data_dir, crop, crop_fraction", [
    ("72", 64, 0.875),  # the run's evaluation
    ("40", 32, 0.875),  # a smaller pack, resized by the packer from the 72 px image
    ("72", 56, 0.875),
    ("40", 40, 1.0),  # no margin: the resize equals the crop
    ("72", 64, 1.2),  # resize below the crop: ImageRecordIter enlarges once more
])
def test_prepare_matches_image_record_iter_pixel_for_pixel(shapes_tree, packed_root, data_dir, crop, crop_fraction):
    """predict's preprocessing of the original file == the sweep's input from the packed record, exactly."""
    from gluon_imagenet.data.iterators import val_iterator
    from gluon_imagenet.export.folder import packer_settings
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
    code, out, err = call(export_cli.main, args)
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
    code, first, err = call(export_cli.main, ["--run-dir", run_dir, "--checkpoint", step, "--out", out])
    assert code == 0, err
    assert "not evaluated by a sweep" in first
    code, again, err = call(export_cli.main, ["--run-dir", run_dir, "--checkpoint", step, "--out", out])
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
    training = {f"gluon_imagenet.{m}" for m in ("model", "train", "data.iterators", "data.pack", "checkpoint", "recipe",
                                                "schedule", "dist", "sweep_eval", "export")} | {"gluoncv"}
    assert not loaded & training


@pytest.mark.parametrize("sweep_json, problem", [
    ("{not json", "not JSON"),
    ("[]", "expected an object with a 'results' object"),
    ('{"results": {"k": {"checkpoint": "ckpt-00000001"}}}', "result 'k' lacks step"),
    (json.dumps({"results": {"k": {"checkpoint": "ckpt-00000001", "step": "one", "epoch": 1.0, "train_seconds": 1,
                                   "wall_seconds": 1, "image_size": 32, "data_dir": "40", "top1": 0.5, "top5": 0.9,
                                   "images": 70}}}), "result 'k' has step 'one', not a whole number"),
])
def test_a_wrong_shaped_sweep_json_is_one_line(tmp_path, sweep_json, problem):
    # Read by the sweep's own reader (sweep_eval.results.read_results): one line, exit 2, the file left as it is.
    from gluon_imagenet.recipe import recipe_from_dict
    from gluon_imagenet.rundir import PlannedPhase, RunRecord

    run_dir = str(tmp_path)
    RunRecord(recipe=json.loads(json.dumps(recipe_from_dict(TWO_PHASES).to_dict())), classes=["a", "b"],
              phases=[PlannedPhase(0, 45, 15, 32, "40")]).write(run_dir)
    (tmp_path / "sweep.json").write_text(sweep_json)
    code, out, err = call(export_cli.main, ["--run-dir", run_dir, "--best"])
    assert code == 2 and out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sweep.json" in lines[0] and problem in lines[0], err
    assert (tmp_path / "sweep.json").read_text() == sweep_json  # export only reads: nothing moved aside


# ------------------------------------------------------------------------------------------------ the best, data
def rewrite_sweep(run_dir, change):
    path = os.path.join(run_dir, "sweep.json")
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("case", ["tie", "default top-5 target"])
def test_the_sweep_and_export_best_name_the_same_checkpoint(swept_run, tmp_path, capsys, case):
    from gluon_imagenet.sweep_eval.cli import main as sweep_main

    run_dir = str(tmp_path / "run")
    shutil.copytree(swept_run[0], run_dir, ignore=shutil.ignore_patterns("export"))
    scores = {"tie": [(0.5, 0.8), (0.5, 0.8)], "default top-5 target": [(0.6, 0.8), (0.5, 0.9)]}[case]

    def score(data):
        data.pop("ranked_by", None)
        for row, (top1, top5) in zip(sorted(data["results"].values(), key=lambda r: r["step"]), scores):
            row.update(top1=top1, top5=top5)

    rewrite_sweep(run_dir, score)
    target = ["--target-top1", "0.99"] if case == "tie" else []  # else the default target: top-5 >= 93%
    assert sweep_main(["--run-dir", run_dir, "--batch-size", "32", *target]) == 0  # reports, evaluates nothing
    said = capsys.readouterr().out
    named = said.split("the best is ")[1].split()[0]
    code, out, err = call(export_cli.main, ["--run-dir", run_dir, "--best", "--out", str(tmp_path / "model")])
    assert code == 0, err
    with open(tmp_path / "model" / "provenance.json") as f:
        assert json.load(f)["checkpoint"] == named
    steps = sorted(json.load(open(os.path.join(run_dir, "sweep.json")))["results"].values(), key=lambda r: r["step"])
    assert named == steps[0 if case == "tie" else 1]["checkpoint"]  # the earlier step wins a tie


def test_export_best_ranks_only_results_on_the_runs_data_of_existing_checkpoints(swept_run, packed_root, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(swept_run[0], run_dir, ignore=shutil.ignore_patterns("export"))
    rows = sorted(swept_run[1], key=lambda r: r["step"])

    def add_others(data):
        # The older checkpoint scored perfectly on other data, and a deleted checkpoint scored perfectly: neither
        # is this run's result on its own data.
        data["results"]["elsewhere"] = dict(rows[0], data_root="/elsewhere/recordio", top1=1.0, top5=1.0)
        data["results"]["gone"] = dict(rows[0], checkpoint="ckpt-00000999", step=999, top1=1.0, top5=1.0)
        data["results"][next(k for k, r in data["results"].items() if r["step"] == rows[0]["step"])].update(
            top1=0.0, top5=0.0)
        data["ranked_by"] = "top1"

    rewrite_sweep(run_dir, add_others)
    code, out, err = call(export_cli.main, ["--run-dir", run_dir, "--best", "--out", str(tmp_path / "model")])
    assert code == 0, err
    assert "on other data roots (/elsewhere/recordio)" in err and "no longer in" in err and "ckpt-00000999" in err
    with open(tmp_path / "model" / "provenance.json") as f:
        prov = json.load(f)
    assert prov["checkpoint"] == rows[1]["checkpoint"]
    root = os.path.abspath(packed_root)
    assert prov["data_root"] == prov["sweep_accuracy"]["data_root"] == root
    assert prov["data_identity"] == prov["sweep_accuracy"]["data_identity"] == rows[1]["data_id"]
    assert prov["sweep_accuracy"]["top5_meaningful"] is True


# ------------------------------------------------------------------------------------------------ retention
def test_export_takes_the_newest_epoch_checkpoint_and_reports_a_pruned_one(single_run, tmp_path):
    """Retention deletes mid-epoch checkpoints while the trainer runs: by default export takes the newest epoch
    checkpoint (never pruned); a checkpoint deleted between choosing and reading it is said to be pruned."""
    run_dir = str(tmp_path / "run")
    newest = copy_run(single_run[1], run_dir, last=1)[0]
    mid = "ckpt-00000106"  # a mid-epoch checkpoint newer than the last epoch one
    for ext in (".params", ".states"):
        shutil.copy(os.path.join(run_dir, newest + ext), os.path.join(run_dir, mid + ext))
    with open(os.path.join(run_dir, newest + ".json")) as f:
        record = json.load(f)
    with open(os.path.join(run_dir, mid + ".json"), "w") as f:
        json.dump(dict(record, step=106, epoch=5.25), f)
    code, out, err = call(export_cli.main, ["--run-dir", run_dir, "--out", str(tmp_path / "model")])
    assert code == 0, err
    assert f"{newest} (step" in out and f"newer mid-epoch ones ({mid}) only when named" in out
    ckpt = export_choose.verified(run_dir, mid)
    os.remove(os.path.join(run_dir, mid + ".json"))  # retention: the record first, then the files
    with pytest.raises(export_choose.ExportError, match=f"{mid} was pruned by the trainer's retention"):
        export_choose.verified(run_dir, mid)
    os.remove(os.path.join(run_dir, mid + ".params"))
    run = export_choose.read_run(run_dir)
    with pytest.raises(export_choose.ExportError, match=f"{mid} was pruned by the trainer's retention"):
        export_folder.write_folder(str(tmp_path), run, ckpt, 32, {}, {})


# ------------------------------------------------------------------------------------------------ model.json
def test_model_json_records_the_output_count_and_the_parameters_checksum(exported):
    out, _, _ = exported
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["outputs"] == len(meta["classes"]) == 10
    assert meta["params_sha256"] == checkpoint.sha256_of(os.path.join(out, "model-0000.params"))


def edit_meta(folder, change):
    path = os.path.join(folder, "model.json")
    with open(path) as f:
        meta = json.load(f)
    meta = change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def drop(meta, *keys):
    for key in keys:
        meta.pop(key)
    return meta


@pytest.mark.parametrize("case, message", [
    ("fewer classes than outputs", "lists 9 classes for the network's 10 outputs"),
    ("fewer classes, old folder", "model.json lists 9 classes for the network's 10 outputs"),
    ("no classes", "has no 'classes'"),
    ("a list", "holds a list, not an object"),
    ("no class names", "lists no classes"),
    ("more names than outputs", "model.json lists 12 classes for the network's 10 outputs"),
    ("another run's parameters", "is not the parameters file exported with its model.json"),
])
def test_predict_refuses_a_model_folder_that_disagrees_with_its_network(exported, shapes_tree, tmp_path, case, message):
    out, _, _ = exported
    folder = str(tmp_path / "model")
    shutil.copytree(out, folder)
    change = {
        "fewer classes than outputs": lambda m: dict(m, classes=m["classes"][:-1]),
        "fewer classes, old folder": lambda m: drop(dict(m, classes=m["classes"][:-1]), "outputs", "params_sha256"),
        "no classes": lambda m: drop(m, "classes"),
        "a list": lambda m: [m],
        "no class names": lambda m: dict(m, classes=[]),
        "more names than outputs": lambda m: drop(dict(m, classes=m["classes"] + ["x", "y"]), "outputs"),
        "another run's parameters": lambda m: m,
    }[case]
    edit_meta(folder, change)
    if case == "another run's parameters":  # the same network (same parameter names and shapes), other values
        import mxnet as mx

        params = os.path.join(folder, "model-0000.params")
        mx.nd.save(params, {k: v * 0.5 for k, v in mx.nd.load(params).items()})
    image = val_images(shapes_tree)[0][0]
    for extra in ([], ["--json"]):
        code, stdout, err = call(predict.main, [folder, image, *extra])
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert stdout == ""


def test_predict_warns_about_an_old_model_folder_and_goes_on(exported, shapes_tree, tmp_path):
    out, _, _ = exported
    folder = str(tmp_path / "model")
    shutil.copytree(out, folder)
    edit_meta(folder, lambda m: drop(m, "outputs", "params_sha256"))
    code, stdout, err = call(predict.main, [folder, val_images(shapes_tree)[0][0], "--top", "1"])
    assert code == 0, err
    assert "records no outputs and no params_sha256 (exported by an older version)" in err
    assert len(stdout.splitlines()) == 2


@pytest.mark.parametrize("mount", ["ro", "size=64k"])
def test_export_into_a_read_only_or_full_folder_is_one_line(swept_run, tmp_path, mount):
    """A real read-only / full file system (tmpfs in a private mount namespace): needs root, as on these machines."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private mount")
    run_dir, _ = swept_run
    target = tmp_path / "mnt"
    target.mkdir()
    script = (f"mount -t tmpfs -o {mount} tmpfs {target} && {{ {shlex.quote(sys.executable)} -m gluon_imagenet.export "
              f"--run-dir {shlex.quote(run_dir)} --out {target}/model; echo code=$?; ls -A {target}; }}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "code=2", proc.stdout + proc.stderr  # and nothing left behind
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write the model folder"), proc.stderr
    assert "Traceback" not in proc.stderr
