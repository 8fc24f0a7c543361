"""Checkpoints in a run folder: ckpt-<step>.params (network), .states (optimizer), .json (the record), and with a
recipe's `ema` also .ema.params (the weight EMA, in .params' format: ema.py). The record's shape is Record,
written by save and read by read_record here only.

Names sort by global step. Every file is written under a temporary name and renamed when complete; the
.json, written last, holds the size and SHA-256 of the others, so a damaged or partial checkpoint is
recognised and skipped. The trainer writes them, the sweep evaluator reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field, fields, replace

from gluon_imagenet.files import atomic_open

NAME = re.compile(r"^ckpt-(\d{8})\.json$")
PARAMS_NAME = re.compile(r"^(ckpt-\d{8})\.params$")  # not ckpt-<step>.ema.params
EMA_EXT = ".ema.params"
REQUIRED_EXTS = (".params", ".states")


@dataclass(frozen=True)
class Record:
    """A checkpoint's .json record (loop.Run.record builds it, save writes it with `step` and `files`). A record
    written before a field existed reads with it None; `missing` names those fields: what is not recorded is not
    compared (resume.check)."""
    step: int | None = None  # global steps completed
    files: dict = field(default_factory=dict)  # {extension: {"bytes", "sha256"}} of the files beside the record
    epoch: float | None = None  # epochs completed, fractional for a mid-epoch checkpoint
    epoch_index: int | None = None  # the epoch its last step was in
    phase: int | None = None  # index of the phase its last step was in
    image_size: int | None = None  # that phase's training crop in pixels
    data_dir: str | None = None  # that phase's packed data dir
    images_seen: int | None = None  # training images seen over all ranks
    wall_seconds: float | None = None  # wall time of the run so far, across resumes
    train_seconds: float | None = None  # time spent training (saving left out), across resumes
    recipe_digest: str | None = None  # recipe.digest() of the recipe it was trained with
    world_size: int | None = None  # Horovod ranks
    model: str | None = None  # network name (names.MODELS)
    classes: int | None = None  # the network's output count
    lr: float | None = None  # learning rate of its last step
    loss: float | None = None  # loss of its last step (NaN possible)
    final: bool | None = None  # whether it is the plan's last step
    amp: str | None = None  # the AMP dtype it was trained with, None: AMP off
    recipe: dict | None = None  # the recipe it was trained with (recipe.to_dict)
    trained_on: dict | None = None  # classes, training images and data identity (resume.trained_on)
    ema: dict | None = None  # {"half_life_epochs", "every_steps"} when the recipe keeps a weight EMA
    loss_scaler: dict | None = None  # AMP's dynamic loss scaler state
    loss_scale: float | None = None  # loss_scaler["loss_scale"], for readers of the record by eye
    missing: frozenset = field(default=frozenset(), compare=False)  # fields the record on disk did not hold

    # Written even when None: None is a fact there (AMP off), not "not recorded".
    _WRITTEN_WHEN_NONE = ("amp",)

    def recorded(self, name: str) -> bool:
        """Whether the record holds field `name` (an older trainer's record may not)."""
        return name not in self.missing

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "missing"
                and (getattr(self, f.name) is not None or f.name in self._WRITTEN_WHEN_NONE)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Record":
        """Any record this trainer or an older one wrote: missing keys are None (listed in `missing`), unknown
        ones ignored."""
        names = [f.name for f in fields(cls) if f.name != "missing"]
        values = {n: raw[n] for n in names if n in raw}
        if not isinstance(values.get("files"), dict):
            values["files"] = {}
        return cls(**values, missing=frozenset(n for n in names if n not in raw))

    @property
    def is_mid_epoch(self) -> bool:
        return not float(self.epoch or 0).is_integer()

    @property
    def params_sha256(self) -> str | None:
        return (self.files.get(".params") or {}).get("sha256")


def read_record(path: str) -> Record:
    """A checkpoint's .json record. OSError when it cannot be read (FileNotFoundError: pruned meanwhile),
    ValueError when it is not JSON or not an object."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"holds a {type(raw).__name__}, not an object")
    return Record.from_dict(raw)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    json_path: str
    record: Record

    @property
    def params_path(self) -> str:
        return self.json_path[: -len(".json")] + ".params"

    @property
    def states_path(self) -> str:
        return self.json_path[: -len(".json")] + ".states"

    @property
    def ema_params_path(self) -> str:
        return self.json_path[: -len(".json")] + EMA_EXT

    @property
    def name(self) -> str:
        return os.path.basename(self.json_path)[: -len(".json")]


def prefix_for(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt-{step:08d}")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(run_dir: str, step: int, net, trainer, record: Record, extra: dict | None = None) -> Checkpoint:
    """Atomically save network, optimizer state, the `extra` files ({extension: write(path)}) and the record for
    global `step` (steps completed)."""
    prefix = prefix_for(run_dir, step)
    files, written = {}, []
    writers = [(".params", net.save_parameters), (".states", lambda path: save_optimizer_states(trainer, path)),
               *(extra or {}).items()]
    try:
        for ext, write in writers:
            temp = f"{prefix}{ext}.partial"
            written.append(temp)
            write(temp)
            files[ext] = {"bytes": os.path.getsize(temp), "sha256": sha256_of(temp)}
            os.replace(temp, prefix + ext)
            written.append(prefix + ext)
        record = replace(record, step=step, files=files)
        written.append(prefix + ".json")
        with atomic_open(prefix + ".json") as f:  # written last: its presence marks the checkpoint complete
            json.dump(record.to_dict(), f, indent=1, sort_keys=True)
    except BaseException:
        # A full disk, or a stop (Ctrl-C, SIGTERM) while saving: leave no piece of this checkpoint, so that
        # resume and the sweep see the previous one as the newest instead of reporting a damaged one.
        for path in reversed(written):  # the record first: without it nothing claims to be complete
            if os.path.exists(path):
                os.remove(path)
        raise
    return Checkpoint(step, prefix + ".json", record)


def save_optimizer_states(trainer, path: str) -> None:
    """What Trainer.save_states writes, with every array copied to the CPU first. save_states pickles them on
    their device, and unpickling puts them back on that device whenever a GPU exists (src/ndarray/ndarray.cc,
    NDArray::Load): every rank resuming would open a context on the GPU of the rank that saved. From the CPU,
    MXNet's Updater moves each state to its weight's device at the first update (sync_state_context in
    python/mxnet/optimizer/optimizer.py)."""
    import mxnet as mx

    def to_cpu(state):
        if isinstance(state, mx.nd.NDArray):
            return state.copyto(mx.cpu())
        if isinstance(state, (tuple, list)):
            return type(state)(to_cpu(s) for s in state)
        return state

    updater = trainer._updaters[0]  # Horovod and single-process trainers update locally (no kvstore)
    states = {index: to_cpu(state) for index, state in updater.states.items()}
    with open(path, "wb") as f:
        f.write(pickle.dumps((states, updater.optimizer)))


def prune_mid_epoch(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` mid-epoch checkpoints (epoch checkpoints all stay: the sweep evaluates
    them). The record goes first, so an interrupted deletion leaves what looks like an interrupted save, which
    resume and the sweep skip. Returns the names deleted."""
    mid = []
    for name, record_path in candidates(run_dir):
        try:
            if read_record(record_path).is_mid_epoch:
                mid.append(name)
        except (TypeError, OSError, ValueError):
            continue  # partial or damaged: not ours to judge here
    doomed = mid[:-keep] if keep else []
    for name in doomed:
        for ext in (".json", ".params", ".states", EMA_EXT):
            path = os.path.join(run_dir, name + ext)
            if os.path.exists(path):
                os.remove(path)
    return doomed


def problem(ckpt_json: str, required_only: bool = False) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") when complete and intact, else (None, what is wrong). Every file the record lists is
    verified, unless `required_only`: then only .params and .states, for readers that can use a checkpoint
    without its other files (the sweep and export evaluate the raw weights when the EMA file is damaged, and
    check that file themselves with file_problem)."""
    try:
        record = read_record(ckpt_json)
    except (OSError, ValueError) as e:
        return None, f"unreadable record ({e})"
    step = int(NAME.match(os.path.basename(ckpt_json)).group(1))
    ckpt = Checkpoint(step, ckpt_json, record)
    listed = record.files
    prefix = ckpt_json[: -len(".json")]
    extras = () if required_only else sorted(set(listed) - set(REQUIRED_EXTS))
    for ext in (*REQUIRED_EXTS, *extras):
        why = file_problem(prefix + ext, listed.get(ext))
        if why:
            return None, why
    return ckpt, ""


def file_problem(path: str, expected) -> str:
    """'' when the file is there with the size and SHA-256 its record lists (`expected`), else what is wrong."""
    ext = os.path.basename(path)[len("ckpt-00000000"):]
    if not isinstance(expected, dict) or "bytes" not in expected or "sha256" not in expected:
        return f"record lists no {ext} file"
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    if os.path.getsize(path) != expected["bytes"]:
        return f"{os.path.basename(path)} has {os.path.getsize(path)} bytes, expected {expected['bytes']}"
    if sha256_of(path) != expected["sha256"]:
        return f"{os.path.basename(path)} is damaged (checksum differs)"
    return ""


def candidates(run_dir: str) -> list[tuple[str, str | None]]:
    """(name, record path or None for a save interrupted before its record), sorted by step; nothing verified."""
    found = {}
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if NAME.match(name):
            found[name[: -len(".json")]] = os.path.join(run_dir, name)
        elif PARAMS_NAME.match(name):
            found.setdefault(PARAMS_NAME.match(name).group(1), None)
    return sorted(found.items())


def check(name: str, record_path: str | None, required_only: bool = False) -> tuple[Checkpoint | None, str]:
    if record_path is None:
        return None, "partial: no .json record (interrupted while saving)"
    return problem(record_path, required_only)


def exists_any(run_dir: str) -> bool:
    """Whether run_dir holds any checkpoint file, intact or not (cheap: reads no file)."""
    return bool(candidates(run_dir))


def scan(run_dir: str) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """All checkpoints in run_dir sorted by step: (intact ones, [(name, problem)] for the damaged)."""
    good, bad = [], []
    for name, record_path in candidates(run_dir):
        ckpt, why = check(name, record_path)
        if ckpt:
            good.append(ckpt)
        else:
            bad.append((name, why))
    return good, bad


def newest_intact(run_dir: str) -> tuple[Checkpoint | None, list[tuple[str, str]]]:
    """The newest intact checkpoint, verifying newest first (each check hashes the files), and the damaged
    ones newer than it."""
    damaged = []
    for name, record_path in reversed(candidates(run_dir)):
        ckpt, why = check(name, record_path)
        if ckpt:
            return ckpt, damaged
        damaged.append((name, why))
    return None, damaged
