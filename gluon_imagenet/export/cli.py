"""Export one checkpoint of a run as a self-contained model folder: MXNet graph + parameters, classes, input
size and preprocessing, and where it came from.

    python -m gluon_imagenet.export --run-dir runs/demo --best            # the sweep's best checkpoint
    python -m gluon_imagenet.export --run-dir runs/demo --checkpoint ckpt-00000360 --out models/demo
    python -m gluon_imagenet.export --run-dir runs/demo                   # the newest epoch checkpoint

--best ranks the sweep's results (RUN_DIR/sweep.json) with the sweep's own rule (gluon_imagenet.best): the
highest value of the metric the sweep ranked by (sweep.json's `ranked_by`: its target's metric; --by to choose),
then the other of top-1/top-5, then the earlier step. Only results on the run's own data root (or --data-root)
whose checkpoint still exists are ranked. Without --best or --checkpoint, the newest intact EPOCH checkpoint is
exported: the trainer's retention (--keep-mid-epoch) deletes mid-epoch checkpoints while it trains, so they are
exported only when named (or --best). A checkpoint deleted while export reads it is reported as pruned. The default
--out is RUN_DIR/export/<checkpoint>. The folder holds:

    model-symbol.json, model-0000.params   MXNet's HybridBlock.export: load with mx.gluon.SymbolBlock.imports
    model.json      classes, output count, parameters' SHA-256, input (uint8 RGB NCHW, normalised inside the
                    graph), size and preprocessing
    provenance.json run dir, checkpoint, step, epoch, recipe, sweep accuracy (top-5 marked meaningless with 5
                    classes or fewer), the data root and identity it was measured on, git revision, versions
    model.onnx      with --onnx: the same network for onnxruntime (see gluon_imagenet/export/onnx_export.py), checked
                    against MXNet's scores before the folder is installed

The input size, centre crop and weights are those of the sweep result that chose the checkpoint (--best: the best
(weights, setting) of all results; else the checkpoint's best result), else the recipe's evaluation size with a
0.875 crop and the raw weights. With EMA weights best, the exported network holds them; with flip best, model.json's
preprocess says flip: true and predict averages each image and its mirror. provenance.json records weights, scale
and flip. The folder is written
under a temporary name, checked by loading it back with SymbolBlock.imports, and renamed when complete; an
older export in the same place is replaced. Use it with python -m gluon_imagenet.predict OUT IMAGE...

Exit codes: 0 exported; 2 nothing written (no run.json, unknown, damaged or pruned checkpoint, --best without
sweep results on the data root, an --out that is not a model folder or cannot be written: read-only, full), with
the reason on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys

from gluon_imagenet import best as best_rule
from gluon_imagenet.export.choose import (ExportError, choose, current_identity, data_root_of, ranking_metric, read_run,
                                          read_sweep, usable_rows, verified)
from gluon_imagenet.export.folder import ema_weights, evaluation, install, out_dir_for, packer_settings, write_folder
from gluon_imagenet.export.options import ExportOptions
from gluon_imagenet.sweep_eval.settings import DEFAULT_SETTING, EMA_EXT, setting_of


def export(options: ExportOptions) -> str:
    run = read_run(options.run_dir)
    data_root = data_root_of(options.data_root, run)
    all_rows, ranked_by = read_sweep(options.run_dir)
    metric = ranking_metric(options.by, run, ranked_by)
    rows = usable_rows(options.run_dir, data_root, all_rows) if all_rows else []
    name, how, best = choose(options.run_dir, rows, metric, best=options.best, named=options.checkpoint)
    ckpt = verified(options.run_dir, name)
    out = out_dir_for(options.out, options.run_dir, name)
    if options.onnx:
        from gluon_imagenet.export.onnx_export import check_available
        from gluon_imagenet.onnx_runtime import OnnxUnavailable

        try:
            check_available()
        except OnnxUnavailable as e:
            raise ExportError(f"--onnx: {e}") from None
    image_size, data_dir, crop_fraction, row = evaluation(run, ckpt, rows, best, metric)
    scale, flip, weights = setting_of(row) if row else DEFAULT_SETTING
    weights_path = ema_weights(ckpt, row) if weights == "ema" else ckpt.params_path
    # flip cannot be inside a single-image graph: predict averages the image and its mirror when it is set.
    preprocess = dict(packer_settings(data_root, data_dir), data_dir=data_dir, crop=image_size,
                      crop_fraction=crop_fraction, resize=int(round(image_size / crop_fraction)),
                      interpolation="bilinear", flip=flip)
    top5_meaningful = best_rule.top5_meaningful(len(run.classes or []))
    accuracy = None if row is None else {k: row.get(k) for k in ("top1", "top5", "images", "image_size", "data_dir")}
    if accuracy:
        accuracy.update(crop_fraction=crop_fraction, top5_meaningful=top5_meaningful, data_root=row.get("data_root"),
                        data_identity=row.get("data_id"))
        if not top5_meaningful:
            accuracy["top5_note"] = (f"meaningless: with {len(run.classes)} classes top-5 is 100% for any network")
    provenance = {
        "run_dir": os.path.abspath(options.run_dir), "checkpoint": name, "chosen_by": how, "step": ckpt.step,
        "epoch": ckpt.record.epoch, "final": ckpt.record.final,
        "params_sha256": ckpt.record.params_sha256,
        "weights": weights, "eval_scale": scale, "flip": flip,
        "weights_sha256": ckpt.record.files[EMA_EXT if weights == "ema" else ".params"]["sha256"],
        "ema": ckpt.record.ema if weights == "ema" else None,
        "recipe": {"name": run.recipe.get("name"), "digest": run.recipe_digest, "file": run.recipe_file},
        "sweep_accuracy": accuracy, "data_root": data_root, "data_identity": current_identity(data_root, data_dir),
        "git_revision": run.git_revision, "versions": run.versions,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    replaced = write_and_install(out, lambda temp: write_folder(temp, run, ckpt, image_size, preprocess, provenance,
                                                                options.onnx, weights_path))
    top5 = f"{row['top5']:.2%}" if row and top5_meaningful else "n/a"
    top = f", sweep top-1 {row['top1']:.2%} top-5 {top5}" if row else ", not evaluated by a sweep"
    print(f"{name} (step {ckpt.step}, epoch {ckpt.record.epoch or 0:.2f}{top}) chosen by {how}")
    print(f"setting: {'EMA' if weights == 'ema' else 'raw'} weights, scale x{scale:g} ({image_size} px), "
          f"{'flip: predict averages each image and its mirror' if flip else 'no flip'}")
    print(f"{'replaced' if replaced else 'wrote'} {out}: input uint8 RGB NCHW {image_size}x{image_size} (short side "
          f"{preprocess['packed_short_side']} -> {preprocess['resize']}, centre crop), {len(run.classes or [])} classes")
    if options.onnx:
        from gluon_imagenet.export.onnx_export import OPSET, TOLERANCE

        print(f"also {os.path.join(out, 'model.onnx')} (opset {OPSET}, dynamic batch): onnxruntime's scores equal "
              f"MXNet's within {TOLERANCE:g} x the scores' scale")
    print(f"predict with: python -m gluon_imagenet.predict {out} IMAGE..." +
          (" (add --runtime onnx for onnxruntime)" if options.onnx else ""))
    return out


def write_and_install(out: str, write) -> bool:
    """write(temp folder), then install it as out. A folder that cannot be written (read-only, full) is one
    ExportError with nothing left behind. True if an older export was replaced."""
    parent = os.path.dirname(os.path.abspath(out))
    temp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    missing = []  # the parent folders this export creates, deepest first: removed again if it fails
    folder = parent
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(temp)
        write(temp)
        return install(temp, out)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in missing:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write the model folder {out!r}: {e.strerror or e}; free space or choose "
                              "another --out; nothing was written") from None
        raise


def parse_args(argv) -> ExportOptions:
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by gluon_imagenet.train")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="checkpoint name (ckpt-00000360) or step (360)")
    which.add_argument("--best", action="store_true", help="the sweep's best checkpoint: the highest METRIC, then "
                       "the other of top-1/top-5, then the earlier step (it got there sooner); only results on the "
                       "data root (see --data-root) of checkpoints still in RUN_DIR")
    p.add_argument("--by", choices=best_rule.METRICS, help="--best: METRIC to rank by (default: the one the sweep "
                   "ranked by, from sweep.json: its target's; top1 with 5 classes or fewer)")
    p.add_argument("--out", help="model folder to write (default: RUN_DIR/export/<checkpoint>)")
    p.add_argument("--data-root", help="packed data root: the packer's settings, and the sweep results --best ranks "
                   "(default: the run's, from run.json)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime")
    return ExportOptions(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        export(options)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
