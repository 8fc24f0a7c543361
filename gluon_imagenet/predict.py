"""Classify image files with a model folder written by gluon_imagenet.export.

    python -m gluon_imagenet.predict runs/demo/export/ckpt-00000360 photo.jpg more/*.jpg --top 3
    python -m gluon_imagenet.predict runs/demo/export/ckpt-00000360 images/*.jpg --json > predictions.json

Prints, for each image, its top classes with their probabilities (softmax of the network's scores); --json
prints one JSON object instead: {"model", "predictions": [{"image", "top": [{"class", "index",
"probability"}]}], "errors": [{"image", "error"}]}.

Each image is prepared exactly as the sweep evaluator saw a validation image, so the accuracy measured by the
sweep is the accuracy you get here (see prepare()).

Exit codes: 0 every image was predicted; 1 at least one image could not be read or decoded (each gets one
line on stderr; the others are still predicted and printed); 2 the model folder or the arguments are unusable.

Imports MXNet, NumPy, OpenCV and the packer's image chain (data/images.py) only, never the training code: the model
folder is all it needs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings

import cv2
import mxnet as mx
import numpy as np

# The packer's own image chain, so the resize and the JPEG step are the packer's by construction.
from gluon_imagenet.data.images import as_packed, decode

MODEL_JSON = "model.json"
FORMAT = "gluon_imagenet.export/1"
BATCH = 32  # images per forward pass


class ModelError(Exception):
    """The model folder cannot be used; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------ the folder
def read_model_json(model_dir: str) -> dict:
    path = os.path.join(model_dir, MODEL_JSON)
    if not os.path.isdir(model_dir):
        raise ModelError(f"model folder {model_dir!r} does not exist; write one with python -m "
                         "gluon_imagenet.export --run-dir RUN_DIR --best")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path!r} does not exist: {model_dir!r} is not a model folder written by "
                         "gluon_imagenet.export") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path!r} is unreadable ({e}); export the model again") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path!r} holds a {type(meta).__name__}, not an object; export the model again")
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path!r} has format {meta.get('format')!r}, this reader knows {FORMAT!r}")
    check_meta(meta, path)
    return meta


def check_meta(meta: dict, path: str) -> None:
    """What predict reads from model.json, checked before any work: each problem is one line, not a traceback."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        what = ("no 'classes'" if classes is None
                else f"'classes' that are a {type(classes).__name__}, not a list of names")
        raise ModelError(f"{path!r} has {what}; export the model again")
    if not classes:
        raise ModelError(f"{path!r} lists no classes ('classes': []); export the model again")
    for key, kind in (("input", dict), ("preprocess", dict), ("symbol_file", str), ("params_file", str)):
        if not isinstance(meta.get(key), kind):
            raise ModelError(f"{path!r} has no {key!r} {kind.__name__}; export the model again")
    outputs = meta.get("outputs")
    if outputs is not None and outputs != len(classes):
        raise ModelError(f"{path!r} lists {len(classes)} classes for the network's {outputs} outputs; export the "
                         "model again")
    missing = [key for key in ("outputs", "params_sha256") if key not in meta]
    if missing:
        print(f"warning: {path} records no {' and no '.join(missing)} (exported by an older version): the folder's "
              "parameters are not checked against it; export the model again to have them checked", file=sys.stderr)


def check_params(params_path: str, meta: dict) -> None:
    """The parameters file is the one exported with this model.json (another run's file of the same network would
    load and predict nonsense)."""
    expected = meta.get("params_sha256")
    if not expected:
        return
    digest = hashlib.sha256()
    with open(params_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelError(f"{params_path!r} is not the parameters file exported with its model.json (SHA-256 "
                         f"differs): another run's or a damaged file; export the model again")


def check_outputs(net, meta: dict, ctx) -> None:
    """The network scores exactly as many classes as model.json names (checked on one blank image)."""
    size = meta["input"].get("shape", [None, 3, 0, 0])[-1]
    if not isinstance(size, int) or size < 1:
        raise ModelError(f"model.json's input shape {meta['input'].get('shape')!r} has no image size; export the "
                         "model again")
    outputs = net(mx.nd.zeros((1, 3, size, size), ctx=ctx, dtype="uint8")).shape[-1]
    if outputs != len(meta["classes"]):
        raise ModelError(f"model.json lists {len(meta['classes'])} classes for the network's {outputs} outputs: the "
                         "folder mixes files of different exports; export the model again")


def load(model_dir: str, ctx: mx.Context | None = None):
    """(network, model.json contents): the network is MXNet's SymbolBlock over the exported graph."""
    meta = read_model_json(model_dir)
    files = [os.path.join(model_dir, meta[key]) for key in ("symbol_file", "params_file")]
    for path in files:
        if not os.path.isfile(path):
            raise ModelError(f"{path!r} is missing: the model folder is incomplete; export it again")
    ctx = ctx or mx.cpu()
    with warnings.catch_warnings():
        # The graph's input has no declared dtype ("Cannot decide type for ... data"); it is typed by the first
        # batch (uint8), so the warning says nothing to a user.
        warnings.simplefilter("ignore", UserWarning)
        try:
            net = mx.gluon.SymbolBlock.imports(files[0], [meta["input"]["name"]], files[1], ctx=ctx)
        except (mx.base.MXNetError, ValueError, AssertionError) as e:
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # MXNet: the last line
            raise ModelError(f"{model_dir!r} cannot be loaded ({why}); export the model again") from None
    check_params(files[1], meta)  # after loading: a file MXNet cannot read is "cannot be loaded"
    check_outputs(net, meta, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, meta


# ------------------------------------------------------------------------------------------------ one image
def prepare(image_bgr: np.ndarray, prep: dict) -> np.ndarray:
    """A decoded image (HxWx3 uint8 BGR, as cv2.imdecode gives it) -> the network's input (3xSxS uint8 RGB).

    1. The packer's step: the short side is resized to the packed size (through the same chain of sizes the
       packer went through) and, unless the data was packed --pass-through, JPEG-encoded at the packer's
       quality and decoded again. That is the image distribution the network was trained and evaluated on:
       without it a large photo would be resized once straight to the crop and look sharper, with other
       JPEG artefacts, than anything the network saw.
    2. ImageRecordIter's validation step (src/io/image_aug_default.cc, DefaultImageAugmenter::Process, with
       resize = round(crop / crop_fraction), rand_crop off, inter_method 1 = bilinear): the short side resized
       to `resize` with C integer arithmetic for the long side, then the centre crop, offsets (rows - S) / 2
       and (cols - S) / 2 rounded down. Then BGR -> RGB as iter_image_recordio_2.cc does (swap_indices).
    """
    image = as_packed(image_bgr, prep["packer_sizes"], prep["jpeg_quality"])  # largest first, as the packer
    crop, resize = prep["crop"], prep["resize"]
    rows, cols = image.shape[:2]
    if rows > cols:
        new_h, new_w = resize * rows // cols, resize
    else:
        new_h, new_w = resize, resize * cols // rows
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # A resize smaller than the crop (crop_fraction > 1) is enlarged once more, in float32 as MXNet does.
    rows, cols = image.shape[:2]
    if rows < crop:
        image = cv2.resize(image, (int(np.float32(crop) / np.float32(rows) * np.float32(cols)), crop),
                           interpolation=cv2.INTER_LINEAR)
    rows, cols = image.shape[:2]
    if cols < crop:
        image = cv2.resize(image, (crop, int(np.float32(crop) / np.float32(cols) * np.float32(rows))),
                           interpolation=cv2.INTER_LINEAR)
    rows, cols = image.shape[:2]
    y, x = (rows - crop) // 2, (cols - crop) // 2
    image = image[y:y + crop, x:x + crop, ::-1]
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def read_image(path: str) -> tuple[np.ndarray | None, str]:
    """(BGR image, "") or (None, why not). Decoded as the packer decodes (IMREAD_COLOR: grayscale, palette,
    alpha and 16-bit images become 8-bit BGR)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    if not data:
        return None, "empty file"
    image = decode(data)
    if image is None:
        return None, "not a decodable image"
    return image, ""


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=1, keepdims=True)


def predict(net, meta: dict, paths: list[str], top: int, ctx: mx.Context | None = None):
    """([(path, [(class index, probability)] best first)], [(path, error)])."""
    ctx = ctx or mx.cpu()
    results, errors = [], []
    for start in range(0, len(paths), BATCH):  # a batch at a time: any number of images in bounded memory
        ready = []
        for path in paths[start:start + BATCH]:
            image, why = read_image(path)
            if image is not None:
                try:
                    ready.append((path, prepare(image, meta["preprocess"])))
                    continue
                except (cv2.error, RuntimeError) as e:  # e.g. a 1 x 3000 px strip: 73 x 219000 px once resized
                    why = f"a {image.shape[1]}x{image.shape[0]} px image cannot be brought to the network's input " \
                          f"({str(e).strip().splitlines()[-1]})"
            errors.append((path, why))
        if not ready:
            continue
        batch = np.stack([x for _, x in ready])
        probs = softmax(scores(net, batch, ctx))
        if meta["preprocess"].get("flip"):  # chosen by the sweep: the mean of the image's and its mirror's softmax
            probs = (probs + softmax(scores(net, np.ascontiguousarray(batch[..., ::-1]), ctx))) / 2
        for (path, _), p in zip(ready, probs):
            best = np.argsort(-p, kind="stable")[:top]
            results.append((path, [(int(i), float(p[i])) for i in best]))
    return results, errors


def scores(net, batch: np.ndarray, ctx: mx.Context) -> np.ndarray:
    """The network's scores for a uint8 batch: MXNet's SymbolBlock, or onnx_runtime.OnnxClassifier (numpy in and out)."""
    if isinstance(net, mx.gluon.Block):
        return net(mx.nd.array(batch, ctx=ctx, dtype="uint8")).asnumpy()
    return net(batch)


def load_onnx(model_dir: str):
    """(onnxruntime classifier, model.json contents) for --runtime onnx."""
    from gluon_imagenet.onnx_runtime import OnnxClassifier, OnnxUnavailable, import_runtime

    meta = read_model_json(model_dir)
    entry = meta.get("onnx")
    path = os.path.join(model_dir, entry["file"]) if entry else None
    if path is None or not os.path.isfile(path):
        raise ModelError(f"{model_dir!r} holds no ONNX model: export it again with --onnx")
    try:
        import_runtime()
    except OnnxUnavailable as e:
        raise ModelError(f"--runtime onnx: {e}") from None
    try:
        return OnnxClassifier(path), meta
    except Exception as e:  # onnxruntime raises its own classes for a damaged file
        raise ModelError(f"{path!r} cannot be loaded by onnxruntime ({str(e).strip().splitlines()[-1]}); export "
                         "the model again with --onnx") from None


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="folder written by python -m gluon_imagenet.export")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ... anything OpenCV decodes)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--runtime", choices=("mxnet", "onnx"), default="mxnet",
                   help="mxnet (default), or onnx: model.onnx through onnxruntime (export --onnx), same preprocessing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.top < 1:
            raise ModelError(f"--top {args.top}: must be >= 1")
        net, meta = load_onnx(args.model_dir) if args.runtime == "onnx" else load(args.model_dir)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = meta["classes"]
    results, errors = predict(net, meta, args.images, min(args.top, len(classes)))
    for path, why in errors:
        print(f"error: {path}: {why}; not predicted", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "model": args.model_dir,
            "predictions": [{"image": path, "top": [{"class": classes[i], "index": i, "probability": p}
                                                    for i, p in best]} for path, best in results],
            "errors": [{"image": path, "error": why} for path, why in errors]}, indent=1))
    else:
        width = max(len(c) for c in classes)
        for path, best in results:
            print(path)
            for i, p in best:
                print(f"  {classes[i]:<{width}} {p:7.2%}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
