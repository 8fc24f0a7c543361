"""The training input stream (data/iterators.py) through real ImageRecordIter: augmentation, shards, device, recipe settings."""
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

from conftest import run_tool
from gluon_imagenet.data.iterators import Augmentation, BatchStream, Shard, train_iterator
from gluon_imagenet.devices import Device
from gluon_imagenet.recipe import recipe_from_dict


def pack_tree(tmp_path, images_by_class, size):
    """Write {class: [image, ...]} as an ImageNet-style tree and pack it at one short side."""
    for split in ("train", "val"):
        for cls, images in images_by_class.items():
            os.makedirs(tmp_path / "src" / split / cls, exist_ok=True)
            for k, image in enumerate(images):
                cv2.imwrite(str(tmp_path / "src" / split / cls / f"{k:03d}.png"), image)
    root = str(tmp_path / "rec")
    proc = run_tool(["tools/im2rec_multi.py", str(tmp_path / "src"), "--root", root, "--sizes", str(size),
                     "--workers", "1"])
    assert proc.returncode == 0, proc.stderr
    return root


def textured(seed, shape=(64, 80)):
    """An image whose every crop and flip is distinguishable: smooth noise with a bright corner marker."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), shape[::-1], interpolation=cv2.INTER_CUBIC)
    image[:6, :6] = 255
    return image


@pytest.fixture(scope="module")
def identical_images(tmp_path_factory):
    """64 copies of one image: whatever differs between two of them in a batch is augmentation."""
    tmp = tmp_path_factory.mktemp("identical")
    return pack_tree(tmp, {"only": [textured(0)] * 64}, 64)


def take_batches(root, count, batch=8, threads=1, **kw):
    stream = BatchStream(train_iterator(root, "64", 32, batch, Shard(), 0, threads, **kw))
    return [data.asnumpy() for data, _ in stream.take(count)]


def test_augmentation_defaults_are_the_recipes():
    """An iterator made without a recipe augments as a recipe that leaves the fields out (Recipe owns them)."""
    minimal = recipe_from_dict({"phases": [{"epochs": [0, 1], "lr": [0.1, 0.1], "lr_method": "linear",
                                            "batch_size": 4, "image_size": 32, "data_dir": "64"}]})
    assert Augmentation() == Augmentation(minimal.min_random_area, minimal.aspect_ratio, minimal.mirror)


def test_augmentation_differs_across_positions_and_batches(identical_images):
    # Two passes over 64 identical images in batches of 8. With ImageRecordIter's seed_aug, the crop and flip of
    # position i were the same in every batch (the augmenter was re-seeded with the position).
    batches = take_batches(identical_images, 16)
    first = batches[0]
    assert len({first[i].tobytes() for i in range(8)}) == 8, "positions of one batch share an augmentation"
    for k, batch in enumerate(batches[1:], 1):
        same = [i for i in range(8) if np.array_equal(batch[i], first[i])]
        assert not same, f"batch {k} repeats batch 0's augmentation at positions {same}"


def test_no_augmentation_means_identical_crops(identical_images):
    # The check above can fail: with the crop fixed to the whole image and no mirroring, every crop is the same.
    batches = take_batches(identical_images, 2, augmentation=Augmentation(1.0, (1.25, 1.25), False))
    flat = np.concatenate(batches)
    assert all(np.array_equal(flat[0], image) for image in flat)


def test_mirror_off_never_flips(tmp_path):
    # An asymmetric image (a bright band left of the centre) and a crop that cannot vary (area 1, aspect 1: the
    # centre): mirrored copies have the band on the right.
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 12:18] = 255
    root = pack_tree(tmp_path, {"left": [image] * 16}, 64)
    for mirror, expect_flips in ((True, True), (False, False)):
        batches = take_batches(root, 4, batch=8, augmentation=Augmentation(1.0, (1.0, 1.0), mirror))
        left_bright = [b[..., :16].mean() > b[..., 16:].mean() for batch in batches for b in batch]
        assert (not all(left_bright)) == expect_flips, (mirror, left_bright)


def test_two_ranks_see_every_image_each_epoch(tmp_path):
    # 37 images, each its own class (label = identity), 2 ranks of batch 4: an epoch is ceil(37 / 8) = 5 steps.
    root = pack_tree(tmp_path, {f"c{k:02d}": [textured(k, (40, 40))] for k in range(37)}, 64)
    seen = {}
    for rank in (0, 1):
        stream = BatchStream(train_iterator(root, "64", 32, 4, Shard(rank, 2), 3, 1))
        seen[rank] = [int(x) for _, label in stream.take(5) for x in label.asnumpy()]
    # Each rank's pass over its shard is the labels before the first repeat (the shard then starts over).
    shard = {rank: labels[: next(i for i, x in enumerate(labels) if x in labels[:i])] for rank, labels in seen.items()}
    assert sorted(len(s) for s in shard.values()) == [18, 19], "shards are not an even split of the 37 images"
    assert not set(shard[0]) & set(shard[1]), "the shards overlap"
    assert set(seen[0]) | set(seen[1]) == set(range(37)), "some image was not seen in the epoch"


def test_batches_come_on_the_devices_own_memory(identical_images):
    # device_id -1 on a CPU: plain memory (a GPU rank passes its own GPU id, never the default 0).
    assert Device("cpu").iterator_device_id == -1 and Device("gpu", 3).iterator_device_id == 3
    stream = BatchStream(train_iterator(identical_images, "64", 32, 8, Shard(), 0, 1,
                                        device_id=Device("cpu").iterator_device_id))
    data, label = next(stream.take(1))
    assert data.context == mx.cpu(0) and label.context == mx.cpu(0)
    default = BatchStream(train_iterator(identical_images, "64", 32, 8, Shard(), 0, 1, device_id=0))
    assert next(default.take(1))[0].context == mx.cpu_pinned(0)  # what every rank got before
