"""Checking packed RecordIO without MXNet: verify_split reads every record's header (`im2rec_multi.py
--verify`); packed.check_packed_split, its cheap sibling for the trainer, only a few bytes. Both follow dmlc-core's
format (see recordio.py) through packed.walk_record: a truncated, appended-to or interleaved .rec/.idx
fails, so a re-run packs it again.
"""
from __future__ import annotations

import os

from gluon_imagenet.data.packed import DamagedRecord, read_classes, read_index, read_meta, walk_record
from gluon_imagenet.data.recordio import IRHEADER


def verify_split(folder: str, split: str, entry: dict, num_classes: int) -> list[str]:
    """Problems with a packed split (empty when none), reading every record's header (not the images):
    the record count against pack.json's entry; every .idx key distinct; the records, taken in offset order,
    tile the .rec exactly: the first at byte 0, each next one where the previous ends, the last ending at the
    file's end; each record's parts start with the magic number and fit inside the file; every label is a class
    index. A truncated, appended-to, or interleaved .rec/.idx fails, so a re-run packs it again."""
    idx_path, rec_path = (os.path.join(folder, f"{split}.{ext}") for ext in ("idx", "rec"))
    if not (os.path.isfile(idx_path) and os.path.isfile(rec_path)):
        return [f"{folder}: {split}.rec/.idx missing"]
    try:
        index = read_index(idx_path)
    except (OSError, ValueError) as e:
        return [f"{idx_path}: unreadable index ({e})"]
    problems = []
    if len(index) != entry.get("packed"):
        problems.append(f"{idx_path}: {len(index)} records, pack.json says {entry.get('packed')} were packed")
    if len({key for key, _ in index}) != len(index):
        problems.append(f"{idx_path}: a record key is listed more than once")
    with open(rec_path, "rb") as rec:
        size = os.fstat(rec.fileno()).st_size
        expected = 0  # where the next record must start
        for key, offset in sorted(index, key=lambda pair: pair[1]):
            if offset != expected:
                problems.append(f"{rec_path}: record {key} is at byte {offset}, but the records before it end at "
                                f"byte {expected}: the .idx does not describe this .rec")
                break
            try:
                expected, payload = walk_record(rec, offset, size)
            except DamagedRecord as e:
                problems.append(f"{rec_path}: record {key}: {e}")
                break
            if len(payload) < IRHEADER.size:
                continue  # the payload was split inside its header (magic number in it): no label to read here
            flag, label, _, _ = IRHEADER.unpack(payload[:IRHEADER.size])
            if flag != 0 or not (0 <= label < num_classes) or label != int(label):
                problems.append(f"{rec_path}: record {key} has label {label}, outside 0..{num_classes - 1}")
                break
        else:
            if expected != size:
                problems.append(f"{rec_path}: {size - expected} bytes after the last record listed in the .idx "
                                f"(it ends at byte {expected}, the file at {size})")
    return problems


def verify_root(root: str) -> list[str]:
    """Verify every packed split under root; returns the problems (empty when all is well)."""
    classes = read_classes(root)
    problems, checked = [], 0
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        meta = read_meta(folder)
        for split, entry in sorted(meta.get("splits", {}).items()):
            problems += verify_split(folder, split, entry, len(classes))
            checked += 1
    if not checked:
        problems.append(f"{root}: no packed splits found (no <size>/pack.json)")
    return problems
