"""Listing an image tree: which files of which class folders get packed, and which are skipped."""
from __future__ import annotations

import os
from dataclasses import dataclass

from gluon_imagenet.data.packed import PackError

# Characters that break a line-based output: classes.txt, the .lst (tab-separated) and the skipped report.
LINE_BREAKERS = ("\n", "\r", "\t")


@dataclass(frozen=True)
class Item:
    path: str  # relative to SRC
    label: int
    # (size, mtime_ns) of the source file when listed, () when it cannot be stat'ed: part of the split's key, so
    # that a file replaced under the same name is packed again.
    stamp: tuple = ()
    skip: str = ""  # a reason to skip it found while listing (e.g. a file outside any class folder)


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
        if any(c in name for c in LINE_BREAKERS):
            raise PackError(f"class folder {os.path.join(train, name)!r} has a tab or line break in its name, which "
                            "classes.txt and the .lst cannot hold: rename the folder")
        if not is_utf8(name):
            raise PackError(f"class folder {os.path.join(train, name)!r} has a name that is not valid UTF-8 (the "
                            "encoding of classes.txt): rename the folder")
    return classes


def is_utf8(name: str) -> bool:
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
    if any(c in item.path for c in LINE_BREAKERS):
        return "file name holds a tab or line break, which the .lst cannot hold: rename the file"
    if not is_utf8(item.path):
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
