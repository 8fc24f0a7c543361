"""The one chain an image goes through on its way into packed data: decoded by OpenCV, its short side resized
through the packed sizes (largest first, each from the previous result), JPEG-encoded. The packer (data/pack.py)
writes what it makes; predict.py runs the same chain on a photo (and decodes the JPEG again), so a prediction
sees the image distribution the network was trained and evaluated on, pixel for pixel.

Imports OpenCV and NumPy only: no MXNet, no training code.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import cv2
import numpy as np

# Centre crop / resized short side of an evaluation: the sweep's --crop-fraction default, the validation
# iterator's, and what export assumes for results written before the sweep recorded it.
DEFAULT_CROP_FRACTION = 0.875


def decode(data: bytes) -> np.ndarray | None:
    """An encoded image as 8-bit 3-channel BGR (IMREAD_COLOR turns grayscale, palette, CMYK, alpha and 16-bit
    images into it), or None when OpenCV cannot decode it."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return image


def short_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to size, aspect kept."""
    if h <= w:
        return size, max(1, round(w * size / h))
    return max(1, round(h * size / w)), size


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    new_h, new_w = short_side_shape(h, w, size)
    if (new_h, new_w) == (h, w):
        return image
    shrink = min(h, w) / size
    if shrink > 2:
        interpolation = cv2.INTER_AREA  # bilinear would skip pixels and alias
    elif shrink >= 1:
        interpolation = cv2.INTER_LINEAR
    else:
        interpolation = cv2.INTER_CUBIC  # enlarging a small image
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def resized_through(image: np.ndarray, sizes: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(size, the image resized to that short side) for each size in the order given, each from the previous
    result. The packer goes largest first: every step shrinks by a small factor, where bilinear is both fast and
    alias-free enough (INTER_AREA costs 5x more at non-integer factors)."""
    for size in sizes:
        image = resize_short_side(image, size)
        yield size, image


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def as_packed(image: np.ndarray, sizes: Iterable[int], jpeg_quality: int | None) -> np.ndarray:
    """The image as the packer stored it at the last of sizes (its chain, largest first), decoded again: resized
    through the sizes, then JPEG-encoded at jpeg_quality and decoded (None or 0: packed --pass-through, stored as
    given)."""
    for _, image in resized_through(image, sizes):
        pass  # each size is made from the one before: the last is the packed one
    if jpeg_quality:
        image = decode(encode_jpeg(image, jpeg_quality))
    return image
