"""TensorBoard event files of a run (tensorboardX): the trainer's curves and the sweep's accuracy, on one step axis.

    tensorboard --logdir runs/demo/tensorboard

DIR (the trainer's --tensorboard, default RUN_DIR/tensorboard) holds one TensorBoard run per writer:

    DIR/train             rank 0 of the trainer, per step: train/loss, train/lr, train/phase (1-based),
                          train/image_size, train/batch_size (per worker), train/global_batch_size; per log step
                          train/img_per_s. Step = steps done (the loss of step N is drawn at N, where the
                          checkpoint ckpt-N sits).
    DIR/sweep-<setting>   one per sweep setting (size policy, crop): accuracy/top1, accuracy/top5 and
                          accuracy/image_size per checkpoint at its step, and the same against training time as
                          accuracy_vs_train_seconds/* (step = whole training seconds: TensorBoard's x axis is a step).

Records are written synchronously when the trainer already holds them (at its log steps, where the losses are
read back anyway): no thread, no queue, no device sync of their own, and what was logged is on disk even after a
SIGKILL. Every trainer start writes a new file that begins with TensorBoard's purge marker (SessionLog START at
its first step), so after a resume the steps trained again replace the old ones instead of being drawn twice;
read_scalars() applies the marker as TensorBoard does.

Without tensorboardX the run goes on without event files, after one warning naming the install command.
"""
from __future__ import annotations

import glob
import os
import struct
import sys
import time

PIN = "tensorboardX==2.6.5"
INSTALL = f".venv/bin/python -m pip install -c requirements/constraints.txt {PIN} protobuf==6.33.6"
TRAIN_RUN = "train"


def missing_message(skip: str = ", or pass --no-tensorboard") -> str:
    return (f"tensorboardX is not installed, so no TensorBoard event files are written (the run goes on); get it "
            f"with: {INSTALL} (bash tools/setup.sh installs it){skip}")


class EventFile:
    """One event file, written record by record (tensorboardX's EventsWriter, without its queue thread)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        os.makedirs(logdir, exist_ok=True)
        # The pid in the name: two writers started in the same second (a quick resume) get two files.
        self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
        self.path = self._writer._file_name
        if purge_step is not None:
            self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def add(self, step: int, values: dict[str, float], wall_time: float) -> None:
        for tag, value in values.items():
            self._writer.write_event(self._event(wall_time=wall_time, step=int(step),
                                                 summary=self._scalar(tag, float(value))))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_event_file(logdir: str, purge_step: int | None = None, skip: str = ", or pass --no-tensorboard"):
    """An EventFile in logdir, or None (after the warning) when tensorboardX is missing or logdir unusable."""
    try:
        import tensorboardX  # noqa: F401  (checked first: the message names the package, not a submodule)
    except ImportError:
        print(f"warning: {missing_message(skip)}", file=sys.stderr, flush=True)
        return None
    try:
        return EventFile(logdir, purge_step)
    except OSError as e:
        print(f"warning: cannot write TensorBoard event files in {logdir}: {e.strerror or e}; the run goes on "
              "without them", file=sys.stderr, flush=True)
        return None


class TrainingBoard:
    """The trainer's curves (rank 0): ProgressLog hands over each bunch of step records it logs."""

    def __init__(self, logdir: str, start_step: int, plan, ranks: int):
        self.plan, self.ranks = plan, ranks
        # Step start_step + 1 is the first one drawn (x = steps done): points there and after, left by an earlier
        # attempt (resumed from an older checkpoint, or one that died before its first), are purged.
        self.file = open_event_file(os.path.join(logdir, TRAIN_RUN), start_step + 1)
        if self.file is not None:
            print(f"TensorBoard event files in {logdir} (tensorboard --logdir {logdir})", flush=True)

    def add(self, record, img_per_s: float | None, wall_time: float) -> None:
        if self.file is None:
            return
        phase = self.plan.phases[record.phase]
        values = {"train/loss": record.loss, "train/lr": record.lr, "train/phase": record.phase + 1,
                  "train/image_size": phase.image_size, "train/batch_size": phase.batch_size,
                  "train/global_batch_size": phase.batch_size * self.ranks}
        if img_per_s is not None:
            values["train/img_per_s"] = img_per_s
        self._guarded(self.file.add, record.step + 1, values, wall_time)

    def flush(self) -> None:
        if self.file is not None:
            self._guarded(self.file.flush)

    def _guarded(self, write, *args) -> None:
        try:
            write(*args)
        except OSError as e:  # a full disk must not stop training (the checkpoint save reports it)
            print(f"warning: cannot write {self.file.path}: {e.strerror or e}; no more TensorBoard events from this "
                  "run", file=sys.stderr, flush=True)
            self.file = None


# ------------------------------------------------------------------------------------------------ the sweep
def sweep_logdir(run, run_dir: str) -> str | None:
    """The trainer's tensorboard folder, from run.json (rundir.RunRecord; None: trained with --no-tensorboard)."""
    return run.tensorboard_dir(run_dir)


def sweep_setting(size_policy: str, image_size: int | None, crop_fraction: float) -> str:
    """The TensorBoard run name of a sweep's fixed settings (--size-policy, --image-size, --crop-fraction), e.g.
    sweep-phase-crop0.875 or sweep-fixed-224px-crop0.875; each result's own scale, flip and weights are added to
    it (row_setting)."""
    size = f"-{image_size}px" if size_policy == "fixed" and image_size else ""
    return f"sweep-{size_policy}{size}-crop{crop_fraction:g}"


def row_setting(base: str, row: dict) -> str:
    """One curve per evaluation setting (--eval-scales, --flip, --weights): sweep-phase-x1.15-flip-ema-crop0.875."""
    scale = float(row.get("eval_scale", 1.0))
    parts = [f"-x{scale:g}"] if scale != 1 else []
    parts += ["-flip"] if row.get("flip") else []
    parts += ["-ema"] if row.get("weights") == "ema" else []
    head, _, crop = base.rpartition("-crop")
    return f"{head}{''.join(parts)}-crop{crop}"


class SweepBoard:
    """Accuracy per checkpoint: sweep_eval calls add() with each result as it is stored, one event file (one
    TensorBoard run) per evaluation setting."""

    def __init__(self, logdir: str, setting: str):
        self.logdir, self.setting, self.files = logdir, setting, {}

    def add(self, row: dict) -> None:
        name = row_setting(self.setting, row)
        if name not in self.files:  # at its first new result: a sweep with nothing new leaves no empty file
            failed = None in self.files.values()  # no package or no folder: said once, not once per setting
            self.files[name] = None if failed else open_event_file(
                os.path.join(self.logdir, name), skip=" (the sweep's results are in sweep.json either way)")
        events = self.files[name]
        if events is None:
            return
        values = {"top1": row["top1"], "top5": row["top5"], "image_size": row["image_size"]}
        now = time.time()
        events.add(row["step"], {f"accuracy/{k}": v for k, v in values.items()}, now)
        events.add(int(round(row["train_seconds"])), {f"accuracy_vs_train_seconds/{k}": v for k, v in
                                                      values.items()}, now)
        events.flush()


def open_sweep_board(run, run_dir: str, setting: str) -> SweepBoard | None:
    """The board in the run's tensorboard folder (None: trained with --no-tensorboard); `setting` names the
    sweep's fixed settings (sweep_setting)."""
    logdir = sweep_logdir(run, run_dir)
    return SweepBoard(logdir, setting) if logdir else None


# ------------------------------------------------------------------------------------------------ reading
def read_events(path: str):
    """The Event records of one file, in order; a record torn by a crash (short or bad checksum) ends it."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        if header_crc != masked_crc32c(header) or len(body) < length or at + 16 + length > len(data):
            return
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        if body_crc != masked_crc32c(body):
            return
        yield Event.FromString(body)
        at += 16 + length


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)] in file order} of one TensorBoard run folder, purge markers applied as TensorBoard
    applies them: a SessionLog START at step S drops the points at steps >= S read before it."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    # Files sort by their creation time (events.out.tfevents.<seconds>.<host>.<pid>), as TensorBoard reads them.
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                       key=lambda p: (os.path.basename(p).split(".")[3], os.path.getmtime(p))):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars

