"""Export one checkpoint of a run as a self-contained model folder: MXNet graph + parameters, classes, input
size and preprocessing, and where it came from.

    python -m gluon_imagenet.export --run-dir runs/demo --best            # the sweep's best checkpoint
    python -m gluon_imagenet.export --run-dir runs/demo --checkpoint ckpt-00000360 --out models/demo
    python -m gluon_imagenet.export --run-dir runs/demo                   # the newest intact checkpoint

--best ranks the sweep's results (RUN_DIR/sweep.json) by top-1, then top-5, then the later step. The default
--out is RUN_DIR/export/<checkpoint>. The folder holds:

    model-symbol.json, model-0000.params   MXNet's HybridBlock.export: load with mx.gluon.SymbolBlock.imports
    model.json      classes, input (uint8 RGB NCHW, normalised inside the graph), size and preprocessing
    provenance.json run dir, checkpoint, step, epoch, recipe, sweep accuracy, git revision, versions
    model.onnx      with --onnx: the same network for onnxruntime (see gluon_imagenet/onnx_export.py), checked
                    against MXNet's scores before the folder is installed

The input size and centre crop are those of the sweep result that evaluated the checkpoint (the best one when
it was evaluated at several sizes), else the recipe's evaluation size with a 0.875 crop. The folder is written
under a temporary name, checked by loading it back with SymbolBlock.imports, and renamed when complete; an
older export in the same place is replaced. Use it with python -m gluon_imagenet.predict OUT IMAGE...

Exit codes: 0 exported; 2 nothing written (no run.json, unknown or damaged checkpoint, --best without sweep
results, an --out that is not a model folder), with the reason on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys

from gluon_imagenet import checkpoint
from gluon_imagenet.packed import read_meta

# predict.MODEL_JSON, not imported from there: predict loads MXNet, and the errors found before any work should
# not wait for it. write_folder() loads the folder back through predict, so the two cannot drift apart.
MODEL_JSON = "model.json"
DEFAULT_CROP_FRACTION = 0.875  # the sweep's default; rows written before it was recorded used it
PREFIX = "model"  # model-symbol.json, model-0000.params


class ExportError(Exception):
    """Nothing can be exported; the message names the bad value and the fix."""


# ------------------------------------------------------------------------------------------------ reading the run
def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path!r} is unreadable ({e}): {what}") from None


def read_run(run_dir: str) -> dict:
    """run.json, checked as the sweep checks it (one reader of the run's record)."""
    from gluon_imagenet.sweep_eval import SweepError
    from gluon_imagenet.sweep_eval import read_run as read_checked

    try:
        return read_checked(run_dir)
    except SweepError as e:
        raise ExportError(str(e)) from None


def sweep_rows(run_dir: str) -> list[dict]:
    """Every result in RUN_DIR/sweep.json (none when there is no sweep yet)."""
    path = os.path.join(run_dir, "sweep.json")
    if not os.path.isfile(path):
        return []
    results = read_json(path, "re-run python -m gluon_imagenet.sweep_eval to rebuild it").get("results", {})
    return list(results.values())


def rank_key(row: dict):
    """Best first by top-1, then top-5; the later step wins a tie (it trained longer)."""
    return row["top1"], row["top5"], row["step"]


def checkpoint_names(run_dir: str) -> list[str]:
    """Names of the checkpoint records in the run (nothing verified: cheap)."""
    return sorted(n[: -len(".json")] for n in os.listdir(run_dir) if checkpoint.NAME.match(n))


def choose(args, rows: list[dict]) -> tuple[str, str, dict | None]:
    """(checkpoint name, how it was chosen, the sweep result that chose it with --best)."""
    if args.best:
        if not rows:
            raise ExportError(f"--best: {os.path.join(args.run_dir, 'sweep.json')!r} holds no results; evaluate the "
                              f"checkpoints first (python -m gluon_imagenet.sweep_eval --run-dir {args.run_dir}) or "
                              "name one with --checkpoint")
        best = max(rows, key=rank_key)
        return best["checkpoint"], "--best: the sweep's highest top-1, then top-5, then the later step", best
    names = checkpoint_names(args.run_dir)
    if args.checkpoint:
        wanted = args.checkpoint
        if wanted.isdigit():
            wanted = os.path.basename(checkpoint.prefix_for("", int(wanted)))
        wanted = re.sub(r"\.(json|params|states)$", "", os.path.basename(wanted))
        if wanted not in names:
            listed = ", ".join(names) if names else "none"
            raise ExportError(f"--checkpoint {args.checkpoint!r} is not in {args.run_dir!r}; available: {listed}")
        return wanted, "--checkpoint", None
    newest, damaged = checkpoint.newest_intact(args.run_dir)
    for name, why in damaged:
        print(f"skipping {name}: {why}", file=sys.stderr)
    if newest is None:
        raise ExportError(f"no intact checkpoint in {args.run_dir!r}")
    return newest.name, "the newest intact checkpoint (neither --checkpoint nor --best given)", None


def verified(run_dir: str, name: str) -> checkpoint.Checkpoint:
    ckpt, why = checkpoint.problem(os.path.join(run_dir, name + ".json"))
    if ckpt is None:
        others = [n for n in checkpoint_names(run_dir) if n != name]
        raise ExportError(f"{name} in {run_dir!r} cannot be exported: {why}; choose another with --checkpoint "
                          f"({', '.join(others) or 'no other checkpoint'})")
    return ckpt


# ------------------------------------------------------------------------------------------------ preprocessing
def evaluation(run: dict, ckpt: checkpoint.Checkpoint, rows: list[dict],
               best: dict | None) -> tuple[int, str, float, dict | None]:
    """(crop size, packed data dir, crop fraction, sweep row or None) for the checkpoint: the --best row, else its
    best sweep result, else the recipe's evaluation size."""
    sha = ckpt.record["files"][".params"]["sha256"]
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
        row = max(mine, key=rank_key)
        return int(row["image_size"]), str(row["data_dir"]), float(row.get("crop_fraction", DEFAULT_CROP_FRACTION)), row
    from gluon_imagenet.sweep_eval import SweepError, run_recipe

    try:
        recipe = run_recipe(run)  # the recipe's own rule for its evaluation defaults
    except SweepError as e:
        raise ExportError(str(e)) from None
    return recipe.resolved_eval_image_size, recipe.resolved_eval_data_dir, DEFAULT_CROP_FRACTION, None


def packer_settings(data_root: str, data_dir: str) -> dict:
    """How the packer made data_dir's images: the sizes it resized through, largest first, and JPEG quality.

    The packer resizes each image to its largest size first and every smaller one from the previous result
    (pack.encode_item). pack.json does not record which sizes were packed together, so they are taken to be
    the data root's packed dirs with the same quality, mode and validation list as this one, at least as large."""
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
    val = meta.get("splits", {}).get("val", {})
    chain = {side}
    for name in os.listdir(data_root) if not through else []:
        other = read_meta(os.path.join(data_root, name))
        other_val = other.get("splits", {}).get("val", {})
        if (isinstance(other.get("short_side"), int) and other["short_side"] > side and other.get("quality") == quality
                and not other.get("pass_through") and (other_val.get("found"), other_val.get("seed"))
                == (val.get("found"), val.get("seed"))):
            chain.add(other["short_side"])
    return {"packed_short_side": side, "packer_sizes": sorted(chain, reverse=True),
            "jpeg_quality": None if through else quality, "pass_through": through}


# ------------------------------------------------------------------------------------------------ writing
def out_dir_for(args, name: str) -> str:
    out = args.out or os.path.join(args.run_dir, "export", name)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MODEL_JSON)):
        kind = "folder" if os.path.isdir(out) else "file"
        raise ExportError(f"--out {out!r} is an existing {kind} that is not a model folder written by export; "
                          "nothing was replaced: choose another --out")
    return out


def write_folder(folder: str, run: dict, ckpt: checkpoint.Checkpoint, image_size: int, preprocess: dict,
                 provenance: dict, with_onnx: bool = False) -> None:
    """Build the network, load the checkpoint, run one forward pass, export; then check the folder loads."""
    import mxnet as mx
    import numpy as np

    from gluon_imagenet.data import MEAN_RGB, STD_RGB
    from gluon_imagenet.model import build_model
    from gluon_imagenet.predict import FORMAT, load

    classes = run["classes"]
    model = ckpt.record.get("model", run["model"])
    if ckpt.record.get("classes", len(classes)) != len(classes):
        raise ExportError(f"{ckpt.name} has {ckpt.record['classes']} classes, run.json lists {len(classes)}")
    ctx = mx.cpu()
    net = build_model(model, len(classes))
    net.load_parameters(ckpt.params_path, ctx=ctx)
    net.hybridize()
    # One forward pass builds the graph that export() writes; uint8 as the trainer feeds it.
    probe = mx.nd.array(np.random.default_rng(0).integers(0, 256, (2, 3, image_size, image_size)), ctx=ctx,
                        dtype="uint8")
    expected = net(probe).asnumpy()
    net.export(os.path.join(folder, PREFIX), epoch=0)
    meta = {
        "format": FORMAT, "model": model,
        "symbol_file": f"{PREFIX}-symbol.json", "params_file": f"{PREFIX}-0000.params",
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
        from gluon_imagenet import onnx_export

        # Two batch sizes: the ONNX batch dimension must really be dynamic.
        probes = [probe.asnumpy(), np.random.default_rng(1).integers(0, 256, (3, 3, image_size, image_size),
                                                                     dtype=np.uint8)]
        meta["onnx"] = onnx_export.write(folder, PREFIX, image_size, net, probes)
        with open(os.path.join(folder, MODEL_JSON), "w") as f:
            json.dump(meta, f, indent=1)


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


def export(args) -> str:
    run = read_run(args.run_dir)
    rows = sweep_rows(args.run_dir)
    name, how, best = choose(args, rows)
    ckpt = verified(args.run_dir, name)
    out = out_dir_for(args, name)
    if args.onnx:
        from gluon_imagenet.onnx_export import OnnxUnavailable, check_available

        try:
            check_available()
        except OnnxUnavailable as e:
            raise ExportError(f"--onnx: {e}") from None
    image_size, data_dir, crop_fraction, row = evaluation(run, ckpt, rows, best)
    data_root = args.data_root or (row or {}).get("data_root") or run.get("data_root") or "recordio"
    preprocess = dict(packer_settings(data_root, data_dir), data_dir=data_dir, crop=image_size,
                      crop_fraction=crop_fraction, resize=int(round(image_size / crop_fraction)),
                      interpolation="bilinear")
    accuracy = None if row is None else {k: row.get(k) for k in ("top1", "top5", "images", "image_size", "data_dir")}
    if accuracy:
        accuracy["crop_fraction"] = crop_fraction
    provenance = {
        "run_dir": os.path.abspath(args.run_dir), "checkpoint": name, "chosen_by": how, "step": ckpt.step,
        "epoch": ckpt.record.get("epoch"), "final": ckpt.record.get("final"),
        "params_sha256": ckpt.record["files"][".params"]["sha256"],
        "recipe": {"name": run["recipe"].get("name"), "digest": run.get("recipe_digest"),
                   "file": run.get("recipe_file")},
        "sweep_accuracy": accuracy, "git_revision": run.get("git_revision"), "versions": run.get("versions"),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    os.makedirs(temp)
    try:
        write_folder(temp, run, ckpt, image_size, preprocess, provenance, args.onnx)
        replaced = install(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    top = f", sweep top-1 {row['top1']:.2%} top-5 {row['top5']:.2%}" if row else ", not evaluated by a sweep"
    print(f"{name} (step {ckpt.step}, epoch {ckpt.record.get('epoch', 0):.2f}{top}) chosen by {how}")
    print(f"{'replaced' if replaced else 'wrote'} {out}: input uint8 RGB NCHW {image_size}x{image_size} (short side "
          f"{preprocess['packed_short_side']} -> {preprocess['resize']}, centre crop), {len(run['classes'])} classes")
    if args.onnx:
        from gluon_imagenet.onnx_export import OPSET, TOLERANCE

        print(f"also {os.path.join(out, 'model.onnx')} (opset {OPSET}, dynamic batch): onnxruntime's scores equal "
              f"MXNet's within {TOLERANCE:g} x the scores' scale")
    print(f"predict with: python -m gluon_imagenet.predict {out} IMAGE..." +
          (" (add --runtime onnx for onnxruntime)" if args.onnx else ""))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by gluon_imagenet.train")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="checkpoint name (ckpt-00000360) or step (360)")
    which.add_argument("--best", action="store_true", help="the sweep's best checkpoint (top-1, then top-5)")
    p.add_argument("--out", help="model folder to write (default: RUN_DIR/export/<checkpoint>)")
    p.add_argument("--data-root", help="packed data root, for the packer's settings (default: the run's, from "
                   "run.json)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
