"""Rank 0's fixed-column progress lines and RUN_DIR/metrics.jsonl (one line per step).

Losses reach this module in bunches (the trainer reads them back from the device only at log and checkpoint
steps), each step with the wall time at which it was issued.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    step: int  # global step, 0-based
    epoch: int
    phase: int  # 0-based phase index
    lr: float
    loss: float
    time: float  # wall seconds since the run began (across resumes)


def keep_lines_before(path: str, step: int) -> int:
    """Drop metrics.jsonl lines of steps >= `step` (trained again after a resume, or left by a run that died
    before its first checkpoint) and lines a crash or a full disk tore; returns how many torn lines were dropped."""
    if not os.path.exists(path):
        return 0
    kept, torn = [], 0
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                torn += 1
    with open(path + ".partial", "w") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)
    return torn


class ProgressLog:
    HEADER = f"{'phase':>5} {'epoch':>5} {'step':>15} {'lr':>9} {'loss':>8} {'img/s':>8} {'ETA':>9}"

    def __init__(self, path: str | None, plan, ranks: int, log_every: int, start_step: int, enabled: bool,
                 tensorboard_dir: str | None = None):
        self.path, self.plan, self.ranks, self.log_every, self.enabled = path, plan, ranks, log_every, enabled
        self.last_step, self.last_time = None, 0.0
        self.board = None
        if not enabled:
            return
        if tensorboard_dir:
            from gluon_imagenet.tensorboard import TrainingBoard

            self.board = TrainingBoard(tensorboard_dir, start_step, plan, ranks)
        if path:
            torn = keep_lines_before(path, start_step)
            if torn:
                print(f"warning: dropped {torn} damaged line(s) from {path}", file=sys.stderr, flush=True)
        print(self.HEADER, flush=True)

    def is_log_step(self, step: int, phase) -> bool:
        last_of_epoch = (step + 1 - phase.first_step) % phase.steps_per_epoch == 0
        return (step + 1) % self.log_every == 0 or last_of_epoch

    def write(self, records: list[StepRecord]) -> None:
        """Append the records to metrics.jsonl; print a progress line for each log step among them."""
        if not self.enabled or not records:
            return
        lines = []
        now = time.time()
        for r in records:
            rate = None
            entry = {"time": round(r.time, 3), "step": r.step, "epoch": r.epoch, "phase": r.phase, "lr": r.lr,
                     "loss": r.loss if math.isfinite(r.loss) else str(r.loss)}
            phase = self.plan.phases[r.phase]
            if self.last_step is None:
                self.last_step, self.last_time = r.step, r.time  # the first step includes start-up: untimed
            elif self.is_log_step(r.step, phase):
                # Timed by when the steps were issued (each waits for the one before), not by when their losses
                # were read back, which happens in bunches.
                rate = (r.step - self.last_step) * phase.batch_size * self.ranks / max(r.time - self.last_time, 1e-9)
                self.last_step, self.last_time = r.step, r.time
                entry["img_per_s"] = round(rate, 2)
                print(f"{r.phase + 1:>5} {r.epoch:>5} {f'{r.step + 1}/{self.plan.total_steps}':>15} {r.lr:>9.4g} "
                      f"{r.loss:>8.4f} {rate:>8.1f} {self._eta(r.step, phase, rate):>9}", flush=True)
            lines.append(json.dumps(entry) + "\n")
            if self.board:  # each step's time of issue, placed on the clock by the newest step (issued just now)
                self.board.add(r, rate, now - (records[-1].time - r.time))
        if self.board:
            self.board.flush()
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.writelines(lines)
            except OSError as e:  # a full disk must not stop training: the checkpoint save reports it
                print(f"warning: cannot append to {self.path}: {e.strerror}", file=sys.stderr, flush=True)

    def _eta(self, step: int, phase, rate: float) -> str:
        """Remaining work in pixels at the current pixel rate (later phases have larger images)."""
        if not rate:
            return "-"
        pixel_rate = rate * phase.image_size ** 2
        remaining = sum(max(0, p.end_step - max(step + 1, p.first_step)) * p.batch_size * p.workers
                        * p.image_size ** 2 for p in self.plan.phases)
        seconds = int(remaining / pixel_rate)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
