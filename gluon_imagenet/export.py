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
    model.onnx      with --onnx: the same network for onnxruntime (see gluon_imagenet/onnx_export.py), checked
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
import json
import os
import re
import shutil
import sys

from gluon_imagenet import best as best_rule
from gluon_imagenet import checkpoint, packed, retention
from gluon_imagenet.eval_settings import DEFAULT_CROP_FRACTION, DEFAULT_SETTING, EMA_EXT, setting_of
from gluon_imagenet.packed import read_meta, resize_chain
from gluon_imagenet.rundir import RunDirError, RunRecord
from gluon_imagenet.sweep_results import SWEEP_JSON, SweepResultsError, read_results

# predict.MODEL_JSON, not imported from there: predict loads MXNet, and the errors found before any work should
# not wait for it. write_folder() loads the folder back through predict, so the two cannot drift apart.
MODEL_JSON = "model.json"
PREFIX = "model"  # model-symbol.json, model-0000.params


class ExportError(Exception):
    """Nothing can be exported; the message names the bad value and the fix."""


# ------------------------------------------------------------------------------------------------ reading the run
def read_run(run_dir: str) -> RunRecord:
    """run.json, checked as the sweep checks it (rundir: one reader of the run's record)."""
    try:
        return RunRecord.read(run_dir)
    except RunDirError as e:
        raise ExportError(str(e)) from None


def read_sweep(run_dir: str) -> tuple[list[dict], str | None]:
    """(every result in RUN_DIR/sweep.json, the metric the sweep ranked by); ([], None) before any sweep. Read
    and checked by the sweep's own reader (sweep_results)."""
    try:
        read = read_results(run_dir)
    except SweepResultsError as e:
        raise ExportError(str(e)) from None
    return list(read.results.values()), read.ranked_by


def data_root_of(args, run: RunRecord) -> str:
    return os.path.abspath(args.data_root or run.data_root or "recordio")


def current_identity(data_root: str, data_dir: str) -> str | None:
    try:
        return packed.data_identity(data_root, data_dir, "val")
    except OSError:  # the packed data is not there (moved, or another machine): nothing to compare
        return None


def usable_rows(args, run: RunRecord, rows: list[dict]) -> list[dict]:
    """The results export may use: measured on the run's data root (or --data-root) as it is now, of checkpoints
    still in the run dir. What is left out is said, in one line per reason."""
    root = data_root_of(args, run)
    elsewhere = sorted({str(r.get("data_root")) for r in rows if r.get("data_root") != root})
    mine = [r for r in rows if r.get("data_root") == root]
    changed = [r for r in mine if r.get("data_id") not in (None, current_identity(root, r["data_dir"]))
               and current_identity(root, r["data_dir"]) is not None]
    mine = [r for r in mine if r not in changed]
    gone = sorted({r["checkpoint"] for r in mine
                   if not os.path.isfile(os.path.join(args.run_dir, r["checkpoint"] + ".json"))})
    if elsewhere:
        print(f"note: ignoring {len(rows) - len(mine) - len(changed)} sweep result(s) on other data roots "
              f"({', '.join(elsewhere)}); pass --data-root to use those", file=sys.stderr)
    if changed:
        print(f"warning: ignoring {len(changed)} sweep result(s) on {root}: its packed validation data changed since "
              "they were measured; re-run the sweep", file=sys.stderr)
    if gone:
        print(f"note: ignoring the sweep results of {len(gone)} checkpoint(s) no longer in {args.run_dir} (deleted or "
              f"pruned by the trainer's retention): {', '.join(gone)}", file=sys.stderr)
    return [r for r in mine if r["checkpoint"] not in gone]


def ranking_metric(args, run: RunRecord, ranked_by: str | None) -> str:
    classes = len(run.classes or [])
    metric = args.by or ranked_by or best_rule.default_metric(classes)
    if metric == "top5" and not best_rule.top5_meaningful(classes):
        if args.by:
            raise ExportError(f"--by top5: the run has {classes} classes, so top-5 is 100% for any "
                              "network and ranks nothing; use --by top1")
        metric = "top1"
    return metric


def checkpoint_names(run_dir: str) -> list[str]:
    """Names of the checkpoint records in the run (nothing verified: cheap)."""
    return sorted(n[: -len(".json")] for n in os.listdir(run_dir) if checkpoint.NAME.match(n))


def choose(args, rows: list[dict], metric: str) -> tuple[str, str, dict | None]:
    """(checkpoint name, how it was chosen, the sweep result that chose it with --best); rows: usable_rows."""
    if args.best:
        if not rows:
            raise ExportError(f"--best: {os.path.join(args.run_dir, SWEEP_JSON)!r} holds no results on this data "
                              f"root whose checkpoint still exists; evaluate the checkpoints first (python -m "
                              f"gluon_imagenet.sweep_eval --run-dir {args.run_dir}) or name one with --checkpoint")
        chosen = best_rule.best_row(rows, metric)
        return chosen["checkpoint"], f"--best: {best_rule.describe(metric)} of the sweep's results", chosen
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
    newest, damaged, mid_epoch = newest_epoch_checkpoint(args.run_dir)
    for name, why in damaged:
        print(f"skipping {name}: {why}", file=sys.stderr)
    if newest is not None:
        newer = [n for n in mid_epoch if n > newest.name]
        note = f"; newer mid-epoch ones ({', '.join(newer)}) only when named with --checkpoint" if newer else ""
        return newest.name, f"the newest epoch checkpoint (neither --checkpoint nor --best given{note})", None
    if mid_epoch:
        raise ExportError(f"no epoch checkpoint in {args.run_dir!r} yet, only mid-epoch ones ({', '.join(mid_epoch)}), "
                          "which the trainer's retention may delete while they are read: name one with --checkpoint, "
                          "or wait for the first epoch to end")
    raise ExportError(f"no intact checkpoint in {args.run_dir!r}")


def newest_epoch_checkpoint(run_dir: str) -> tuple[checkpoint.Checkpoint | None, list[tuple[str, str]], list[str]]:
    """(the newest intact epoch checkpoint, [(name, problem)] of damaged ones newer than it, the mid-epoch names
    seen). Epoch checkpoints are never pruned by the trainer's retention, so the one chosen stays while read."""
    damaged, mid_epoch = [], []
    for name, record_path in reversed(checkpoint.candidates(run_dir)):
        if record_path is None:
            continue  # being saved, or being pruned (retention deletes the record first)
        try:
            is_mid = checkpoint.read_record(record_path).is_mid_epoch
        except FileNotFoundError:
            continue  # pruned since it was listed
        except (OSError, ValueError, TypeError, AttributeError) as e:
            damaged.append((name, f"unreadable record ({e})"))
            continue
        if is_mid:
            mid_epoch.append(name)
            continue
        ckpt, why = checkpoint.check(name, record_path, required_only=True)  # EMA weights: ema_weights checks
        if ckpt:
            return ckpt, damaged, sorted(mid_epoch)
        damaged.append((name, why))
    return None, damaged, sorted(mid_epoch)


def pruned_error(name: str) -> ExportError:
    return ExportError(f"{name} was {retention.PRUNED} while export read it; export an epoch checkpoint (the "
                       "default, which retention keeps) or a newer mid-epoch one")


def verified(run_dir: str, name: str) -> checkpoint.Checkpoint:
    record_path = os.path.join(run_dir, name + ".json")
    ckpt, why = checkpoint.problem(record_path, required_only=True)  # EMA weights: ema_weights checks them
    if ckpt is None:
        if retention.was_pruned(record_path, True):
            raise pruned_error(name)
        others = [n for n in checkpoint_names(run_dir) if n != name]
        raise ExportError(f"{name} in {run_dir!r} cannot be exported: {why}; choose another with --checkpoint "
                          f"({', '.join(others) or 'no other checkpoint'})")
    return ckpt


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
    from gluon_imagenet.eval_settings import ema_path, ema_problem, has_ema

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
def out_dir_for(args, name: str) -> str:
    out = args.out or os.path.join(args.run_dir, "export", name)
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

    from gluon_imagenet.data import MEAN_RGB, STD_RGB
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
        from gluon_imagenet import onnx_export

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


def export(args) -> str:
    run = read_run(args.run_dir)
    all_rows, ranked_by = read_sweep(args.run_dir)
    metric = ranking_metric(args, run, ranked_by)
    rows = usable_rows(args, run, all_rows) if all_rows else []
    name, how, best = choose(args, rows, metric)
    ckpt = verified(args.run_dir, name)
    out = out_dir_for(args, name)
    if args.onnx:
        from gluon_imagenet.onnx_export import OnnxUnavailable, check_available

        try:
            check_available()
        except OnnxUnavailable as e:
            raise ExportError(f"--onnx: {e}") from None
    image_size, data_dir, crop_fraction, row = evaluation(run, ckpt, rows, best, metric)
    scale, flip, weights = setting_of(row) if row else DEFAULT_SETTING
    weights_path = ema_weights(ckpt, row) if weights == "ema" else ckpt.params_path
    data_root = data_root_of(args, run)
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
        "run_dir": os.path.abspath(args.run_dir), "checkpoint": name, "chosen_by": how, "step": ckpt.step,
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
                                                                args.onnx, weights_path))
    top5 = f"{row['top5']:.2%}" if row and top5_meaningful else "n/a"
    top = f", sweep top-1 {row['top1']:.2%} top-5 {top5}" if row else ", not evaluated by a sweep"
    print(f"{name} (step {ckpt.step}, epoch {ckpt.record.epoch or 0:.2f}{top}) chosen by {how}")
    print(f"setting: {'EMA' if weights == 'ema' else 'raw'} weights, scale x{scale:g} ({image_size} px), "
          f"{'flip: predict averages each image and its mirror' if flip else 'no flip'}")
    print(f"{'replaced' if replaced else 'wrote'} {out}: input uint8 RGB NCHW {image_size}x{image_size} (short side "
          f"{preprocess['packed_short_side']} -> {preprocess['resize']}, centre crop), {len(run.classes or [])} classes")
    if args.onnx:
        from gluon_imagenet.onnx_export import OPSET, TOLERANCE

        print(f"also {os.path.join(out, 'model.onnx')} (opset {OPSET}, dynamic batch): onnxruntime's scores equal "
              f"MXNet's within {TOLERANCE:g} x the scores' scale")
    print(f"predict with: python -m gluon_imagenet.predict {out} IMAGE..." +
          (" (add --runtime onnx for onnxruntime)" if args.onnx else ""))
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


def parse_args(argv):
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
