"""tools/im2rec_multi.py on real files with real MXNet: counts, skips, labels, sizes, resume after SIGKILL."""
import os
import signal
import subprocess
import sys
import time

import cv2
import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_tool
from gluon_imagenet.demo_data import generate, make_image
from gluon_imagenet.pack import read_classes, read_index

BAD = {  # file name -> skipped reason (None: converted and packed)
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated JPEG",
    "notes.txt": "not a decodable image",
    "gray.jpg": None,
    "cmyk.jpg": None,
    "palette.png": None,
    "alpha.png": None,
    "sixteen.png": None,
    "png_named.jpg": None,
}


def add_bad_inputs(folder, rng):
    image = make_image("disc", rng, (90, 120))
    ok, jpeg = cv2.imencode(".jpg", image)
    open(os.path.join(folder, "empty.jpg"), "wb").close()
    with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
        f.write(jpeg.tobytes()[: len(jpeg) // 2])
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image\n")
    rgb = Image.fromarray(image[:, :, ::-1])
    rgb.convert("L").save(os.path.join(folder, "gray.jpg"))
    rgb.convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
    rgb.convert("P").save(os.path.join(folder, "palette.png"))
    rgb.convert("RGBA").save(os.path.join(folder, "alpha.png"))
    cv2.imwrite(os.path.join(folder, "sixteen.png"), image.astype(np.uint16) * 257)
    rgb.save(os.path.join(folder, "png_named.jpg"), format="PNG")


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("messy")
    generate(str(out), train_per_class=6, val_per_class=3, seed=2, classes=("disc", "ring", "star"))
    add_bad_inputs(str(out / "train" / "ring"), np.random.default_rng(3))
    return str(out)


@pytest.fixture(scope="module")
def messy_packed(messy_tree, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("messy_rec"))
    proc = run_tool(["tools/im2rec_multi.py", messy_tree, "--root", root, "--sizes", "32", "56", "--workers", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc.stdout


def lst_labels(path):
    with open(path) as f:
        return {line.split("\t")[2].strip(): float(line.split("\t")[1]) for line in f}


def test_counts_and_skipped_report(messy_packed):
    root, stdout = messy_packed
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith(("train ", "val "))}
    assert rows["train"] == ["27", "24", "3"]  # 3 classes x 6 + 9 odd files; 3 of them unusable
    assert rows["val"] == ["9", "9", "0"]
    with open(os.path.join(root, "train.skipped.tsv")) as f:
        skipped = dict(line.rstrip("\n").split("\t") for line in f.readlines()[1:])
    expected = {f"train/ring/{name}": reason for name, reason in BAD.items() if reason}
    assert set(skipped) == set(expected)
    for path, reason in expected.items():
        assert skipped[path].startswith(reason)


@pytest.mark.parametrize("size", [32, 56])
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_record_decodes_at_its_short_side(messy_packed, size, split):
    root, _ = messy_packed
    folder = os.path.join(root, str(size))
    records = mx.recordio.MXIndexedRecordIO(os.path.join(folder, f"{split}.idx"),
                                            os.path.join(folder, f"{split}.rec"), "r")
    labels = lst_labels(os.path.join(folder, f"{split}.lst"))
    classes = read_classes(root)
    with open(os.path.join(folder, f"{split}.lst")) as f:
        listed = [line.split("\t") for line in f]
    assert len(records.keys) == len(listed) == len(labels)
    for key, (index, label, path) in zip(records.keys, listed):
        header, image = mx.recordio.unpack_img(records.read_idx(key))
        assert image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) == size
        assert header.label == float(label) == labels[path.strip()]
        assert classes[int(header.label)] == path.split("/")[1]  # label is the class folder's index
        assert int(index) == header.id == key


def test_labels_agree_across_sizes(messy_packed):
    root, _ = messy_packed
    for split in ("train", "val"):
        assert lst_labels(os.path.join(root, "32", f"{split}.lst")) == lst_labels(os.path.join(root, "56",
                                                                                                 f"{split}.lst"))
    assert read_classes(root) == ["disc", "ring", "star"]


def test_odd_formats_are_converted(messy_packed):
    root, _ = messy_packed
    packed = lst_labels(os.path.join(root, "32", "train.lst"))
    for name, reason in BAD.items():
        assert (f"train/ring/{name}" in packed) == (reason is None), name


def test_training_list_is_shuffled_with_the_seed(messy_packed, messy_tree, tmp_path):
    root, _ = messy_packed
    with open(os.path.join(root, "32", "train.lst")) as f:
        order = [line.split("\t")[2] for line in f]
    assert order != sorted(order)
    with open(os.path.join(root, "32", "val.lst")) as f:
        val_order = [line.split("\t")[2] for line in f]
    assert val_order == sorted(val_order)
    assert run_tool(["tools/im2rec_multi.py", messy_tree, "--root", str(tmp_path), "--sizes", "32"]).returncode == 0
    with open(tmp_path / "32" / "train.lst") as f:
        assert [line.split("\t")[2] for line in f] == order


def test_image_record_iter_reads_it(messy_packed):
    root, _ = messy_packed
    it = mx.io.ImageRecordIter(path_imgrec=os.path.join(root, "56", "train.rec"),
                               path_imgidx=os.path.join(root, "56", "train.idx"), data_shape=(3, 48, 48),
                               batch_size=8, round_batch=False, preprocess_threads=1)
    seen = sum(8 - batch.pad for batch in it)
    assert seen >= 24  # round_batch=False reports pad=0 on the filled last batch (see STACK.md)
    batch = next(iter(mx.io.ImageRecordIter(path_imgrec=os.path.join(root, "32", "val.rec"),
                                            path_imgidx=os.path.join(root, "32", "val.idx"),
                                            data_shape=(3, 32, 32), batch_size=9, preprocess_threads=1)))
    assert batch.data[0].shape == (9, 3, 32, 32)
    assert sorted(batch.label[0].asnumpy().tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_strict_fails_on_skips_and_rerun_skips_complete_outputs(messy_tree, messy_packed):
    root, _ = messy_packed
    before = os.stat(os.path.join(root, "32", "train.rec")).st_mtime_ns
    proc = run_tool(["tools/im2rec_multi.py", messy_tree, "--root", root, "--sizes", "32", "56", "--strict"])
    assert proc.returncode == 1
    assert "already packed" in proc.stdout and "--strict" in proc.stderr
    assert os.stat(os.path.join(root, "32", "train.rec")).st_mtime_ns == before
    assert run_tool(["tools/im2rec_multi.py", "--verify", "--root", root]).returncode == 0


def test_flat_validation_folder_with_labels_file(tmp_path):
    generate(str(tmp_path / "src"), train_per_class=3, val_per_class=2, seed=4, classes=("disc", "star"))
    flat = tmp_path / "src" / "val"
    lines = []
    for k, cls in enumerate(sorted(os.listdir(flat))):
        for name in sorted(os.listdir(flat / cls)):
            new = f"ILSVRC_val_{len(lines):04d}.JPEG"
            os.rename(flat / cls / name, flat / new)
            lines.append(f"{new} {cls if len(lines) % 2 else k}")  # class names and indices both allowed
        os.rmdir(flat / cls)
    (flat / "extra_without_label.JPEG").write_bytes((flat / "ILSVRC_val_0000.JPEG").read_bytes())
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    proc = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(tmp_path / "rec"), "--sizes",
                     "24", "--val-labels", str(tmp_path / "labels.txt")])
    assert proc.returncode == 0, proc.stderr
    labels = lst_labels(tmp_path / "rec" / "24" / "val.lst")
    assert labels == {"val/ILSVRC_val_0000.JPEG": 0.0, "val/ILSVRC_val_0001.JPEG": 0.0,
                      "val/ILSVRC_val_0002.JPEG": 1.0, "val/ILSVRC_val_0003.JPEG": 1.0}
    assert "val/extra_without_label.JPEG\tno label" in (tmp_path / "rec" / "val.skipped.tsv").read_text()


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a folder"),
    (["{src}", "--sizes"], "--sizes is empty"),
    (["{src}", "--sizes", "160", "0"], "positive"),
    (["{src}", "--sizes", "-5"], "positive"),
    (["{empty}"], "has no class folders"),
    (["{src}", "--root", "/proc/forbidden"], "is not writable"),
    (["{src}", "--pass-through", "--sizes", "40", "80"], "exactly one --sizes"),
    (["{nosplit}"], "val' does not exist"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    generate(str(tmp_path / "src"), train_per_class=1, val_per_class=1, seed=5, classes=("disc",))
    os.makedirs(tmp_path / "empty" / "train")
    generate(str(tmp_path / "nosplit"), train_per_class=1, val_per_class=0, seed=5, classes=("disc",))
    os.rmdir(tmp_path / "nosplit" / "val" / "disc"), os.rmdir(tmp_path / "nosplit" / "val")
    names = {"src": tmp_path / "src", "missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "nosplit": tmp_path / "nosplit"}
    argv = [a.format(**names) for a in args]
    if "--root" not in argv:
        argv += ["--root", str(tmp_path / "out")]
    proc = run_tool(["tools/im2rec_multi.py", *argv])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "40") and not os.path.exists(tmp_path / "out" / "160")


def test_pass_through_keeps_the_bytes(tmp_path):
    generate(str(tmp_path / "src"), train_per_class=2, val_per_class=1, seed=6, classes=("disc", "ring"),
             size=(40, 50))
    proc = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(tmp_path / "rec"),
                     "--sizes", "40", "--pass-through"])
    assert proc.returncode == 0, proc.stderr
    records = mx.recordio.MXIndexedRecordIO(str(tmp_path / "rec/40/train.idx"), str(tmp_path / "rec/40/train.rec"),
                                            "r")
    with open(tmp_path / "rec/40/train.lst") as f:
        for key, line in zip(records.keys, f):
            _, payload = mx.recordio.unpack(records.read_idx(key))
            assert payload == (tmp_path / "src" / line.split("\t")[2].strip()).read_bytes()


@pytest.mark.slow
def test_killed_midway_then_rerun_is_complete_and_correct(tmp_path):
    generate(str(tmp_path / "src"), train_per_class=150, val_per_class=5, seed=7, classes=("disc", "ring", "star"),
             size=(375, 500))
    cmd = [sys.executable, "tools/im2rec_multi.py", str(tmp_path / "src"), "--sizes", "64", "128", "--workers", "1"]
    proc = subprocess.Popen(cmd + ["--root", str(tmp_path / "killed")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed" / "128" / ".train.rec.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 100_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), "the packer was not caught midway"
    assert not (tmp_path / "killed" / "128" / "train.rec").exists()  # nothing that looks complete
    assert run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(tmp_path / "killed")]).returncode == 1

    rerun = subprocess.run(cmd + ["--root", str(tmp_path / "killed")], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    clean = subprocess.run(cmd + ["--root", str(tmp_path / "clean")], cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0
    for size in ("64", "128"):
        for name in ("train.rec", "train.idx", "train.lst", "val.rec"):
            assert (tmp_path / "killed" / size / name).read_bytes() == (tmp_path / "clean" / size / name).read_bytes()
        assert len(read_index(str(tmp_path / "killed" / size / "train.idx"))) == 450
        assert not list((tmp_path / "killed" / size).glob(".*partial"))
