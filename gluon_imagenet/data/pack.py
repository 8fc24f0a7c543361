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
import hashlib
import json
import os
import random
import sys
import time

from gluon_imagenet import locks, stops
from gluon_imagenet.data.convert import Settings, encode_indexed, init_worker
from gluon_imagenet.data.listing import Item, find_classes, list_split
from gluon_imagenet.data.packed import DEFAULT_DATA_ROOT, PACK_LOCK, PackError, read_classes, read_meta
from gluon_imagenet.data.pool import WorkerDied, ordered_map
from gluon_imagenet.data.recordio import IndexedRecordWriter, image_record
from gluon_imagenet.data.verify import verify_root, verify_split
from gluon_imagenet.files import atomic_open, make_writable_dir

SPLITS = ("train", "val")


LOCK_NAME = PACK_LOCK  # in the data root: one packer at a time, and none while a trainer reads it


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
        for position, result in ordered_map(encode_indexed, enumerate(items), processes, init_worker, (settings,)):
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
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help=f"splits to pack, each at every --sizes (default: {' '.join(SPLITS)}; --verify checks "
                        "every split packed under --root)")
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
