r"""Pack an ImageNet-style image tree into RecordIO at several sizes, in parallel, losing nothing.

    python tools/im2rec_multi.py /data/imagenet --root recordio --sizes 160 320
    python tools/im2rec_multi.py /data/imagenet --val-labels /data/imagenet/val_labels.txt   # flat val/*.JPEG
    python tools/im2rec_multi.py /data/imagenet-sz/160 --pass-through --sizes 160            # already resized
    python tools/im2rec_multi.py --verify --root recordio

Input: SRC/train/<class>/* and SRC/val/<class>/* (or SRC/val/* with --val-labels, one `filename label` per
line, label a class folder name or its index). Output, for each size S (short side after resizing, aspect
kept): ROOT/S/{train,val}.{rec,idx,lst} in MXNet's im2rec format, ROOT/S/pack.json (what was packed and how;
per split: counts, `key` of what it was packed from, `digest` the SHA-256 of the .rec as written, `chain` the
sizes its images were resized through, largest first, ending at S), ROOT/classes.txt (index and class folder
name, shared by every size and split), and ROOT/<split>.skipped.tsv
(files that could not be packed, with the reason; a header line `path<TAB>reason`, then one line per file, with
backslash, tab, newline and carriage return in a field written as \\, \t, \n, \r and bytes of a file name that
are not UTF-8 as \xNN: read_skipped() reverses the first four).

Each image is read and decoded once, then resized and JPEG-encoded for every size. No single image can stop a
split: one that cannot be read, decoded, resized or encoded is skipped and listed, as are files directly in
train/ or val/ (not in a class folder) and, with --pass-through, images whose short side is not the size given.
A class folder with nothing packable in it is refused before any work. Outputs are written under temporary
names and renamed when complete; a split already packed from the same files (paths, sizes and modification
times) with the same settings, whose files pass verify_split, is skipped on re-run (a damaged one is packed
again). One packer at a time per data root: a second one exits 2 naming the first (the lock is ROOT/.pack.lock;
--verify takes none). Ctrl-C or SIGTERM stops it within a second or so (exit 130/143, .partial files removed,
the lock released); a worker killed by the kernel ends it with one error line (exit 1).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import cv2
from PIL import Image

from gluon_imagenet import locks, stops
from gluon_imagenet.files import atomic_open, make_writable_dir
from gluon_imagenet.images import decode, encode_jpeg, resized_through, short_side_shape  # the chain predict.py runs too
from gluon_imagenet.pack_pool import WorkerDied, ordered_map
# The checks of packed data, part of this module's API (the tests import them from here).
from gluon_imagenet.pack_verify import verify_root, verify_split  # noqa: F401
from gluon_imagenet.packed import (  # noqa: F401 (part of this module's API)
    DEFAULT_DATA_ROOT, PACK_LOCK, PackError, check_packed_split, read_classes, read_index, read_meta)
from gluon_imagenet.recordio_writer import IndexedRecordWriter, image_record

SPLITS = ("train", "val")
LOCK_NAME = PACK_LOCK  # in the data root: one packer at a time, and none while a trainer reads it
# libjpeg(-turbo)'s JPEG_MAX_DIMENSION: OpenCV refuses to encode a wider or taller JPEG ("Maximum supported image
# dimension is 65500 pixels"), below the format's own 65535.
JPEG_MAX_SIDE = 65500
# Pillow's own decompression-bomb refusal threshold (2 x Image.MAX_IMAGE_PIXELS): about 540 MB once decoded to
# 8-bit BGR, per worker. Larger images are skipped before decoding, not left to exhaust memory.
MAX_PIXELS = 178_956_970
# Characters that break a line-based output: classes.txt, the .lst (tab-separated) and the skipped report.
_LINE_BREAKERS = ("\n", "\r", "\t")


@dataclass(frozen=True)
class Item:
    path: str  # relative to SRC
    label: int
    # (size, mtime_ns) of the source file when listed, () when it cannot be stat'ed: part of the split's key, so
    # that a file replaced under the same name is packed again.
    stamp: tuple = ()
    skip: str = ""  # a reason to skip it found while listing (e.g. a file outside any class folder)


@dataclass(frozen=True)
class Settings:
    src: str
    sizes: tuple[int, ...]
    quality: int
    pass_through: bool


# ---------------------------------------------------------------------------------------------- listing
def find_classes(src: str) -> list[str]:
    train = os.path.join(src, "train")
    if not os.path.isdir(train):
        raise PackError(f"{train!r} does not exist: SRC must hold train/<class>/ folders (and val/)")
    classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    if not classes:
        raise PackError(f"{train!r} has no class folders: expected train/<class>/<image files>")
    for name in classes:
        # classes.txt holds one `index<TAB>name` per line, and every .lst line holds the class folder in its
        # tab-separated path: a name with a line break or tab would shift every label read back from them.
        if any(c in name for c in _LINE_BREAKERS):
            raise PackError(f"class folder {os.path.join(train, name)!r} has a tab or line break in its name, which "
                            "classes.txt and the .lst cannot hold: rename the folder")
        if not _is_utf8(name):
            raise PackError(f"class folder {os.path.join(train, name)!r} has a name that is not valid UTF-8 (the "
                            "encoding of classes.txt): rename the folder")
    return classes


def _is_utf8(name: str) -> bool:
    """False for a file name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _files_under(folder: str) -> list[str]:
    """The files of a folder, sorted, hidden ones left out. A symbolic link that leads nowhere (dangling, or a
    loop) is listed too, so that it is counted and reported as skipped rather than silently dropped."""
    names = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.startswith(".") and (os.path.isfile(path) or os.path.islink(path) and not os.path.exists(path)):
            names.append(name)
    return sorted(names)


def _stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()  # dangling link, vanished, unreadable folder: encode_item reports why
    return (st.st_size, st.st_mtime_ns)


def _item(src: str, path: str, label: int, skip: str = "") -> Item:
    return Item(path, label, _stamp(os.path.join(src, path)), skip)


def _cannot_pack_unread(item: Item) -> str:
    """Why the file cannot be packed, from its name and stat alone (no reading), or ""."""
    if any(c in item.path for c in _LINE_BREAKERS):
        return "file name holds a tab or line break, which the .lst cannot hold: rename the file"
    if not _is_utf8(item.path):
        return "file name is not valid UTF-8 (the encoding of the .lst): rename the file"
    if item.stamp and item.stamp[0] == 0:
        return "empty file"
    return item.skip


NOT_IN_A_CLASS_FOLDER = "not in a class folder"


def list_split(src: str, split: str, classes: list[str], val_labels: str | None = None) -> list[Item]:
    """Every file of the split with its label, sorted by path. Files directly in the split's folder are listed
    to be skipped (not in a class folder); a class folder with nothing packable in it is refused."""
    folder = os.path.join(src, split)
    if not os.path.isdir(folder):
        raise PackError(f"{folder!r} does not exist; pack only the other split with --splits")
    if split == "val" and val_labels:
        return _list_flat(src, folder, classes, val_labels)
    index = {c: i for i, c in enumerate(classes)}
    items, class_folders = [], 0
    for name in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, name)):
            continue
        if name not in index:
            raise PackError(f"{os.path.join(folder, name)!r}: class {name!r} is not among the train classes")
        class_folders += 1
        found = [_item(src, os.path.join(split, name, f), index[name])
                 for f in _files_under(os.path.join(folder, name))]
        if all(_cannot_pack_unread(item) for item in found):
            # It would become an output class that nothing trains (or a class nothing evaluates).
            what = (f"holds {len(found)} file(s), none packable (empty, or a name the .lst cannot hold)" if found
                    else "holds no image files (hidden files are not packed)")
            raise PackError(f"class folder {os.path.join(folder, name)!r} {what}: add its images or remove the "
                            "folder")
        items += found
    if not class_folders:
        raise PackError(f"{folder!r} holds no files in class folders (for a flat val/ folder pass --val-labels)")
    stray = [_item(src, os.path.join(split, f), -1, NOT_IN_A_CLASS_FOLDER) for f in _files_under(folder)]
    return sorted(items + stray, key=lambda item: item.path)


def _list_flat(src: str, folder: str, classes: list[str], labels_file: str) -> list[Item]:
    """The flat val/ folder labelled by its labels file. The file must be exact: a file name given two different
    labels, or a label for a file that is not in val/, is refused (either means the labels file and the folder do
    not belong together, and a guess would train or evaluate on wrong labels). A file name repeated with the same
    label (as a class name or as its index) is accepted: it says nothing new and nothing wrong."""
    files = _files_under(folder)
    if not files:
        raise PackError(f"{folder!r} holds no files")
    present = set(files)
    index = {c: i for i, c in enumerate(classes)}
    labels, where, missing = {}, {}, []
    try:
        # utf-8-sig: a byte-order mark written by some editors would otherwise glue itself to the first file name.
        with open(labels_file, encoding="utf-8-sig") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise PackError(f"--val-labels {labels_file!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                        "UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PackError(f"{labels_file}:{number}: expected `filename label`, got {line.strip()!r}")
        name, label = parts
        if label in index:
            value = index[label]
        elif label.isdigit() and int(label) < len(classes):
            value = int(label)
        else:
            raise PackError(f"{labels_file}:{number}: label {label!r} is neither a class folder name nor an "
                            f"index below {len(classes)}")
        if name in labels and labels[name] != value:
            raise PackError(f"{labels_file}:{number}: {name!r} is labelled {label!r} ({classes[value]}) here but "
                            f"{classes[labels[name]]!r} on line {where[name]}: give each file one label")
        if name not in present:
            missing.append((number, name))
        labels.setdefault(name, value)
        where.setdefault(name, number)
    if missing:
        number, name = missing[0]
        hidden = " (hidden files and folders are not packed)" if os.path.lexists(os.path.join(folder, name)) else ""
        more = f" (and {len(missing) - 1} more lines name files that are not there)" if len(missing) > 1 else ""
        raise PackError(f"{labels_file}:{number}: {name!r} is not a file in {folder!r}{hidden}{more}: is this the "
                        "labels file of this validation folder? Remove the lines of files that are gone, or restore "
                        "them")
    # A file with no label is reported as skipped, not silently dropped: label -1 marks it.
    return [_item(src, os.path.join("val", f), labels.get(f, -1)) for f in files]


# ---------------------------------------------------------------------------------------------- one image
_settings: Settings | None = None


def _init_worker(settings: Settings) -> None:
    global _settings
    _settings = settings
    cv2.setNumThreads(1)  # one process per core already


def encode_item(item: Item) -> tuple[dict[int, bytes] | None, str]:
    """Read and decode one image once; return ({size: record payload}, "") or (None, reason to skip).

    Never raises for a bad image: whatever goes wrong with one file (OpenCV errors, a failed encoding, memory
    for an absurd size) skips that file with the reason, as one exception escaping a worker would end the split.
    """
    s = _settings
    if item.skip:
        return None, item.skip
    if any(c in item.path for c in _LINE_BREAKERS):
        return None, "file name holds a tab or line break, which the .lst cannot hold: rename the file"
    if not _is_utf8(item.path):
        return None, "file name is not valid UTF-8 (the encoding of the .lst): rename the file"
    if item.label < 0:
        return None, "no label in the validation labels file"
    path = os.path.join(s.src, item.path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, _unreadable(path, e)
    except MemoryError:
        return None, "too large to read into memory"
    if not data:
        return None, "empty file"
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        return None, "truncated JPEG (no end-of-image marker)"
    too_large = _too_many_pixels(data)
    if too_large:
        return None, too_large
    try:
        return _convert(data, s)
    except (cv2.error, MemoryError, OSError, ValueError, RuntimeError, OverflowError) as e:
        # Not a bug of ours (those still end the run, loudly) but a file OpenCV cannot handle.
        return None, f"failed to convert: {type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"


def _convert(data: bytes, s: Settings) -> tuple[dict[int, bytes] | None, str]:
    image = decode(data)
    if image is None:
        return None, "not a decodable image"
    h, w = image.shape[:2]
    if s.pass_through:
        (size,) = s.sizes
        if min(h, w) != size:
            # Recorded as packed at `size`, it would pass the recipe's crop checks and be read at another size.
            return None, (f"{w}x{h} px: short side {min(h, w)}, not the {size} given to --pass-through --sizes "
                          "(resize it, or pack without --pass-through)")
        return {size: data}, ""
    for size in s.sizes:
        # Decided before resizing: the resize itself would succeed (and take gigabytes), only the encoding fails.
        new_h, new_w = short_side_shape(h, w, size)
        if max(new_h, new_w) > JPEG_MAX_SIDE:
            return None, (f"{w}x{h} px: resized to short side {size} it would be {new_w}x{new_h} px, beyond JPEG's "
                          f"limit of {JPEG_MAX_SIDE} px per side")
    # Largest size first, each smaller one from the previous result (images.resized_through says why).
    return {size: encode_jpeg(resized, s.quality)
            for size, resized in resized_through(image, sorted(s.sizes, reverse=True))}, ""


def _unreadable(path: str, error: OSError) -> str:
    # A symbolic link that leads nowhere is a listing mistake to fix at its source, so it gets a reason of its
    # own rather than the bare "No such file or directory" of a file that vanished.
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symbolic link (to {os.readlink(path)!r})"
    return f"unreadable: {error.strerror}"


def _too_many_pixels(data: bytes) -> str:
    """Why the image is too large to decode safely (read from its header by Pillow, no decoding), or "".
    Measured 0.3 ms for a 375x500 JPEG: about 3% of decoding, resizing and encoding it at two sizes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns above half its limit; our limit is the one that counts
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except Exception:  # noqa: BLE001 - a header Pillow cannot read: OpenCV decides (and may refuse) below
        return ""
    if width * height > MAX_PIXELS:
        return f"too large to decode safely: {width}x{height} px, over {MAX_PIXELS:,} px"
    return ""


def _encode_indexed(args: tuple[int, Item]):
    position, item = args
    return position, encode_item(item)


# ---------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """The .rec/.idx/.lst of one split at one size, under temporary names until commit()."""

    def __init__(self, folder: str, split: str):
        self.final = {ext: os.path.join(folder, f"{split}.{ext}") for ext in ("rec", "idx", "lst")}
        self.temp = {ext: os.path.join(folder, f".{split}.{ext}.partial") for ext in ("rec", "idx", "lst")}
        self.records = IndexedRecordWriter(self.temp["idx"], self.temp["rec"])
        self.lst = open(self.temp["lst"], "w", encoding="utf-8")  # whatever the locale: names are UTF-8
        self.count = 0

    def write(self, item: Item, payload: bytes) -> None:
        self.records.write_idx(self.count, image_record(float(item.label), self.count, payload))
        self.lst.write(f"{self.count}\t{float(item.label):f}\t{item.path}\n")  # im2rec's list format
        self.count += 1

    def digest(self) -> str:
        """SHA-256 of the .rec's bytes, computed as they were written."""
        return self.records.digest()

    def commit(self) -> None:
        self.records.close()
        self.lst.close()
        for ext in ("idx", "lst", "rec"):
            os.replace(self.temp[ext], self.final[ext])

    def abandon(self) -> None:
        self.records.close()
        self.lst.close()
        for path in self.temp.values():
            if os.path.exists(path):
                os.remove(path)


def write_json_atomic(path: str, data: dict) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _split_key(items: list[Item], classes: list[str], settings: Settings, size: int, seed: int) -> str:
    """What a packed split depends on: its list (with each source file's size and modification time, so that a
    file replaced under the same name counts as new), the classes, the encoding settings."""
    text = json.dumps([[(i.path, i.label, list(i.stamp)) for i in items], classes, settings.quality,
                       settings.pass_through, size, seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_split(split: str, items: list[Item], classes: list[str], settings: Settings, root: str, processes: int,
               seed: int, force: bool, log=print) -> dict:
    """Pack one split at every size that is not already complete; returns the split's counts."""
    if split == "train":
        items = list(items)
        random.Random(seed).shuffle(items)  # fixed order: the same seed packs the same file
    keys = {size: _split_key(items, classes, settings, size, seed) for size in settings.sizes}
    todo = []
    for size in settings.sizes:
        folder = os.path.join(root, str(size))
        entry = read_meta(folder).get("splits", {}).get(split)
        if not force and entry and entry.get("key") == keys[size]:
            damage = verify_split(folder, split, entry, len(classes))
            if not damage:
                log(f"{split} at {size}: already packed ({entry['packed']} images), skipping (--force rebuilds)")
                continue
            log(f"{split} at {size}: packed before but damaged ({damage[0]}), packing it again")
        todo.append(size)
    if not todo:
        entry = read_meta(os.path.join(root, str(settings.sizes[0])))["splits"][split]
        return {k: entry[k] for k in ("found", "packed", "skipped")}

    run = Settings(settings.src, tuple(todo), settings.quality, settings.pass_through)
    writers = {}
    for size in todo:
        os.makedirs(os.path.join(root, str(size)), exist_ok=True)
        _forget_split(os.path.join(root, str(size)), split)  # a half-replaced split must not look complete
        writers[size] = _SplitWriter(os.path.join(root, str(size)), split)
    skipped, packed_per_class = [], [0] * len(classes)
    try:
        for item, (payloads, reason) in _run_pool(items, run, processes, f"{split} {'/'.join(map(str, todo))} px"):
            if payloads is None:
                skipped.append((item.path, reason))
                continue
            for size in todo:
                writers[size].write(item, payloads[size])
            packed_per_class[item.label] += 1
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    present = {item.label for item in items if item.label >= 0}
    for label in sorted(present):
        if not packed_per_class[label]:
            # Only known once decoded: refusing before the work could not see it. An output class nothing trains
            # (or nothing evaluates) must not pass unremarked.
            log(f"warning: {split}/{classes[label]}: none of its files could be packed (see "
                f"{os.path.join(root, split + '.skipped.tsv')}): a class with no {split} images")
    for w in writers.values():
        w.commit()
    write_skipped(os.path.join(root, f"{split}.skipped.tsv"), skipped)
    counts = {"found": len(items), "packed": len(items) - len(skipped), "skipped": len(skipped)}
    for size in todo:
        folder = os.path.join(root, str(size))
        meta = read_meta(folder)
        meta.update(short_side=size, quality=settings.quality, pass_through=settings.pass_through,
                    classes=len(classes))
        # chain: the sizes this pass resized through to reach `size` (_convert: largest first, each from the
        # previous), which export and predict replay; digest: the split's identity (packed.data_identity).
        chain = [size] if settings.pass_through else [s for s in sorted(todo, reverse=True) if s >= size]
        meta.setdefault("splits", {})[split] = dict(counts, key=keys[size], seed=seed, digest=writers[size].digest(),
                                                    chain=chain)
        write_json_atomic(os.path.join(folder, "pack.json"), meta)
    return counts


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _tsv_field(text: str) -> str:
    """One field of the skipped report on one line whatever it holds: backslash, tab, newline and carriage
    return escaped as \\\\, \\t, \\n, \\r; bytes of a file name that are not UTF-8 written as \\xNN."""
    text = "".join(_ESCAPES.get(c, c) for c in text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_skipped(path: str, skipped: list[tuple[str, str]]) -> None:
    with atomic_open(path, encoding="utf-8") as f:
        f.write("path\treason\n")
        f.writelines(f"{_tsv_field(name)}\t{_tsv_field(reason)}\n" for name, reason in skipped)


def read_skipped(path: str) -> list[tuple[str, str]]:
    """The (path, reason) rows of a <split>.skipped.tsv, escapes undone (\\xNN is left as written)."""
    def unescape(field):
        out, chars = [], iter(field)
        for c in chars:
            if c == "\\":
                nxt = next(chars, "")
                out.append(_UNESCAPES.get(nxt, "\\" + nxt))
            else:
                out.append(c)
        return "".join(out)

    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]
    return [tuple(unescape(field) for field in line.split("\t")) for line in lines if line]


def _forget_split(folder: str, split: str) -> None:
    meta = read_meta(folder)
    if split in meta.get("splits", {}):
        del meta["splits"][split]
        write_json_atomic(os.path.join(folder, "pack.json"), meta)


def _run_pool(items: list[Item], settings: Settings, processes: int, what: str):
    """Yield (item, encode result) in list order, with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=what, unit="img", file=sys.stderr, mininterval=2.0, smoothing=0.1)
    try:
        for position, result in ordered_map(_encode_indexed, enumerate(items), processes, _init_worker, (settings,)):
            bar.update()
            yield items[position], result
    finally:
        bar.close()


def write_classes(root: str, classes: list[str], force: bool) -> None:
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path) and not force:
        existing = read_classes(root)
        if existing != classes:
            raise PackError(f"{path!r} lists {len(existing)} other classes than SRC/train ({len(classes)}): labels "
                            "would disagree between packs; use another --root or --force to rebuild everything")
        return
    with atomic_open(path, encoding="utf-8") as f:
        f.writelines(f"{i}\t{c}\n" for i, c in enumerate(classes))


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python tools/im2rec_multi.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="image tree with train/<class>/ and val/<class>/ (or flat val/)")
    p.add_argument("--root", default=DEFAULT_DATA_ROOT, help=f"data root to write (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--sizes", type=int, nargs="*", default=[160, 320],
                   help="short sides to resize to, pixels (default: 160 320)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--val-labels", help="labels file for a flat val/ folder: one `filename label` per line")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100 (default: 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training list's shuffle (default: 0)")
    p.add_argument("--pass-through", action="store_true",
                   help="pack the files' bytes as they are (already resized trees; exactly one --sizes)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file was skipped")
    p.add_argument("--force", action="store_true", help="rebuild outputs that are already complete")
    p.add_argument("--verify", action="store_true", help="only verify what is packed under --root")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.verify:
        return
    if not args.src:
        raise PackError("SRC is required (the image tree to pack), unless --verify")
    if not os.path.isdir(args.src):
        raise PackError(f"SRC {args.src!r} is not a folder")
    if not args.sizes:
        raise PackError("--sizes is empty: give at least one short side in pixels, e.g. --sizes 160 320")
    if any(s <= 0 for s in args.sizes):
        raise PackError(f"--sizes {' '.join(map(str, args.sizes))}: every size must be a positive number of pixels")
    if len(set(args.sizes)) != len(args.sizes):
        raise PackError(f"--sizes {' '.join(map(str, args.sizes))}: a size is repeated")
    if args.pass_through and len(args.sizes) != 1:
        raise PackError("--pass-through packs files as they are: give exactly one --sizes (the size they have)")
    if not 1 <= args.quality <= 100:
        raise PackError(f"--quality {args.quality}: must be 1..100")
    if args.workers < 1:
        raise PackError(f"--workers {args.workers}: must be >= 1")
    if args.val_labels and not os.path.isfile(args.val_labels):
        raise PackError(f"--val-labels {args.val_labels!r} does not exist")
    problem = make_writable_dir(args.root)
    if problem:
        raise PackError(f"--root {args.root!r} is not writable: {problem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C or SIGTERM: one line, exit 130/143; the writers remove their .partial files and the lock is
    # released as the stop unwinds (a re-run packs what is missing).
    with stops.clean_stop("im2rec_multi"):
        try:
            check_args(args)
            if args.verify:
                return _verify(args.root)
            # The whole pack holds the data root's lock: two packers with different settings would otherwise
            # interleave their .rec/.idx and each write a pack.json claiming success. The kernel drops the lock
            # however this process ends, so a killed packer leaves nothing to clean up.
            with locks.hold(os.path.join(args.root, LOCK_NAME), f"data root {args.root!r}"):
                return _pack(args)
        except (PackError, locks.Busy) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except WorkerDied as e:
            print(f"error: a packing process died ({e}; out of memory? see `dmesg`): the split it was packing was "
                  "not kept; run the same command again to pack what is missing (fewer --workers need less memory)",
                  file=sys.stderr)
            return 1


def _verify(root: str) -> int:
    """--verify: reads only, so it takes no lock; a packer at work would explain what it finds, so it is named."""
    problems = verify_root(root)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    if problems:
        info = locks.holder(os.path.join(root, LOCK_NAME))
        if info is not None:
            print(f"note: a packer is writing {root} now (pid {info.get('pid')} on {info.get('host')}: "
                  f"{info.get('command', '?')}); verify again when it is done", file=sys.stderr)
    print(f"verify {root}: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


def _pack(args) -> int:
    """List (every bad input refused here, before any output is written), pack each split, verify, report."""
    classes = find_classes(args.src)
    listed = {split: list_split(args.src, split, classes, args.val_labels) for split in args.splits}
    write_classes(args.root, classes, args.force)
    settings = Settings(args.src, tuple(args.sizes), args.quality, args.pass_through)
    print(f"packing {args.src} -> {args.root}/{{{','.join(map(str, args.sizes))}}}: {len(classes)} classes, "
          + ", ".join(f"{len(v)} {k} files" for k, v in listed.items()) + f", {args.workers} processes")
    start, summary = time.time(), {}
    for split, items in listed.items():
        summary[split] = pack_split(split, items, classes, settings, args.root, args.workers, args.seed, args.force)
    problems = []
    for size in args.sizes:
        folder = os.path.join(args.root, str(size))
        for split in listed:
            problems += verify_split(folder, split, read_meta(folder)["splits"][split], len(classes))
    print(f"\n{'split':<6} {'found':>9} {'packed':>9} {'skipped':>9}")
    for split, c in summary.items():
        print(f"{split:<6} {c['found']:>9,} {c['packed']:>9,} {c['skipped']:>9,}")
    print(f"done in {time.time() - start:.1f} s; verified {len(args.sizes) * len(listed)} outputs: "
          f"{'FAILED' if problems else 'ok'}")
    for split, c in summary.items():
        if c["skipped"]:
            print(f"skipped {split} files are listed in {os.path.join(args.root, split + '.skipped.tsv')}")
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    if problems:
        return 1
    if args.strict and any(c["skipped"] for c in summary.values()):
        print("error: --strict and some files were skipped", file=sys.stderr)
        return 1
    return 0
