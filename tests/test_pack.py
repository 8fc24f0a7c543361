"""tools/im2rec_multi.py on real files with real MXNet: counts, skips, labels, sizes, resume after SIGKILL; damaged
outputs found and packed again; one packer per data root; exact labels files; hostile files skipped, never fatal."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import cv2
import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_tool
from gluon_imagenet.data import convert as pack_convert
from gluon_imagenet.data import listing as pack_listing
from gluon_imagenet.data import pack
from gluon_imagenet.data.demo import generate, make_image
from gluon_imagenet.data.pack import read_skipped
from gluon_imagenet.data.packed import check_packed_split, read_classes, read_index, read_meta
from gluon_imagenet.data.verify import verify_split
from gluon_imagenet.train import cli as train_cli

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


def test_the_packer_writes_where_the_trainer_reads_by_default():
    """One default data root (packed.DEFAULT_DATA_ROOT) for `im2rec_multi.py SRC` and `train` without --data-root."""
    from gluon_imagenet.data import packed

    assert pack.parse_args(["src"]).root == packed.DEFAULT_DATA_ROOT == "recordio"
    assert train_cli.parse_args(["--recipe", "r.yaml", "--run-dir", "run"]).data_root == packed.DEFAULT_DATA_ROOT


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


# ---------------------------------------------------------------------------------------------- damaged outputs
@pytest.fixture(scope="module")
def small_packed(tmp_path_factory):
    """A small tree packed once at 40 px; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("small")
    generate(str(out / "src"), train_per_class=8, val_per_class=2, seed=8, classes=("disc", "ring"))
    proc = run_tool(["tools/im2rec_multi.py", str(out / "src"), "--root", str(out / "rec"), "--sizes", "40"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(out / "src"), str(out / "rec")


def cut_tail(path, nbytes=500):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - nbytes)


def test_truncated_rec_fails_verify_and_rerun_packs_it_again(small_packed, tmp_path):
    src, packed = small_packed
    root = tmp_path / "rec"
    shutil.copytree(packed, root)
    good = {name: (root / "40" / name).read_bytes() for name in ("train.rec", "train.idx", "train.lst")}
    cut_tail(root / "40" / "train.rec")
    proc = run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(root)])
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    assert "train.rec: record" in proc.stderr and "cut short" in proc.stderr
    assert check_packed_split(str(root / "40"), "train")
    rerun = run_tool(["tools/im2rec_multi.py", src, "--root", str(root), "--sizes", "40"])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "train at 40: packed before but damaged" in rerun.stdout and "val at 40: already packed" in rerun.stdout
    assert {name: (root / "40" / name).read_bytes() for name in good} == good  # packed again, the same bytes
    assert run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(root)]).returncode == 0
    assert check_packed_split(str(root / "40"), "train") == []


def _cut_500(folder):
    cut_tail(os.path.join(folder, "train.rec"))


def _cut_to_half(folder):
    cut_tail(os.path.join(folder, "train.rec"), os.path.getsize(os.path.join(folder, "train.rec")) // 2)


def _append_bytes(folder):
    with open(os.path.join(folder, "train.rec"), "ab") as f:
        f.write(b"\0" * 8)


def _drop_idx_line(folder):
    path = os.path.join(folder, "train.idx")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:-1])


def _garble_idx(folder):
    with open(os.path.join(folder, "train.idx"), "a") as f:
        f.write("7\t12x\n")


def _break_middle_magic(folder):
    offset = read_index(os.path.join(folder, "train.idx"))[5][1]
    with open(os.path.join(folder, "train.rec"), "r+b") as f:
        f.seek(offset)
        f.write(b"\0\0\0\0")


def _forget_in_pack_json(folder):
    with open(os.path.join(folder, "pack.json")) as f:
        meta = json.load(f)
    del meta["splits"]["train"]
    with open(os.path.join(folder, "pack.json"), "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("damage, verify_says, cheap_says", [
    (_cut_500, "cut short", "cut short"),
    (_cut_to_half, "cut short", "cut short"),
    (_append_bytes, "8 bytes after the last record", "8 bytes after the last record"),
    (_drop_idx_line, "pack.json says 16", "pack.json says 16"),
    (_garble_idx, "unreadable index", "unreadable index"),
    (_break_middle_magic, "no RecordIO magic number", None),  # the cheap check reads only the first and last
    (_forget_in_pack_json, None, "does not list train as packed"),  # verify checks what pack.json lists
])
def test_damage_found_by_verify_and_by_the_cheap_check(small_packed, tmp_path, damage, verify_says, cheap_says):
    _, packed = small_packed
    shutil.copytree(packed, tmp_path / "rec")
    folder = str(tmp_path / "rec" / "40")
    assert check_packed_split(folder, "train") == []
    damage(folder)
    entry = read_meta(folder).get("splits", {}).get("train")
    problems = verify_split(folder, "train", entry, 2) if entry else []
    assert bool(problems) == (verify_says is not None), problems
    if verify_says:
        assert verify_says in problems[0]
    cheap = check_packed_split(folder, "train")
    assert bool(cheap) == (cheap_says is not None), cheap
    if cheap_says:
        assert cheap_says in cheap[0] and "im2rec_multi.py" in cheap[0]
    assert check_packed_split(folder, "val") == []


def test_records_split_by_the_writer_verify(tmp_path):
    # dmlc's writer splits a record where its payload holds the magic number at a 4-byte boundary: such a
    # record has several parts, and must pass both checks (and fail them once cut).
    magic = struct.pack("<I", 0xCED7230A)
    folder = tmp_path / "40"
    folder.mkdir()
    writer = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    payloads = [b"abcd" + magic + b"efghij", magic * 3 + b"x", b"plain"]
    for key, payload in enumerate(payloads):
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, 1.0, key, 0), payload))
    writer.close()
    # The writer did split, 4 times: each split drops the magic number from the data and adds a part header.
    assert os.path.getsize(folder / "train.rec") == sum(8 + (24 + len(p) + 3) // 4 * 4 for p in payloads) + 4 * 4
    (folder / "pack.json").write_text(json.dumps({"splits": {"train": {"packed": 3}}}))
    assert verify_split(str(folder), "train", {"packed": 3}, 2) == []
    assert check_packed_split(str(folder), "train") == []
    reader = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "r")
    assert [mx.recordio.unpack(reader.read_idx(k))[1] for k in range(3)] == payloads
    reader.close()
    writer = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    for key, payload in enumerate([payloads[2], payloads[1]]):  # now the last record is a split one
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, 1.0, key, 0), payload))
    writer.close()
    assert verify_split(str(folder), "train", {"packed": 2}, 2) == []
    (folder / "pack.json").write_text(json.dumps({"splits": {"train": {"packed": 2}}}))
    assert check_packed_split(str(folder), "train") == []
    cut_tail(folder / "train.rec", 4)
    assert "cut short" in check_packed_split(str(folder), "train")[0]
    assert "cut short" in verify_split(str(folder), "train", {"packed": 2}, 2)[0]


# ---------------------------------------------------------------------------------------------- one packer per root
def lock_info(path):
    """The lock file's content, read without locking (a probe lock could make the packer think it busy)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_second_packer_on_a_root_exits_naming_the_first(tmp_path):
    # Enough images that the first packer is still at work while the other two run: 8 generated per class
    # (generating is the slow part), each copied under 18 more names.
    generate(str(tmp_path / "src"), train_per_class=8, val_per_class=2, seed=9, classes=("disc", "ring", "star"),
             size=(375, 500))
    for folder in (tmp_path / "src" / "train").iterdir():
        for image in list(folder.iterdir()):
            for copy in range(18):
                shutil.copyfile(image, folder / f"copy{copy}_{image.name}")
    root = tmp_path / "rec"
    first = subprocess.Popen([sys.executable, "tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(root),
                              "--sizes", "64", "128", "--workers", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while (time.time() < deadline and first.poll() is None
               and (lock_info(root / ".pack.lock") or {}).get("pid") != first.pid):
            time.sleep(0.05)
        assert (lock_info(root / ".pack.lock") or {}).get("pid") == first.pid, "the first packer never took the lock"
        # Paused while it holds the lock (a stopped process keeps its flock): the packer is fast enough to finish
        # before a second interpreter has started, so without the pause the test would race it.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(root), "--sizes", "64",
                               "--quality", "50", "--workers", "1"])
            still_running = first.poll() is None
            verify = run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(root)])  # takes no lock
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert still_running, "the first packer ended before the second one was tried"
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is in use by pid {first.pid} on " in second.stderr and "im2rec_multi.py" in second.stderr
    assert "packing" not in second.stdout
    # --verify takes no lock: it reports what it finds (the paused packer may not have written classes.txt yet).
    assert "in use" not in verify.stderr
    assert (verify.returncode in (0, 1) and "verify" in verify.stdout) or \
        "not a data root packed by im2rec_multi" in verify.stderr, verify.stdout + verify.stderr
    assert first.returncode == 0, out + err
    assert "problem" not in err
    for size in ("64", "128"):
        assert len(read_index(str(root / size / "train.idx"))) == 3 * 8 * 19
        assert read_meta(str(root / size))["quality"] == 90
        assert check_packed_split(str(root / size), "train") == []
    assert run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(root)]).returncode == 0
    again = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(root), "--sizes", "64"])
    assert again.returncode == 0 and "already packed" in again.stdout  # the lock is free once its holder is gone


# ---------------------------------------------------------------------------------------------- validation labels
@pytest.fixture
def flat_val(tmp_path):
    """A tree whose val/ is flat (v0.jpg..v3.jpg, classes disc disc star star) and the matching labels lines."""
    generate(str(tmp_path / "src"), train_per_class=2, val_per_class=2, seed=10, classes=("disc", "star"))
    val = tmp_path / "src" / "val"
    lines = []
    for cls in ("disc", "star"):
        for name in sorted(os.listdir(val / cls)):
            os.rename(val / cls / name, val / f"v{len(lines)}.jpg")
            lines.append(f"v{len(lines)}.jpg {cls}")
        os.rmdir(val / cls)
    return tmp_path, lines


def pack_flat(tmp_path, text):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(tmp_path / "rec"), "--sizes", "24",
                     "--splits", "val", "--val-labels", str(labels)])


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines + ["v0.jpg star"], "labels.txt:5: 'v0.jpg' is labelled 'star' (star) here but 'disc' on "
                                            "line 1"),
    (lambda lines: lines + ["v2.jpg 0"], "labels.txt:5: 'v2.jpg' is labelled '0' (disc) here but 'star' on line 3"),
    (lambda lines: lines[:2] + ["gone.jpg disc"] + lines[2:], "labels.txt:3: 'gone.jpg' is not a file in"),
    (lambda lines: lines + ["a.jpg disc", "b.jpg star"], "labels.txt:5: 'a.jpg' is not a file in"),
])
def test_labels_file_contradictions_are_refused_before_any_work(flat_val, edit, message):
    tmp_path, lines = flat_val
    proc = pack_flat(tmp_path, "\n".join(edit(lines)) + "\n")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "rec" / "24").exists()


@pytest.mark.parametrize("text", [
    "\ufeff{all}\n",  # a byte-order mark from a Windows editor
    "{all}\nv0.jpg disc\nv3.jpg 1\n",  # a repeated file name with the same label (by name or by index): accepted
    "{all_crlf}\r\n",
])
def test_labels_file_read_exactly(flat_val, text):
    # The listing alone (the packing of a flat val/ is test_flat_validation_folder_with_labels_file's).
    tmp_path, lines = flat_val
    labels = tmp_path / "labels.txt"
    labels.write_text(text.format(all="\n".join(lines), all_crlf="\r\n".join(lines)), encoding="utf-8", newline="")
    items = pack_listing.list_split(str(tmp_path / "src"), "val", ["disc", "star"], str(labels))
    assert [(i.path, i.label) for i in items] == [("val/v0.jpg", 0), ("val/v1.jpg", 0), ("val/v2.jpg", 1),
                                                   ("val/v3.jpg", 1)]


def test_labels_file_not_utf8_is_refused(flat_val):
    tmp_path, lines = flat_val
    proc = pack_flat(tmp_path, ("\n".join(lines) + "\ncaf\xe9.jpg disc\n").encode("latin-1"))
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr


# ---------------------------------------------------------------------------------------------- hostile files
def write_png_claiming(path, width, height):
    """A valid 1x1 PNG whose header claims width x height (CRC fixed): decoding it would need that memory."""
    ok, png = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with open(path, "wb") as f:
        f.write(bytes(data))


HOSTILE = {  # file in train/disc -> skipped reason (None: packed)
    "link_to_good.jpg": None,
    "back\\slash.jpg": None,
    "dangling.jpg": "dangling symbolic link (to 'nowhere.jpg')",
    "loop.jpg": "symbolic link loop",
    "wide.png": "30000x20 px: resized to short side 160 it would be 240000x160 px",  # fine at 24: 36000x24
    "new\nline.jpg": "file name holds a tab or line break",
    "tab\there.jpg": "file name holds a tab or line break",
    "carriage\rreturn.jpg": "file name holds a tab or line break",
    os.fsdecode(b"caf\xe9.jpg"): "file name is not valid UTF-8",
    "bomb.png": "too large to decode safely",
}


@pytest.fixture(scope="module")
def hostile_packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    generate(str(out / "src"), train_per_class=3, val_per_class=1, seed=11, classes=("disc", "ring"))
    disc = out / "src" / "train" / "disc"
    image = make_image("disc", np.random.default_rng(12), (60, 80))
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    for name in HOSTILE:
        path = os.path.join(str(disc), name)
        if name == "link_to_good.jpg":
            os.symlink(os.path.join("..", "ring", sorted(os.listdir(out / "src" / "train" / "ring"))[0]), path)
        elif name == "dangling.jpg":
            os.symlink("nowhere.jpg", path)
        elif name == "loop.jpg":
            os.symlink("loop.jpg", path)
        elif name == "wide.png":
            cv2.imwrite(path, cv2.resize(image, (30000, 20)))
        elif name == "bomb.png":
            write_png_claiming(path, 100_000, 100_000)
        else:
            with open(path, "wb") as f:
                f.write(jpeg)
    root = out / "rec"
    proc = run_tool(["tools/im2rec_multi.py", str(out / "src"), "--root", str(root), "--sizes", "24", "160",
                     "--workers", "2"])
    return root, proc


def test_no_single_file_stops_the_pack(hostile_packed):
    root, proc = hostile_packed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("train ")}
    assert rows["train"] == ["16", "8", "8"]  # 2 classes x 3 + 10 hostile files, 2 of which pack


def test_hostile_files_are_skipped_with_their_reason(hostile_packed):
    root, _ = hostile_packed
    skipped = dict(read_skipped(root / "train.skipped.tsv"))
    expected = {f"train/disc/{name}": reason for name, reason in HOSTILE.items() if reason}
    expected = {path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"): reason
                for path, reason in expected.items()}  # bytes that are not UTF-8 are written as \xNN
    assert set(skipped) == set(expected)
    for path, reason in expected.items():
        assert skipped[path].startswith(reason), (path, skipped[path])
    assert "beyond JPEG's limit of 65500 px per side" in skipped["train/disc/wide.png"]
    with open(root / "train.skipped.tsv", "rb") as f:
        raw = f.read()
    assert raw.count(b"\n") == 1 + len(expected) and b"\r" not in raw  # one line per file, whatever its name
    assert b"train/disc/new\\nline.jpg\t" in raw and b"train/disc/tab\\there.jpg\t" in raw
    assert b"train/disc/caf\\xe9.jpg\t" in raw


def test_symlink_to_an_image_and_odd_but_legal_names_pack(hostile_packed):
    root, _ = hostile_packed
    for size in ("24", "160"):
        packed = lst_labels(root / size / "train.lst")
        assert "train/disc/link_to_good.jpg" in packed and "train/disc/back\\slash.jpg" in packed
        assert len(packed) == 8
        assert check_packed_split(str(root / size), "train") == []


@pytest.mark.parametrize("bad_name", ["new\nline", "tab\there", "carriage\rreturn"])
def test_class_folder_name_that_breaks_lines_is_refused(tmp_path, bad_name):
    generate(str(tmp_path / "src"), train_per_class=1, val_per_class=1, seed=13, classes=("disc", "ring"))
    os.rename(tmp_path / "src" / "train" / "ring", tmp_path / "src" / "train" / bad_name)
    os.rename(tmp_path / "src" / "val" / "ring", tmp_path / "src" / "val" / bad_name)
    proc = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", str(tmp_path / "rec"), "--sizes",
                     "24"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"class folder {str(tmp_path / 'src' / 'train' / bad_name)!r} has a tab or line break" in proc.stderr
    assert not (tmp_path / "rec" / "classes.txt").exists() and not (tmp_path / "rec" / "24").exists()


@pytest.mark.parametrize("lift, reason", [
    ("JPEG_MAX_SIDE", "failed to convert: RuntimeError: JPEG encoding failed"),  # OpenCV's own refusal
    ("MAX_PIXELS", "failed to convert: error: OpenCV"),  # cv2.error from imdecode's own size limit
])
def test_opencv_failures_skip_the_image_when_checks_ahead_are_lifted(tmp_path, monkeypatch, lift, reason):
    # The up-front checks decide most cases; what is left to OpenCV must still only skip the one image.
    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((20, 30000, 3), np.uint8))
    write_png_claiming(str(tmp_path / "bomb.png"), 40_000, 40_000)
    monkeypatch.setattr(pack_convert, lift, 10 ** 12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # and Pillow's own bomb check, which is ahead too
    name = {"JPEG_MAX_SIDE": "wide.png", "MAX_PIXELS": "bomb.png"}[lift]
    monkeypatch.setattr(pack_convert, "_settings", pack_convert.Settings(str(tmp_path), (160,), 90, False))
    payloads, why = pack_convert.encode_item(pack_listing.Item(name, 0))
    assert payloads is None and why.startswith(reason), why
    assert "\n" not in why


# ---------------------------------------------------------------------------------------------- data identity
def pack_json_split(root, size, split):
    return read_meta(os.path.join(root, str(size)))["splits"][split]


def val_payloads(root, size):
    records = mx.recordio.MXIndexedRecordIO(os.path.join(root, str(size), "val.idx"),
                                            os.path.join(root, str(size), "val.rec"), "r")
    try:
        return [mx.recordio.unpack(records.read_idx(key))[1] for key in records.keys]
    finally:
        records.close()


@pytest.mark.parametrize("force", [False, True])
def test_source_replaced_under_the_same_name_is_packed_again(tmp_path, force):
    from gluon_imagenet.data import packed

    src, root = tmp_path / "src", str(tmp_path / "rec")
    generate(str(src), train_per_class=3, val_per_class=2, seed=11, classes=("disc", "ring"), size=(48, 60))
    cmd = ["tools/im2rec_multi.py", str(src), "--root", root, "--sizes", "40"]
    assert run_tool(cmd).returncode == 0
    entry = pack_json_split(root, 40, "val")
    with open(os.path.join(root, "40", "val.rec"), "rb") as f:
        assert entry["digest"] == hashlib.sha256(f.read()).hexdigest()  # the bytes as written
    identity, payloads = packed.data_identity(root, "40", "val"), val_payloads(root, 40)
    # Other images under the very same names (another seed draws other shapes).
    generate(str(tmp_path / "other"), train_per_class=0, val_per_class=2, seed=12, classes=("disc", "ring"),
             size=(48, 60))
    for cls in ("disc", "ring"):
        for name in os.listdir(src / "val" / cls):
            shutil.copyfile(tmp_path / "other" / "val" / cls / name, src / "val" / cls / name)
    proc = run_tool(cmd + (["--force"] if force else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val at 40: already packed" not in proc.stdout
    if not force:
        assert "train at 40: already packed" in proc.stdout  # only what changed is packed again
    assert pack_json_split(root, 40, "val")["digest"] != entry["digest"]
    assert val_payloads(root, 40) != payloads
    assert packed.data_identity(root, "40", "val") != identity


def test_digest_is_of_the_bytes_mxnet_writes(tmp_path):
    """The packer writes the .rec itself (to hash it as it goes): byte for byte what MXNet's writer writes,
    including records it splits where the payload holds the magic number at a 4-byte boundary."""
    from gluon_imagenet.data.recordio import IndexedRecordWriter, image_record

    magic = struct.pack("<I", 0xCED7230A)
    rng = np.random.default_rng(13)
    payloads = [b"abcd" + magic + b"efghij", magic * 3 + b"x", b"", magic, b"a" + magic + b"bcd" + magic]
    for _ in range(100):
        chunks = [rng.bytes(int(rng.integers(0, 12))) for _ in range(int(rng.integers(1, 4)))]
        payloads.append(magic.join(chunks))
    theirs = mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "w")
    ours = IndexedRecordWriter(str(tmp_path / "b.idx"), str(tmp_path / "b.rec"))
    for key, payload in enumerate(payloads):
        theirs.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(key % 5), key, 0), payload))
        ours.write_idx(key, image_record(float(key % 5), key, payload))
    theirs.close()
    ours.close()
    assert (tmp_path / "b.rec").read_bytes() == (tmp_path / "a.rec").read_bytes()
    assert (tmp_path / "b.idx").read_text() == (tmp_path / "a.idx").read_text()
    assert ours.digest() == hashlib.sha256((tmp_path / "a.rec").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- refusals and skips
def test_pass_through_skips_images_of_another_short_side(tmp_path):
    src = tmp_path / "src"
    generate(str(src), train_per_class=2, val_per_class=1, seed=14, classes=("disc", "ring"), size=(40, 50))
    cv2.imwrite(str(src / "train" / "disc" / "large.jpg"), make_image("disc", np.random.default_rng(1), (60, 80)))
    cv2.imwrite(str(src / "train" / "ring" / "small.jpg"), make_image("ring", np.random.default_rng(2), (30, 20)))
    cmd = ["tools/im2rec_multi.py", str(src), "--root", str(tmp_path / "rec"), "--sizes", "40", "--pass-through"]
    proc = run_tool(cmd)
    assert proc.returncode == 0, proc.stderr
    skipped = dict(read_skipped(str(tmp_path / "rec" / "train.skipped.tsv")))
    assert set(skipped) == {"train/disc/large.jpg", "train/ring/small.jpg"}
    assert "short side 60, not the 40" in skipped["train/disc/large.jpg"]
    assert "short side 20, not the 40" in skipped["train/ring/small.jpg"]
    assert pack_json_split(str(tmp_path / "rec"), 40, "train")["packed"] == 4
    strict = run_tool(cmd + ["--strict", "--force"])
    assert strict.returncode == 1 and "--strict" in strict.stderr


def test_files_outside_class_folders_are_listed_as_skipped(tmp_path):
    src = tmp_path / "src"
    generate(str(src), train_per_class=2, val_per_class=1, seed=15, classes=("disc", "ring"))
    shutil.copyfile(src / "train" / "disc" / "disc_00000.jpg", src / "train" / "stray.jpg")
    shutil.copyfile(src / "val" / "ring" / "ring_00000.jpg", src / "val" / "stray.jpg")
    cmd = ["tools/im2rec_multi.py", str(src), "--root", str(tmp_path / "rec"), "--sizes", "32"]
    proc = run_tool(cmd)
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        assert read_skipped(str(tmp_path / "rec" / f"{split}.skipped.tsv")) == [(f"{split}/stray.jpg",
                                                                                 "not in a class folder")]
    assert pack_json_split(str(tmp_path / "rec"), 32, "train")["packed"] == 4
    strict = run_tool(cmd + ["--strict"])
    assert strict.returncode == 1 and "--strict" in strict.stderr


@pytest.mark.parametrize("split, content", [("train", []), ("val", []), ("train", [".hidden.jpg"]),
                                            ("train", ["empty.jpg"])])
def test_empty_class_folder_is_refused_before_any_work(tmp_path, split, content):
    src = tmp_path / "src"
    generate(str(src), train_per_class=2, val_per_class=1, seed=16, classes=("disc", "ring"))
    folder = src / split / ("ring" if split == "val" else "zebra")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in content:
        (folder / name).write_bytes(b"")
    proc = run_tool(["tools/im2rec_multi.py", str(src), "--root", str(tmp_path / "rec"), "--sizes", "32"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"class folder {str(folder)!r}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "rec" / "32").exists()


# ---------------------------------------------------------------------------------------------- clean stops
@pytest.fixture(scope="module")
def busy_tree(tmp_path_factory):
    """Enough large images that two workers take about 3 s: a stop lands mid-pack (generating is the slow part,
    so 2 images per class are copied under 12 more names)."""
    out = tmp_path_factory.mktemp("busy")
    generate(str(out), train_per_class=2, val_per_class=1, seed=17, classes=("disc", "ring", "star"),
             size=(1200, 1600))
    for folder in (out / "train").iterdir():
        for image in list(folder.iterdir()):
            for copy in range(12):
                shutil.copyfile(image, folder / f"copy{copy}_{image.name}")
    return str(out)


def start_busy_pack(busy_tree, root):
    """The packer with 2 workers in a session of its own (as a terminal's foreground job), once it is writing."""
    proc = subprocess.Popen([sys.executable, "tools/im2rec_multi.py", busy_tree, "--root", str(root), "--sizes", "64",
                             "128", "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    partial = root / "128" / ".train.rec.partial"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (partial.exists() and partial.stat().st_size):
        time.sleep(0.02)
    assert partial.exists() and proc.poll() is None, "the packer was not caught midway"
    return proc


def worker_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def finish(proc, timeout=15):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the packer did not end within {timeout} s")
    return out, err


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "im2rec_multi: stopped (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "im2rec_multi: stopped by SIGTERM")])
def test_stop_mid_pack_ends_cleanly_and_rerun_packs_the_rest(busy_tree, tmp_path, signum, code, line):
    from gluon_imagenet import locks

    root = tmp_path / "rec"
    proc = start_busy_pack(busy_tree, root)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    started = time.time()
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground process group
    else:
        proc.send_signal(signum)  # kill PID, a service manager
    out, err = finish(proc)
    assert time.time() - started < 10
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err, err
    assert not list(root.glob("*/.*partial"))
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in workers), "a worker outlived the packer"
    with locks.hold(str(root / ".pack.lock"), "test"):  # released: this would raise Busy
        pass
    if signum == signal.SIGINT:
        rerun = run_tool(["tools/im2rec_multi.py", busy_tree, "--root", str(root), "--sizes", "64", "128",
                          "--workers", "2"])
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert len(read_index(str(root / "128" / "train.idx"))) == 3 * 2 * 13
        assert run_tool(["tools/im2rec_multi.py", "--verify", "--root", str(root)]).returncode == 0


@pytest.mark.slow
def test_a_worker_killed_by_the_kernel_ends_the_packer_with_one_error_line(busy_tree, tmp_path):
    root = tmp_path / "rec"
    proc = start_busy_pack(busy_tree, root)
    victim = worker_pids(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    out, err = finish(proc)
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {victim} killed by SIGKILL" in errors[0], err
    assert "Traceback" not in err
    assert not list(root.glob("*/.*partial"))
    assert "train" not in read_meta(str(root / "128")).get("splits", {})


def test_class_whose_files_all_fail_to_decode_is_named(tmp_path):
    src = tmp_path / "src"
    generate(str(src), train_per_class=2, val_per_class=1, seed=18, classes=("disc", "ring"))
    (src / "train" / "notes").mkdir()
    (src / "train" / "notes" / "readme.txt").write_text("not an image\n")
    cmd = ["tools/im2rec_multi.py", str(src), "--root", str(tmp_path / "rec"), "--sizes", "32"]
    proc = run_tool(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "warning: train/notes: none of its files could be packed" in proc.stdout
    assert run_tool(cmd + ["--strict", "--force"]).returncode == 1
