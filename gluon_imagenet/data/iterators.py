"""Input pipelines over packed RecordIO: training batches for one epoch of a phase, and validation batches.

Data modules build iterators and never touch the model. Batches are uint8 (the fastest ImageRecordIter output;
it refuses float16): the model casts and normalises them on the device.

One training iterator per phase (a new image size and batch size), read as an endless stream across the
phase's epochs. Not one per epoch: re-creating ImageRecordIter leaks about its prefetch buffers each time
(apache/mxnet#15218; measured here at 8-11 MiB per re-creation at 224 px, batch 16: bench/trainer_bench.py
switch), which at ImageNet batch sizes would be gigabytes over 40 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx

from gluon_imagenet.data.images import DEFAULT_CROP_FRACTION
from gluon_imagenet.data.packed import PackError, packed_count, read_classes, split_paths
from gluon_imagenet.recipe import Recipe

# ImageNet channel statistics, RGB, 0-255 scale: applied on the device by the model's input block.
MEAN_RGB = (123.68, 116.779, 103.939)
STD_RGB = (58.393, 57.12, 57.375)


class DataError(Exception):
    """Packed data missing or inconsistent; found before any work."""


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    parts: int = 1


def read_class_names(data_root: str) -> list[str]:
    """The class folder names in label order, as packed (ROOT/classes.txt)."""
    try:
        return read_classes(data_root)
    except PackError as e:
        raise DataError(str(e)) from None


def train_images_for(data_root: str, data_dirs) -> int:
    """The training set size; every phase's data dir must hold the same images (at another size)."""
    counts = {d: packed_count(data_root, d, "train") for d in sorted(set(data_dirs))}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{d}: {n}" for d, n in counts.items())
        raise DataError(f"the phases' data dirs hold different numbers of training images ({listed}); pack them "
                        "from the same tree in one im2rec_multi run")
    return next(iter(counts.values()))


@dataclass(frozen=True)
class Augmentation:
    """Random-resized crop and mirroring of training images (ImageRecordIter's own augmenter)."""
    # The defaults are the recipe's (recipe.Recipe owns them): an iterator made without a recipe augments alike.
    min_random_area: float = Recipe.min_random_area  # smallest crop, fraction of the image's area
    aspect_ratio: tuple[float, float] = Recipe.aspect_ratio  # range of the crop's width / height
    mirror: bool = Recipe.mirror  # random horizontal flips (off for digits, text, signs)


def train_iterator_kwargs(data_root: str, data_dir: str, image_size: int, batch_size: int, shard: Shard, seed: int,
                          threads: int, augmentation: Augmentation = Augmentation(), device_id: int = -1) -> dict:
    """ImageRecordIter's arguments for one phase: random-resized crop + mirror, shuffled, this rank's disjoint part.

    No `seed_aug`: it re-seeds each image's augmenter with its position in the batch + seed_aug
    (src/io/iter_image_recordio_2.cc), so every batch would repeat the same crops and flips by position.
    Without it each decode thread draws from its own stream, which goes on across batches and epochs. Those
    streams start from fixed seeds ((thread + 1) x a constant, the same file): `seed` shuffles the records but
    does not change the augmentation, and the k-th image of every rank gets the same crop and flip. MXNet offers
    no other way to seed them; the images themselves differ, so this only correlates the ranks' draws."""
    rec, idx = split_paths(data_root, data_dir, "train")
    return dict(
        path_imgrec=rec, path_imgidx=idx, data_shape=(3, image_size, image_size), batch_size=batch_size,
        dtype="uint8", shuffle=True, seed=seed,
        random_resized_crop=True,  # not together with rand_crop (they conflict)
        min_random_area=augmentation.min_random_area, max_random_area=1.0,
        min_aspect_ratio=augmentation.aspect_ratio[0], max_aspect_ratio=augmentation.aspect_ratio[1],
        rand_mirror=augmentation.mirror, num_parts=shard.parts, part_index=shard.rank, preprocess_threads=threads,
        round_batch=True,  # full batches only: a short last batch is completed from the next pass
        device_id=device_id,  # see devices.py: pinned buffers for the rank's own GPU, plain memory on a CPU
    )


def train_iterator(*args, **kwargs) -> mx.io.DataIter:
    return mx.io.ImageRecordIter(**train_iterator_kwargs(*args, **kwargs))


def val_iterator(data_root: str, data_dir: str, image_size: int, batch_size: int, threads: int,
                 crop_fraction: float = DEFAULT_CROP_FRACTION, device_id: int = -1) -> mx.io.DataIter:
    """Single center crop: resize the short side to image_size / crop_fraction, crop image_size."""
    rec, idx = split_paths(data_root, data_dir, "val")
    return mx.io.ImageRecordIter(
        path_imgrec=rec, path_imgidx=idx, data_shape=(3, image_size, image_size), batch_size=batch_size,
        dtype="uint8", shuffle=False, resize=int(round(image_size / crop_fraction)), rand_crop=False,
        rand_mirror=False, preprocess_threads=threads, device_id=device_id,
        round_batch=False,  # the last batch is filled with stale data: callers count real samples themselves
    )


def input_buffer_bytes(batch_size: int, image_size: int) -> int:
    """Host memory one training iterator holds in batches (pinned on a GPU machine): ImageRecordIter2 queues up
    to 16 decoded batches plus up to 4 waiting to be recycled and the one being filled (kMaxPrefetchBuffer in
    src/io/iter_image_recordio_2.cc), each uint8 images + float32 labels."""
    return 21 * batch_size * (3 * image_size * image_size + 4)


class BatchStream:
    """Endless batches from one iterator: a shard that runs out starts over, so every rank runs exactly the
    planned steps whatever the size of its shard (Horovod must not wait on a rank: apache/mxnet#17651)."""

    def __init__(self, iterator: mx.io.DataIter):
        self.iterator = iterator

    def _next(self):
        try:
            return self.iterator.next()
        except StopIteration:
            self.iterator.reset()
            return self.iterator.next()

    def skip(self, count: int) -> None:
        """Resume mid-epoch: drop the batches already trained in it."""
        for _ in range(count):
            self._next()

    def take(self, count: int):
        """The next `count` batches as (data, label)."""
        for _ in range(count):
            batch = self._next()
            yield batch.data[0], batch.label[0]
