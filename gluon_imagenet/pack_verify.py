"""Checking packed RecordIO without MXNet: verify_split reads every record's header (`im2rec_multi.py
--verify`), check_packed_split only a few bytes (the trainer, before it starts). Both follow dmlc-core's format
(see recordio_writer.py): a truncated, appended-to or interleaved .rec/.idx fails, so a re-run packs it again.
"""
from __future__ import annotations

import json
import os
import struct

from gluon_imagenet.packed import read_classes, read_meta
from gluon_imagenet.recordio_writer import RECORD_MAGIC

_IRHEADER = struct.Struct("IfQQ")  # mx.recordio.IRHeader: flag, label, id, id2
_RECORD_HEAD = struct.Struct("<II")  # RecordIO part header: magic, lrecord (cflag in the top 3 bits, length below)


def read_index(idx_path: str) -> list[tuple[int, int]]:
    with open(idx_path) as f:
        return [(int(k), int(v)) for k, v in (line.split("\t") for line in f if line.strip())]


class _Damaged(Exception):
    """A record that does not fit the RecordIO format or the file."""


def _walk_record(rec, offset: int, file_size: int) -> tuple[int, bytes]:
    """Follow the record that starts at offset: (the byte just past its end, the start of its payload).

    RecordIO (dmlc-core recordio.cc): each part is uint32 magic, uint32 lrecord (top 3 bits cflag, lower 29 the
    length), then the payload padded to 4 bytes. The writer splits a record where its payload holds the magic
    number at a 4-byte boundary (cflag 1 first part, 2 middle, 3 last; 0 a whole record), so a record may have
    several parts. Raises _Damaged when a part has no magic number, the wrong cflag, or runs past the file.
    """
    position, first, part = offset, b"", 0
    while True:
        if position + _RECORD_HEAD.size > file_size:
            raise _Damaged(f"record at byte {offset} is cut short: its part header at byte {position} runs past the "
                           f"end of the file ({file_size} bytes)")
        rec.seek(position)
        head = rec.read(_RECORD_HEAD.size + (_IRHEADER.size if part == 0 else 0))
        magic, lrecord = _RECORD_HEAD.unpack(head[:_RECORD_HEAD.size])
        if magic != RECORD_MAGIC:
            raise _Damaged(f"no RecordIO magic number at byte {position} (record at byte {offset})")
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        if cflag not in ((0, 1) if part == 0 else (2, 3)):
            raise _Damaged(f"record at byte {offset}: part {part} at byte {position} has continuation flag {cflag}")
        end = position + _RECORD_HEAD.size + (length + 3) // 4 * 4
        if end > file_size:
            raise _Damaged(f"record at byte {offset} is cut short: it needs {end} bytes, the file has {file_size}")
        if part == 0:
            first = head[_RECORD_HEAD.size:_RECORD_HEAD.size + length]
        if cflag in (0, 3):
            return end, first
        position, part = end, part + 1


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
                expected, payload = _walk_record(rec, offset, size)
            except _Damaged as e:
                problems.append(f"{rec_path}: record {key}: {e}")
                break
            if len(payload) < _IRHEADER.size:
                continue  # the payload was split inside its header (magic number in it): no label to read here
            flag, label, _, _ = _IRHEADER.unpack(payload[:_IRHEADER.size])
            if flag != 0 or not (0 <= label < num_classes) or label != int(label):
                problems.append(f"{rec_path}: record {key} has label {label}, outside 0..{num_classes - 1}")
                break
        else:
            if expected != size:
                problems.append(f"{rec_path}: {size - expected} bytes after the last record listed in the .idx "
                                f"(it ends at byte {expected}, the file at {size})")
    return problems


def check_packed_split(folder: str, split: str) -> list[str]:
    """A cheap check of one packed split, for the trainer before it starts: the .idx read once (measured 4 s for
    ImageNet's 1.28 million lines on a busy 2-core machine) and a few small reads of pack.json and the .rec, not
    one per record.
    Returns the problems (each naming the file and the fix), empty when the split passes. It checks:

    1. folder/<split>.rec and folder/<split>.idx exist;
    2. the .idx parses (one `key<TAB>offset` of integers per line) and lists at least one record;
    3. when folder/pack.json exists (the packer made the folder): it is readable, lists the split as packed (it
       does not while the packer is writing or re-writing that split, or after a packer was killed in it), and
       its `packed` count equals the number of .idx lines;
    4. the record at the smallest offset starts at byte 0 with the RecordIO magic number;
    5. the record at the largest offset starts with the magic number and (following its parts when the writer
       split it) ends exactly at the end of the .rec: this catches a .rec cut short (which MXNet's reader would
       abort the process on, `Check failed: kMagic`) or with bytes after its last record.

    Records in between are not read: verify_split (`im2rec_multi.py --verify`) reads every record's header.
    """
    idx_path, rec_path = (os.path.join(folder, f"{split}.{ext}") for ext in ("idx", "rec"))
    repack = "pack it again with tools/im2rec_multi.py (then --verify)"
    missing = [p for p in (rec_path, idx_path) if not os.path.isfile(p)]
    if missing:
        return [f"{' and '.join(missing)} missing: {repack}"]
    try:
        index = read_index(idx_path)
    except (OSError, ValueError) as e:
        return [f"{idx_path}: unreadable index ({e}): {repack}"]
    if not index:
        return [f"{idx_path}: lists no records: {repack}"]
    problems = []
    meta_path = os.path.join(folder, "pack.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                entry = json.load(f).get("splits", {}).get(split)
        except (OSError, ValueError, AttributeError) as e:
            return [f"{meta_path}: unreadable ({e}): {repack}"]
        if not entry:
            problems.append(f"{meta_path} does not list {split} as packed: a packer is writing it now, or one was "
                            f"stopped while writing it; {repack}")
        elif entry.get("packed") != len(index):
            problems.append(f"{idx_path}: {len(index)} records, {meta_path} says {entry.get('packed')} were packed: "
                            f"{repack}")
    first, last = min(offset for _, offset in index), max(offset for _, offset in index)
    with open(rec_path, "rb") as rec:
        size = os.fstat(rec.fileno()).st_size
        if first != 0:
            problems.append(f"{idx_path}: the first record is at byte {first}, not 0: {repack}")
        for offset in sorted({first, last}):
            try:
                end, _ = _walk_record(rec, offset, size)
            except _Damaged as e:
                problems.append(f"{rec_path}: {e}: {repack}")
                continue
            if offset == last and end != size:
                problems.append(f"{rec_path}: {size - end} bytes after the last record listed in the .idx (it ends at "
                                f"byte {end}, the file at {size}): {repack}")
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
