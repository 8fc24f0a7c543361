"""What im2rec_multi wrote under a data root, read in one place and without the packer's dependencies:
DATA_ROOT/classes.txt (index and class name), DATA_ROOT/<data_dir>/pack.json (how it was packed: short side,
quality, per-split counts) and DATA_ROOT/<data_dir>/<split>.{rec,idx}. The recipe checks, the trainer, the sweep
and the doctor all read packed data through these functions.
"""
from __future__ import annotations

import json
import os


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


def check_for(recipe, data_root: str, eval_split: bool = False) -> list[str]:
    """The check of a recipe's packed data that the trainer makes before it starts, and the doctor with it (one
    rule, so the doctor never passes data the trainer refuses): pack.check_packed_split of each training
    folder's train split (and, with eval_split, of the evaluation folder's val split, which the sweep reads).
    Returns one problem per damaged split, naming it and the fix; empty when all pass."""
    from gluon_imagenet.pack import check_packed_split

    splits = [(data_dir, "train") for data_dir in sorted({p.data_dir for p in recipe.phases})]
    if eval_split:
        splits.append((recipe.resolved_eval_data_dir, "val"))
    problems = []
    for data_dir, split in splits:
        # A damaged .rec would abort the process in MXNet's reader (dmlc `Check failed: kMagic`) mid-training.
        found = check_packed_split(os.path.join(data_root, data_dir), split)
        if found:
            what = repr(data_dir) if split == "train" else f"{data_dir!r} ({split})"
            problems.append(f"packed data {what} is damaged: " + "; ".join(found))
    return problems
