"""One image of the tree to the packed JPEG bytes of every size, or the reason it is skipped (in the packer's workers)."""
from __future__ import annotations

import errno
import io
import os
import warnings
from dataclasses import dataclass

import cv2
from PIL import Image

from gluon_imagenet.data.images import decode, encode_jpeg, resized_through, short_side_shape
from gluon_imagenet.data.listing import LINE_BREAKERS, Item, is_utf8



# libjpeg(-turbo)'s JPEG_MAX_DIMENSION: OpenCV refuses to encode a wider or taller JPEG ("Maximum supported image
# dimension is 65500 pixels"), below the format's own 65535.
JPEG_MAX_SIDE = 65500


# Pillow's own decompression-bomb refusal threshold (2 x Image.MAX_IMAGE_PIXELS): about 540 MB once decoded to
# 8-bit BGR, per worker. Larger images are skipped before decoding, not left to exhaust memory.
MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class Settings:
    src: str
    sizes: tuple[int, ...]
    quality: int
    pass_through: bool


# ---------------------------------------------------------------------------------------------- one image
_settings: Settings | None = None


def init_worker(settings: Settings) -> None:
    global _settings
    _settings = settings
    cv2.setNumThreads(1)  # one process per core already


def encode_item(item: Item) -> tuple[dict[int, bytes] | None, str]:
    """Read and decode one image once; return ({size: record payload}, "") or (None, reason to skip).

    Never raises for a bad image: whatever goes wrong with one file (OpenCV errors, a failed encoding, memory
    for an absurd size) skips that file with the reason, as one exception escaping a worker would end the split.
    """
    s = _settings
    if item.skip:
        return None, item.skip
    if any(c in item.path for c in LINE_BREAKERS):
        return None, "file name holds a tab or line break, which the .lst cannot hold: rename the file"
    if not is_utf8(item.path):
        return None, "file name is not valid UTF-8 (the encoding of the .lst): rename the file"
    if item.label < 0:
        return None, "no label in the validation labels file"
    path = os.path.join(s.src, item.path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, _unreadable(path, e)
    except MemoryError:
        return None, "too large to read into memory"
    if not data:
        return None, "empty file"
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        return None, "truncated JPEG (no end-of-image marker)"
    too_large = _too_many_pixels(data)
    if too_large:
        return None, too_large
    try:
        return _convert(data, s)
    except (cv2.error, MemoryError, OSError, ValueError, RuntimeError, OverflowError) as e:
        # Not a bug of ours (those still end the run, loudly) but a file OpenCV cannot handle.
        return None, f"failed to convert: {type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"


def _convert(data: bytes, s: Settings) -> tuple[dict[int, bytes] | None, str]:
    image = decode(data)
    if image is None:
        return None, "not a decodable image"
    h, w = image.shape[:2]
    if s.pass_through:
        (size,) = s.sizes
        if min(h, w) != size:
            # Recorded as packed at `size`, it would pass the recipe's crop checks and be read at another size.
            return None, (f"{w}x{h} px: short side {min(h, w)}, not the {size} given to --pass-through --sizes "
                          "(resize it, or pack without --pass-through)")
        return {size: data}, ""
    for size in s.sizes:
        # Decided before resizing: the resize itself would succeed (and take gigabytes), only the encoding fails.
        new_h, new_w = short_side_shape(h, w, size)
        if max(new_h, new_w) > JPEG_MAX_SIDE:
            return None, (f"{w}x{h} px: resized to short side {size} it would be {new_w}x{new_h} px, beyond JPEG's "
                          f"limit of {JPEG_MAX_SIDE} px per side")
    # Largest size first, each smaller one from the previous result (images.resized_through says why).
    return {size: encode_jpeg(resized, s.quality)
            for size, resized in resized_through(image, sorted(s.sizes, reverse=True))}, ""


def _unreadable(path: str, error: OSError) -> str:
    # A symbolic link that leads nowhere is a listing mistake to fix at its source, so it gets a reason of its
    # own rather than the bare "No such file or directory" of a file that vanished.
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symbolic link (to {os.readlink(path)!r})"
    return f"unreadable: {error.strerror}"


def _too_many_pixels(data: bytes) -> str:
    """Why the image is too large to decode safely (read from its header by Pillow, no decoding), or "".
    Measured 0.3 ms for a 375x500 JPEG: about 3% of decoding, resizing and encoding it at two sizes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns above half its limit; our limit is the one that counts
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except Exception:  # noqa: BLE001 - a header Pillow cannot read: OpenCV decides (and may refuse) below
        return ""
    if width * height > MAX_PIXELS:
        return f"too large to decode safely: {width}x{height} px, over {MAX_PIXELS:,} px"
    return ""


def encode_indexed(args: tuple[int, Item]):
    position, item = args
    return position, encode_item(item)
