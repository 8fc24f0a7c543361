"""Fashion-MNIST (Zalando, MIT licence: 70,000 real 28x28 gray product photos, 10 classes) as an ImageNet-style
tree for the packer, capped per class; the official split: its 60,000 training images give train/, its 10,000
test images val/.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist
    .venv/bin/python bench/fashion_mnist.py /tmp/fmnist/usr/share/datasets/fashion-mnist /tmp/fashion \\
        --train-per-class 500 --val-per-class 100
    .venv/bin/python tools/im2rec_multi.py /tmp/fashion --root /tmp/fashion-rec --sizes 32 40

(With the package installed by `apt-get install dataset-fashion-mnist`, the idx files are under
/usr/share/datasets/fashion-mnist.) Images are written as PNG (lossless: the packer's JPEG is the only
re-encoding); the first N of each class in file order are kept, so the tree is the same on every machine.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys

import numpy as np

CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str) -> np.ndarray:
    """An idx file (LeCun's MNIST format): magic (0, 0, dtype 0x08 = uint8, rank), big-endian dims, then data."""
    with gzip.open(path, "rb") as f:
        zero, dtype, rank = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {zero:#x} {dtype:#x})")
        shape = struct.unpack(f">{rank}I", f.read(4 * rank))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes for shape {shape}: the file is cut short")
    return data.reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, out: str, per_class: int) -> int:
    import cv2

    written = 0
    for label, name in enumerate(CLASSES):
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            if not cv2.imwrite(os.path.join(folder, f"{i:05d}.png"), images[i]):
                raise OSError(f"cannot write {os.path.join(folder, f'{i:05d}.png')}")
            written += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("idx_dir", help="folder holding the four idx .gz files")
    p.add_argument("out", help="image tree to write: OUT/{train,val}/<class>/*.png")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=100)
    args = p.parse_args(argv)
    caps = {"train": args.train_per_class, "val": args.val_per_class}
    if min(caps.values()) < 1:
        print("error: --train-per-class and --val-per-class must be >= 1", file=sys.stderr)
        return 2
    missing = [n for pair in FILES.values() for n in pair if not os.path.isfile(os.path.join(args.idx_dir, n))]
    if missing:
        print(f"error: {args.idx_dir!r} lacks {', '.join(missing)}: see this script's --help for where they are",
              file=sys.stderr)
        return 2
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(os.path.join(args.idx_dir, images_file))
        labels = read_idx(os.path.join(args.idx_dir, labels_file))
        if len(images) != len(labels):
            print(f"error: {images_file} has {len(images)} images and {labels_file} {len(labels)} labels",
                  file=sys.stderr)
            return 2
        n = write_split(images, labels, os.path.join(args.out, split), caps[split])
        print(f"{split}: {n} images of {len(images)} in {os.path.join(args.out, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
