"""ONNX export checked by onnxruntime (export --onnx) and prediction through it (predict --runtime onnx)."""
import json
import os
import re

import onnx
import pytest
from test_export import call, copy_run, swept_run, val_images  # noqa: F401  (swept_run: a fixture)

from conftest import run_tool
from gluon_imagenet import predict
from gluon_imagenet.export import cli as export_cli
from gluon_imagenet.export.onnx_export import OPSET, TOLERANCE


@pytest.fixture(scope="module")
def onnx_exported(swept_run, tmp_path_factory):  # noqa: F811
    run_dir, rows = swept_run
    out = str(tmp_path_factory.mktemp("onnx") / "model")
    code, stdout, err = call(export_cli.main, ["--run-dir", run_dir, "--best", "--onnx", "--out", out])
    assert code == 0, stdout + err
    best = max(rows, key=lambda r: (r["top1"], r["top5"], r["step"]))
    return out, best, stdout


def test_onnx_model_has_uint8_dynamic_input_and_constant_statistics(onnx_exported):
    out, best, stdout = onnx_exported
    assert f"opset {OPSET}, dynamic batch" in stdout and "--runtime onnx" in stdout
    model = onnx.load(os.path.join(out, "model.onnx"))
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    (data,) = model.graph.input  # the image batch only: no parameter can be fed in
    dims = [d.dim_param or d.dim_value for d in data.type.tensor_type.shape.dim]
    size = best["image_size"]
    assert data.name == "data" and data.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", 3, size, size]
    constants = {i.name for i in model.graph.initializer}
    statistics = {n for n in constants if n.endswith(("running_mean", "running_var"))}
    assert len(statistics) == 2 * 20  # ResNet-18 v1b: 20 BatchNorm layers, each as constants
    # The normalisation is inside the graph. Gluon numbers its blocks' prefixes per process (classifier0,
    # classifier1, ... for each network built before the export), so the names are matched by pattern.
    assert any(re.fullmatch(r"classifier\d+_mean", n) for n in constants), sorted(constants)[:10]
    assert any(re.fullmatch(r"classifier\d+_std", n) for n in constants), sorted(constants)[:10]
    with open(os.path.join(out, "model.json")) as f:
        entry = json.load(f)["onnx"]
    assert (entry["file"], entry["opset"], entry["checked"]["batches"]) == ("model.onnx", OPSET, [2, 3])
    assert entry["checked"]["max_difference"] <= TOLERANCE * 100


def test_onnx_predictions_agree_with_the_sweep_and_with_mxnet(onnx_exported, shapes_tree):
    """onnxruntime on the validation images, with predict's preprocessing: the sweep's top-1 count exactly, and
    the MXNet runtime's classes and probabilities."""
    out, best, _ = onnx_exported
    images = val_images(shapes_tree)
    paths = [p for p, _ in images]
    code, stdout, err = call(predict.main, [out, *paths, "--json", "--top", "1", "--runtime", "onnx"])
    assert code == 0, err
    by_onnx = json.loads(stdout)["predictions"]
    assert len(by_onnx) == best["images"]
    truth = dict(images)
    assert sum(p["top"][0]["class"] == truth[p["image"]] for p in by_onnx) == round(best["top1"] * best["images"])
    code, stdout, err = call(predict.main, [out, *paths, "--json", "--top", "1"])
    assert code == 0, err
    by_mxnet = json.loads(stdout)["predictions"]
    assert [p["top"][0]["class"] for p in by_onnx] == [p["top"][0]["class"] for p in by_mxnet]
    assert [p["top"][0]["probability"] for p in by_onnx] == pytest.approx(
        [p["top"][0]["probability"] for p in by_mxnet], abs=1e-4)


def test_runtime_onnx_on_a_folder_without_onnx_exits_2(single_run, tmp_path):
    run_dir = str(tmp_path / "run")
    copy_run(single_run[1], run_dir, last=1)
    out = str(tmp_path / "model")
    code, _, err = call(export_cli.main, ["--run-dir", run_dir, "--out", out])
    assert code == 0, err
    code, _, err = call(predict.main, [out, "x.jpg", "--runtime", "onnx"])
    assert code == 2 and "holds no ONNX model: export it again with --onnx" in err, err


def test_export_onnx_without_onnxruntime_exits_2_before_writing(single_run, tmp_path):
    """onnxruntime hidden (a package on PYTHONPATH whose import fails, as a missing one does)."""
    hidden = tmp_path / "hidden" / "onnxruntime"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'onnxruntime'\")\n")
    run_dir = str(tmp_path / "run")
    copy_run(single_run[1], run_dir, last=1)
    proc = run_tool(["-m", "gluon_imagenet.export", "--run-dir", run_dir, "--onnx"],
                    env=dict(os.environ, PYTHONPATH=str(tmp_path / "hidden")))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --onnx: onnxruntime is not installed") and "Traceback" not in proc.stderr
    assert "pip install --no-deps onnxruntime==1.16.3" in proc.stderr
    assert not os.path.exists(os.path.join(run_dir, "export"))


def test_runtime_onnx_without_onnxruntime_exits_2_naming_the_install(onnx_exported, shapes_tree, tmp_path):
    out, _, _ = onnx_exported
    hidden = tmp_path / "hidden" / "onnxruntime"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'onnxruntime'\")\n")
    image = val_images(shapes_tree)[0][0]
    proc = run_tool(["-m", "gluon_imagenet.predict", out, image, "--runtime", "onnx"],
                    env=dict(os.environ, PYTHONPATH=str(tmp_path / "hidden")))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --runtime onnx: onnxruntime is not installed")
    assert "Traceback" not in proc.stderr
    assert "pip install --no-deps onnxruntime==1.16.3" in proc.stderr and proc.stdout == ""
