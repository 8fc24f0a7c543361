"""The model folder: network, parameters, classes and model.json, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import sys

from gluon_imagenet import best as best_rule
from gluon_imagenet import checkpoint, retention
from gluon_imagenet.data.images import DEFAULT_CROP_FRACTION
from gluon_imagenet.data.packed import read_meta, resize_chain
from gluon_imagenet.export.choose import ExportError, pruned_error
from gluon_imagenet.rundir import RunDirError, RunRecord
from gluon_imagenet.sweep_eval.settings import EMA_EXT

# predict.MODEL_JSON, not imported from there: predict loads MXNet, and the errors found before any work should
# not wait for it. write_folder() loads the folder back through predict, so the two cannot drift apart.
MODEL_JSON = "model.json"


PREFIX = "model"  # model-symbol.json, model-0000.params


# ------------------------------------------------------------------------------------------------ preprocessing
def evaluation(run: RunRecord, ckpt: checkpoint.Checkpoint, rows: list[dict], best: dict | None,
               metric: str = "top1") -> tuple[int, str, float, dict | None]:
    """(crop size, packed data dir, crop fraction, sweep row or None) for the checkpoint: the --best row, else its
    best sweep result, else the recipe's evaluation size (resolved in run.json)."""
    sha = ckpt.record.params_sha256
    if best is not None and best.get("params_sha256", sha) != sha:
        raise ExportError(f"--best: the sweep's best result evaluated other parameters than {ckpt.name} holds now (the "
                          "checkpoint was rewritten since); re-run python -m gluon_imagenet.sweep_eval, or name a "
                          "checkpoint with --checkpoint")
    mine = [best] if best is not None else [r for r in rows if r.get("checkpoint") == ckpt.name]
    stale = [r for r in mine if r.get("params_sha256", sha) != sha]
    if stale:
        # The checkpoint was written again after the sweep (a re-trained run dir): its results are not this one's.
        print(f"warning: ignoring {len(stale)} sweep result(s) of {ckpt.name}: they evaluated other parameters "
              "(the checkpoint was rewritten since); re-run the sweep", file=sys.stderr)
        mine = [r for r in mine if r not in stale]
    if mine:
        row = best_rule.best_row(mine, metric)
        return int(row["image_size"]), str(row["data_dir"]), float(row.get("crop_fraction", DEFAULT_CROP_FRACTION)), row
    try:
        image_size, data_dir = run.evaluation_defaults()
    except RunDirError as e:
        raise ExportError(str(e)) from None
    return image_size, data_dir, DEFAULT_CROP_FRACTION, None


def ema_weights(ckpt: checkpoint.Checkpoint, row: dict) -> str:
    """The checkpoint's EMA weights file, checked to be the one the sweep result evaluated and intact."""
    from gluon_imagenet.sweep_eval.settings import ema_path, ema_problem, has_ema

    if not has_ema(ckpt.record):
        raise ExportError(f"the sweep's result for {ckpt.name} used EMA weights, but its record lists no {EMA_EXT} "
                          "now (the checkpoint was rewritten since); re-run python -m gluon_imagenet.sweep_eval")
    problem = ema_problem(ckpt)
    if problem:
        raise ExportError(f"{ckpt.name}'s EMA weights: {problem}; export its raw weights by re-running the sweep "
                          "with --weights raw, or name another checkpoint")
    if row.get("ema_sha256") not in (None, ckpt.record.files[EMA_EXT]["sha256"]):
        raise ExportError(f"the sweep evaluated other EMA weights of {ckpt.name} than it holds now (rewritten since); "
                          "re-run python -m gluon_imagenet.sweep_eval")
    return ema_path(ckpt)


def packer_settings(data_root: str, data_dir: str) -> dict:
    """How the packer made data_dir's validation images: the sizes it resized through, largest first, and JPEG
    quality.

    The packer resizes each image to its largest size first and every smaller one from the previous result
    (pack._convert), and records those sizes per split in pack.json (`chain`, read by packed.resize_chain).
    pack.json files from before it did have no chain: then the sizes are guessed (with a warning) as the data
    root's packed dirs with the same quality, mode and validation list as this one, at least as large."""
    meta = read_meta(os.path.join(data_root, data_dir))
    if not meta:
        # Packed by MXNet's im2rec, or the data root is gone: the folder name is the short side by convention.
        side = int(data_dir) if data_dir.isdigit() else None
        if side is None:
            raise ExportError(f"the packed short side of data dir {data_dir!r} is unknown: no "
                              f"{os.path.join(data_root, data_dir, 'pack.json')!r}; pass --data-root")
        print(f"warning: no {os.path.join(data_root, data_dir, 'pack.json')}: assuming short side {side} (the "
              "folder's name) and no JPEG re-encoding; pass --data-root if the packed data moved", file=sys.stderr)
        return {"packed_short_side": side, "packer_sizes": [side], "jpeg_quality": None, "pass_through": False}
    side, quality, through = meta["short_side"], meta.get("quality"), bool(meta.get("pass_through"))
    # The validation split's chain is the one predict must replay; the training split's when only it was packed.
    chain = resize_chain(data_root, data_dir, "val") or resize_chain(data_root, data_dir, "train")
    if chain is None:
        chain = _guessed_chain(data_root, side, quality, through, meta.get("splits", {}).get("val", {}))
        if len(chain) > 1:
            print(f"warning: {os.path.join(data_root, data_dir, 'pack.json')} does not record the sizes its images "
                  f"were resized through (packed by an older im2rec_multi): assuming {chain}, the larger packs of "
                  "this data root; re-pack with --force for an exact record", file=sys.stderr)
    return {"packed_short_side": side, "packer_sizes": chain, "jpeg_quality": None if through else quality,
            "pass_through": through}


def _guessed_chain(data_root: str, side: int, quality, through: bool, val: dict) -> list[int]:
    chain = {side}
    for name in os.listdir(data_root) if not through else []:
        other = read_meta(os.path.join(data_root, name))
        other_val = other.get("splits", {}).get("val", {})
        if (isinstance(other.get("short_side"), int) and other["short_side"] > side and other.get("quality") == quality
                and not other.get("pass_through") and (other_val.get("found"), other_val.get("seed"))
                == (val.get("found"), val.get("seed"))):
            chain.add(other["short_side"])
    return sorted(chain, reverse=True)


# ------------------------------------------------------------------------------------------------ writing
def out_dir_for(out: str | None, run_dir: str, name: str) -> str:
    """The model folder to write: `out` (--out) if given, else RUN_DIR/export/<checkpoint>; refused when it is
    something other than a model folder export wrote."""
    out = out or os.path.join(run_dir, "export", name)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MODEL_JSON)):
        kind = "folder" if os.path.isdir(out) else "file"
        raise ExportError(f"--out {out!r} is an existing {kind} that is not a model folder written by export; "
                          "nothing was replaced: choose another --out")
    return out


def write_folder(folder: str, run: RunRecord, ckpt: checkpoint.Checkpoint, image_size: int, preprocess: dict,
                 provenance: dict, with_onnx: bool = False, weights_path: str | None = None) -> None:
    """Build the network, load the checkpoint's weights (`weights_path`: its EMA weights; default its .params),
    run one forward pass, export; then check the folder loads."""
    import mxnet as mx
    import numpy as np

    from gluon_imagenet.data.iterators import MEAN_RGB, STD_RGB
    from gluon_imagenet.model import build_model
    from gluon_imagenet.predict import FORMAT, load

    classes = run.classes or []
    model = ckpt.record.model if ckpt.record.recorded("model") else run.model
    if ckpt.record.recorded("classes") and ckpt.record.classes != len(classes):
        raise ExportError(f"{ckpt.name} has {ckpt.record.classes} classes, run.json lists {len(classes)}")
    ctx = mx.cpu()
    net = build_model(model, len(classes))
    try:
        net.load_parameters(weights_path or ckpt.params_path, ctx=ctx)
    except mx.base.MXNetError:
        if retention.was_pruned(ckpt.json_path, True):  # deleted after it was verified
            raise pruned_error(ckpt.name) from None
        raise
    net.hybridize()
    # One forward pass builds the graph that export() writes; uint8 as the trainer feeds it.
    probe = mx.nd.array(np.random.default_rng(0).integers(0, 256, (2, 3, image_size, image_size)), ctx=ctx,
                        dtype="uint8")
    expected = net(probe).asnumpy()
    try:
        net.export(os.path.join(folder, PREFIX), epoch=0)
    except mx.base.MXNetError as e:  # MXNet's own writer: a full or read-only disk is an MXNetError, not OSError
        raise ExportError(f"cannot write the model folder's graph and parameters in {os.path.dirname(folder)!r} "
                          f"({last_line(e)}); free space or choose another --out; nothing was written") from None
    meta = {
        "format": FORMAT, "model": model,
        "symbol_file": f"{PREFIX}-symbol.json", "params_file": f"{PREFIX}-0000.params",
        # What predict checks the folder against: another run's parameters file of the same network, or classes
        # that do not match the network's outputs, would otherwise predict nonsense without a word.
        "outputs": int(expected.shape[1]), "params_sha256": checkpoint.sha256_of(os.path.join(folder, f"{PREFIX}-0000.params")),
        "input": {"name": "data", "shape": ["batch", 3, image_size, image_size], "dtype": "uint8", "layout": "NCHW",
                  "channels": "RGB", "normalisation": "inside the graph: (x - mean) / std per channel, 0-255 scale",
                  "mean": list(MEAN_RGB), "std": list(STD_RGB)},
        "output": "one score (logit) per class, in the order of 'classes'; softmax gives probabilities",
        "preprocess": preprocess, "classes": classes}
    with open(os.path.join(folder, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(folder, "provenance.json"), "w") as f:
        json.dump(dict(provenance, exported_with_mxnet=mx.__version__), f, indent=1)
    # The folder alone must reproduce the network: load it as a user would and compare.
    loaded, _ = load(folder, ctx)
    got = loaded(probe).asnumpy()
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the exported graph disagrees with the checkpoint (max difference "
                           f"{np.abs(got - expected).max():.3g})")
    if with_onnx:
        from gluon_imagenet.export import onnx_export

        # Two batch sizes: the ONNX batch dimension must really be dynamic.
        probes = [probe.asnumpy(), np.random.default_rng(1).integers(0, 256, (3, 3, image_size, image_size),
                                                                     dtype=np.uint8)]
        meta["onnx"] = onnx_export.write(folder, PREFIX, image_size, net, probes)
        with open(os.path.join(folder, MODEL_JSON), "w") as f:
            json.dump(meta, f, indent=1)


def last_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def install(temp: str, out: str) -> bool:
    """Rename the complete temporary folder to out; an older export there is replaced. True if replaced."""
    if not os.path.exists(out):
        os.rename(temp, out)
        return False
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(temp, out)
    except OSError:
        os.rename(old, out)  # put the older export back: never leave no model where there was one
        raise
    shutil.rmtree(old)
    return True
