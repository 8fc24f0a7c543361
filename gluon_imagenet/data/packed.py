"""What im2rec_multi wrote under a data root, read in one place and without the packer's dependencies:
DATA_ROOT/classes.txt (index and class name), DATA_ROOT/<data_dir>/pack.json (how it was packed: short side,
quality, per-split counts) and DATA_ROOT/<data_dir>/<split>.{rec,idx}. The recipe checks, the trainer, the sweep
and the doctor all read packed data through these functions.

check_for is the one check that a recipe's packed data is fit to train on (files present, crops that fit the
packed short side, no damage): the trainer, the doctor and `recipe show --data-root` all make it.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from gluon_imagenet.data.recordio import IRHEADER, RECORD_MAGIC

# The data root a command uses when it is given none: where the packer writes and the trainer reads by default.
DEFAULT_DATA_ROOT = "recordio"
# In the data root: held by the packer while it writes, and shared by every trainer while it reads (locks.py).
PACK_LOCK = ".pack.lock"


class PackError(Exception):
    """Bad input or output location, or packed data that cannot be read; found before any work."""


def split_paths(data_root: str, data_dir: str, split: str) -> tuple[str, str]:
    folder = os.path.join(data_root, data_dir)
    return os.path.join(folder, f"{split}.rec"), os.path.join(folder, f"{split}.idx")


def read_meta(folder: str) -> dict:
    """A packed folder's pack.json, or {} when there is none (packed by other tools) or it cannot be read."""
    path = os.path.join(folder, "pack.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_classes(root: str) -> list[str]:
    """The class folder names in label order (ROOT/classes.txt, shared by every size and split)."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise PackError(f"{path!r} does not exist: not a data root packed by im2rec_multi")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if line.strip()]


def packed_count(data_root: str, data_dir: str, split: str) -> int:
    """Images in a packed split: pack.json's count when im2rec_multi made it, else the .idx lines."""
    entry = read_meta(os.path.join(data_root, data_dir)).get("splits", {}).get(split)
    if entry:
        return int(entry["packed"])
    _, idx = split_paths(data_root, data_dir, split)
    with open(idx) as f:
        return sum(1 for line in f if line.strip())


def packed_short_side(data_root: str | None, data_dir: str) -> int | None:
    """The short side data_dir was resized to: from its pack.json when packed by im2rec_multi, else the folder
    name when it is a number (the convention 'recordio/160'), else unknown."""
    if data_root is not None:
        size = read_meta(os.path.join(data_root, data_dir)).get("short_side")
        if isinstance(size, int):
            return size
    return int(data_dir) if data_dir.isdigit() else None


def holds(short_side: int | None, pixels: float) -> bool:
    """Whether images packed at `short_side` hold `pixels` (a crop, or the short side an evaluation resizes to)
    without enlarging them: the one rule for the recipe's training crops and the sweep's evaluation sizes. An
    unknown short side (data packed by other tools, a folder not named by its size) holds anything."""
    return short_side is None or pixels <= short_side


def split_entry(data_root: str, data_dir: str, split: str) -> dict:
    """pack.json's entry for one split ({} when the folder was not packed by im2rec_multi or lacks the split)."""
    entry = read_meta(os.path.join(data_root, data_dir)).get("splits", {}).get(split)
    return entry if isinstance(entry, dict) else {}


def data_identity(data_root: str, data_dir: str, split: str) -> str:
    """What changes whenever a packed split's bytes change, the one identity the trainer, the sweep and export
    record: the SHA-256 of the .rec as the packer wrote it (pack.json's `digest`, computed while writing), else
    pack.json's settings key (packed before digests were recorded), else the .rec's size and modification time
    (data packed by other tools)."""
    entry = split_entry(data_root, data_dir, split)
    if isinstance(entry.get("digest"), str) and entry["digest"]:
        return f"sha256:{entry['digest']}"
    if entry.get("key"):
        return f"pack:{entry['key']}"
    rec, _ = split_paths(data_root, data_dir, split)
    stat = os.stat(rec)
    return f"file:{stat.st_size}:{stat.st_mtime_ns}"


def resize_chain(data_root: str, data_dir: str, split: str) -> list[int] | None:
    """The short sides the packer resized this split's images through, largest first, ending at this folder's
    own (pack.json's `chain`, written by the packer for the sizes it packed together in one pass); None when
    pack.json does not record it (packed by other tools or by an older packer)."""
    chain = split_entry(data_root, data_dir, split).get("chain")
    if isinstance(chain, list) and chain and all(isinstance(s, int) and s > 0 for s in chain):
        return chain
    return None


_RECORD_HEAD = struct.Struct("<II")  # RecordIO part header: magic, lrecord (cflag in the top 3 bits, length below)
# What to do about a split that check_packed_split finds damaged.
REPACK = "pack it again with tools/im2rec_multi.py (then --verify)"


def read_index(idx_path: str) -> list[tuple[int, int]]:
    with open(idx_path) as f:
        return [(int(k), int(v)) for k, v in (line.split("\t") for line in f if line.strip())]


class DamagedRecord(Exception):
    """A record that does not fit the RecordIO format or the file."""


def walk_record(rec, offset: int, file_size: int) -> tuple[int, bytes]:
    """Follow the record that starts at offset: (the byte just past its end, the start of its payload).

    RecordIO (dmlc-core recordio.cc): each part is uint32 magic, uint32 lrecord (top 3 bits cflag, lower 29 the
    length), then the payload padded to 4 bytes. The writer splits a record where its payload holds the magic
    number at a 4-byte boundary (cflag 1 first part, 2 middle, 3 last; 0 a whole record), so a record may have
    several parts. Raises DamagedRecord when a part has no magic number, the wrong cflag, or runs past the file.
    """
    position, first, part = offset, b"", 0
    while True:
        if position + _RECORD_HEAD.size > file_size:
            raise DamagedRecord(f"record at byte {offset} is cut short: its part header at byte {position} runs past the "
                           f"end of the file ({file_size} bytes)")
        rec.seek(position)
        head = rec.read(_RECORD_HEAD.size + (IRHEADER.size if part == 0 else 0))
        magic, lrecord = _RECORD_HEAD.unpack(head[:_RECORD_HEAD.size])
        if magic != RECORD_MAGIC:
            raise DamagedRecord(f"no RecordIO magic number at byte {position} (record at byte {offset})")
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        if cflag not in ((0, 1) if part == 0 else (2, 3)):
            raise DamagedRecord(f"record at byte {offset}: part {part} at byte {position} has continuation flag {cflag}")
        end = position + _RECORD_HEAD.size + (length + 3) // 4 * 4
        if end > file_size:
            raise DamagedRecord(f"record at byte {offset} is cut short: it needs {end} bytes, the file has {file_size}")
        if part == 0:
            first = head[_RECORD_HEAD.size:_RECORD_HEAD.size + length]
        if cflag in (0, 3):
            return end, first
        position, part = end, part + 1


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
    repack = REPACK
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
                end, _ = walk_record(rec, offset, size)
            except DamagedRecord as e:
                problems.append(f"{rec_path}: {e}: {repack}")
                continue
            if offset == last and end != size:
                problems.append(f"{rec_path}: {size - end} bytes after the last record listed in the .idx (it ends at "
                                f"byte {end}, the file at {size}): {repack}")
    return problems




@dataclass(frozen=True)
class DataProblem:
    """One reason a recipe's packed data cannot be trained on, and what to do about it (the doctor shows both)."""
    detail: str  # names the recipe, the field, the folder or file, and what is wrong
    fix: str

    def __str__(self) -> str:
        return self.detail


def check_for(recipe, data_root: str, eval_split: bool = False) -> list[DataProblem]:
    """THE check that a recipe's packed data is fit to train on, made by the trainer before it starts, by the
    doctor and by `recipe show --data-root` (one rule, so they never disagree). In order, stopping at the first
    that fails:

    1. the data root exists, each phase's data_dir holds train.rec/.idx (and, with eval_split, the evaluation
       folder val.rec/.idx: the sweep reads it, the trainer does not);
    2. no crop is larger than its data dir's packed short side (size_problem);
    3. check_packed_split of each training folder's train split (and, with eval_split, of the val split):
       one problem per damaged split.

    Returns the problems, empty when the data passes."""
    pack_fix = f"pack the data: python tools/im2rec_multi.py SRC --root {data_root} --sizes ..."
    missing = _missing_file(recipe, data_root, eval_split) or size_problem(recipe, data_root)
    if missing:
        return [DataProblem(missing, pack_fix)]
    splits = [(data_dir, "train") for data_dir in sorted({p.data_dir for p in recipe.phases})]
    if eval_split:
        splits.append((recipe.resolved_eval_data_dir, "val"))
    problems = []
    for data_dir, split in splits:
        # A damaged .rec would abort the process in MXNet's reader (dmlc `Check failed: kMagic`) mid-training.
        found = check_packed_split(os.path.join(data_root, data_dir), split)
        if found:
            what = repr(data_dir) if split == "train" else f"{data_dir!r} ({split})"
            problems.append(DataProblem(f"packed data {what} is damaged: " + "; ".join(found), REPACK))
    return problems


def _missing_file(recipe, data_root: str, eval_split: bool) -> str:
    """The first packed file the recipe needs that is not there ("" when all are)."""
    if not os.path.isdir(data_root):
        return (f"{recipe.source}: data root {data_root!r} does not exist; pack data with "
                "`python tools/im2rec_multi.py SRC --root DATA_ROOT` or pass --data-root")
    for i, phase in enumerate(recipe.phases):
        folder = os.path.join(data_root, phase.data_dir)
        for name in ("train.rec", "train.idx"):
            if not os.path.isfile(os.path.join(folder, name)):
                return (f"{recipe.source}: {recipe.phase_label(i)}: field 'data_dir': {phase.data_dir!r} has no "
                        f"{name} under {folder!r}; pack that size with tools/im2rec_multi.py --sizes ...")
    folder = os.path.join(data_root, recipe.resolved_eval_data_dir)
    for name in ("val.rec", "val.idx") if eval_split else ():
        if not os.path.isfile(os.path.join(folder, name)):
            return (f"{recipe.source}: field 'eval_data_dir': {recipe.resolved_eval_data_dir!r} has no {name} "
                    f"under {folder!r}")
    return ""


def size_problem(recipe, data_root: str | None) -> str:
    """The first crop of the recipe (a phase's image_size, or the evaluation crop) larger than its data dir's
    short side, known from pack.json under data_root or from a numeric folder name (data_root None: what the
    recipe file alone says); "" when every crop fits."""
    crops = [(f"{recipe.phase_label(i)}: field 'image_size'", phase.image_size, phase.data_dir)
             for i, phase in enumerate(recipe.phases)]
    crops.append(("field 'eval_image_size'", recipe.resolved_eval_image_size, recipe.resolved_eval_data_dir))
    for where, size, data_dir in crops:
        short_side = packed_short_side(data_root, data_dir)
        if not holds(short_side, size):
            return (f"{recipe.source}: {where}: {size} px is larger than the {short_side} px short side of data dir "
                    f"{data_dir!r}; use image_size <= {short_side} or a data dir packed larger")
    return ""
