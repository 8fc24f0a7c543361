"""The recipe's packed data, the run dir and the disk."""
from __future__ import annotations

import os
import shutil
from typing import Callable

from gluon_imagenet.train.probes import Result

# Checkpoint files hold float32 values: parameters (network) + one momentum buffer per trainable parameter (NAG).
BYTES_PER_VALUE = 4


CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # names, headers, the .json record: far less than 1 MiB


# ------------------------------------------------------------------------------------------------ data
def load_recipe_file(recipe_path: str) -> tuple[object, list[Result]]:
    """(the recipe, []) or (None, [the one failure]): the file itself, before any packed data is looked at."""
    from gluon_imagenet.recipe import load_recipe
    from gluon_imagenet.recipe_fields import RecipeError

    try:
        return load_recipe(recipe_path), []
    except RecipeError as e:
        fix = ("give the path of a recipe file, e.g. --recipe recipes/imagenet104.yaml" if not
               os.path.isfile(recipe_path) else "fix that field of the recipe (docs/recipes.md lists the fields and "
                                                "what they allow)")
        return None, [Result("failure", "recipe", str(e), fix)]


def check_data(recipe_path: str, data_root: str) -> tuple[list[Result], list[str] | None]:
    """(results, the class names or None) for a recipe that loads: its packed data by packed.check_for, the
    trainer's own check, with the evaluation split the sweep reads, then the first record of each split
    decoded."""
    from gluon_imagenet.data.packed import check_for

    recipe, failures = load_recipe_file(recipe_path)
    if recipe is None:
        return failures, None
    problems = check_for(recipe, data_root, eval_split=True)
    if problems:
        return [Result("failure", "data", problem.detail, problem.fix) for problem in problems], None
    try:
        from gluon_imagenet.data.iterators import DataError, read_class_names, train_images_for

        classes = read_class_names(data_root)
        images = train_images_for(data_root, [p.data_dir for p in recipe.phases])
    except (DataError, OSError, ValueError) as e:
        return [Result("failure", "data", str(e), "re-pack with tools/im2rec_multi.py")], None
    out = []
    dirs = [(d, "train") for d in sorted({p.data_dir for p in recipe.phases})]
    dirs.append((recipe.resolved_eval_data_dir, "val"))
    for data_dir, split in dirs:
        problem = _first_record_problem(data_root, data_dir, split)
        if problem:
            out.append(Result("failure", f"data {data_dir}/{split}", problem, "re-pack with tools/im2rec_multi.py "
                                                                              "(--verify checks a pack)"))
    if not out:
        out.append(Result("ok", "data", f"{recipe_path}: {len(classes)} classes, {images:,} training images; "
                                        f"{', '.join(f'{d}/{s}.rec' for d, s in dirs)} checked as the trainer "
                                        "checks them, first records decoded"))
    return out, classes


def _first_record_problem(data_root: str, data_dir: str, split: str) -> str:
    """Read and decode the first image of a packed split: "" or what is wrong."""
    import mxnet as mx

    from gluon_imagenet.data.packed import split_paths

    rec, idx = split_paths(data_root, data_dir, split)
    try:
        reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
        try:
            if not reader.keys:
                return f"{idx} lists no record"
            header, image = mx.recordio.unpack_img(reader.read_idx(reader.keys[0]))
        finally:
            reader.close()
    except Exception as e:
        return f"cannot read {rec}: {type(e).__name__}: {e}"
    if image is None or getattr(image, "ndim", 0) != 3:
        return f"the first record of {rec} does not decode to a colour image"
    return ""


# ------------------------------------------------------------------------------------------------ disk
def checkpoint_bytes(model: str, classes: int) -> int:
    """Bytes one checkpoint takes: every network value (weights, BatchNorm statistics) in .params, plus one NAG
    momentum buffer per trainable value in .states, float32, plus headers and the record. The network is built
    (not trained) on the CPU to count them."""
    import mxnet as mx

    from gluon_imagenet.model import build_model, initialize

    net = build_model(model, classes)
    initialize(net, mx.cpu())
    net(mx.nd.zeros((1, 3, 32, 32), dtype="uint8"))  # deferred shapes
    params = net.collect_params()
    total = sum(p.data().size for p in params.values())
    trainable = sum(p.data().size for p in params.values() if p.grad_req != "null")
    return (total + trainable) * BYTES_PER_VALUE + CHECKPOINT_OVERHEAD_BYTES


def check_run_dir(run_dir: str) -> list[Result]:
    """Whether the trainer can write there: a probe file is written (and removed at once) in the run dir, or,
    when it does not exist yet, in the folder the trainer would create it in; nothing else is created."""
    fix = "give a --run-dir on a writable file system, as a folder (the trainer creates it)"
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return [Result("failure", "run dir", f"{run_dir} exists and is not a folder", fix)]
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [Result("failure", "run dir", f"{run_dir}: {existing} is not a folder, so it cannot be created", fix)]
    probe = os.path.join(existing, f".doctor-write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        return [Result("failure", "run dir", f"{run_dir}: cannot write in {existing} ({e.strerror or e})", fix)]
    where = "in it" if existing == path else f"in {existing}, where it will be created"
    return [Result("ok", "run dir", f"{run_dir}: writable (a probe file was written {where} and removed)")]


def free_bytes(path: str) -> int:
    """Free space for an unprivileged writer on the file system that holds `path` (or would, once created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_disk(run_dir: str, checkpoints: int, bytes_per_checkpoint: int,
               free: Callable[[str], int] = free_bytes) -> list[Result]:
    """One checkpoint per epoch is kept, plus one being written (.partial) at a time."""
    need = (checkpoints + 1) * bytes_per_checkpoint
    have = free(run_dir)
    detail = (f"{run_dir}: {_size(have)} free; the plan writes {checkpoints} epoch checkpoints of "
              f"{_size(bytes_per_checkpoint)} = {_size(need)} (with one being written)")
    if have < need:
        return [Result("failure", "disk", detail + ": not enough", f"free {_size(need - have)} there, or use another "
                                                                   "--run-dir (the sweep needs every checkpoint)")]
    if have < need * 1.2:
        return [Result("warning", "disk", detail + ": less than 20% to spare", "free some space or another --run-dir")]
    return [Result("ok", "disk", detail)]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
