"""The sweep's result store: RUN_DIR/sweep.json (every result, keyed by checkpoint and settings) and sweep.csv.

The one reader and writer of sweep.json: the sweep writes it through ResultStore, export and report read it
through read_results (checked the same way: a wrong-shaped file is one SweepResultsError line).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass

from gluon_imagenet import best, locks
from gluon_imagenet.files import atomic_open

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_LOCK = "sweep.lock"

RESULT_FIELDS = ("checkpoint", "step", "epoch", "train_seconds", "wall_seconds", "image_size", "data_dir",
                 "crop_fraction", "batch_size", "eval_scale", "flip", "weights", "top1", "top5", "images",
                 "top5_meaningful", "data_root", "data_id")
# What every stored result must hold to be reported (a row without them makes sweep.json damaged).
REQUIRED_FIELDS = ("checkpoint", "step", "epoch", "train_seconds", "wall_seconds", "image_size", "data_dir", "top1",
                   "top5", "images")


# The kind of each required field: a row read back must sort, compare and format as the sweep's own rows do.
FIELD_KINDS = {"checkpoint": str, "step": int, "epoch": (int, float), "train_seconds": (int, float),
               "wall_seconds": (int, float), "image_size": int, "data_dir": str, "top1": (int, float),
               "top5": (int, float), "images": int}
_KIND_NAMES = {str: "a string", int: "a whole number", (int, float): "a number"}


class SweepResultsError(Exception):
    """sweep.json is unreadable or not the shape the sweep writes; the message names the file, what is wrong
    and the fix."""


@dataclass(frozen=True)
class SweepResults:
    """sweep.json as read: every result by key, and the metric the last report ranked by (None: not recorded)."""
    results: dict
    ranked_by: str | None


def read_results(run_dir: str) -> SweepResults:
    """RUN_DIR/sweep.json, checked (read only: nothing is moved or written); no results before any sweep."""
    path = os.path.join(run_dir, SWEEP_JSON)
    if not os.path.isfile(path):
        return SweepResults({}, None)
    try:
        return _parsed(path)
    except (OSError, ValueError) as e:
        raise SweepResultsError(f"{path!r} is damaged ({e}): re-run python -m gluon_imagenet.sweep_eval, which "
                                "moves it aside and evaluates again") from None


def _parsed(path: str) -> SweepResults:
    """ValueError naming what is wrong when the file is not JSON or not the sweep's shape."""
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from None
    problem = ResultStore.shape_problem(data)
    if problem:
        raise ValueError(problem)
    ranked_by = data.get("ranked_by")
    return SweepResults(data["results"], ranked_by if ranked_by in best.METRICS else None)


class ResultStore:
    """sweep.json (every result, keyed by checkpoint and settings) and sweep.csv.

    Every write happens under RUN_DIR/sweep.lock and merges: sweep.json is read again, this process's results
    are added, and both files are replaced atomically, so two sweeps on one run keep each other's results.
    Results of a checkpoint that has since been written again (same name, other file), or that no longer exists
    (deleted, or pruned by the trainer's retention), are dropped. A damaged sweep.json is moved aside, never
    silently discarded. `ranked_by` records the metric the last report ranked the best checkpoint by, which
    export --best follows."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.json_path = os.path.join(run_dir, SWEEP_JSON)
        self.csv_path = os.path.join(run_dir, SWEEP_CSV)
        self.lock_path = os.path.join(run_dir, SWEEP_LOCK)
        self.mine: dict[str, dict] = {}  # results this process evaluated
        self.results: dict[str, dict] = {}  # everything known: sweep.json as last read, plus mine
        self.current: dict[str, str] = {}  # checkpoint name -> its .params sha256, as now in the run dir
        self.existing: set[str] | None = None  # checkpoint names with any file in the run dir (None: not looked)
        self.ranked_by: str | None = None
        self._ranked_by_on_disk: str | None = None
        self.reload()

    def _lock(self):
        return locks.hold(self.lock_path, f"the sweep results of {self.run_dir}", wait=True)

    def reload(self) -> None:
        """Pick up what other sweeps wrote meanwhile."""
        with self._lock():
            self.results = {**self._read(), **self.mine}

    def add(self, key: str, row: dict) -> None:
        with self._lock():
            self.mine[key] = row
            self._write(self._merged())

    def drop_gone(self) -> list[str]:
        """Drop the results of checkpoints no longer in the run dir; returns their names (none: nothing written)."""
        with self._lock():
            everything = {**self._read(), **self.mine}
            gone = sorted({r["checkpoint"] for r in everything.values() if self._gone(r)})
            if gone:
                self.mine = {k: r for k, r in self.mine.items() if not self._gone(r)}
                self._write(self._merged())
            else:
                self.results = everything
            return gone

    def set_ranked_by(self, metric: str) -> None:
        with self._lock():
            merged = self._merged()
            self.ranked_by = metric
            if metric != self._ranked_by_on_disk:
                self._write(merged)

    def _merged(self) -> dict[str, dict]:
        return {k: r for k, r in {**self._read(), **self.mine}.items() if not self._stale(r) and not self._gone(r)}

    def _write(self, merged: dict[str, dict]) -> None:
        data = {"results": merged}
        ranked_by = self.ranked_by or self._ranked_by_on_disk
        if ranked_by:
            data["ranked_by"] = ranked_by
        with atomic_open(self.json_path) as f:
            json.dump(data, f, indent=1, sort_keys=True)
        with atomic_open(self.csv_path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(merged.values(), key=lambda r: (
                r["step"], r.get("weights", "raw"), r["image_size"], r["data_dir"], r.get("crop_fraction") or 0,
                r.get("batch_size") or 0, bool(r.get("flip")), float(r.get("eval_scale", 1.0)))))
        self.results = merged

    def _stale(self, row: dict) -> bool:
        """A result for a checkpoint name whose file is now another one (deleted and trained again)."""
        now = self.current.get(row["checkpoint"])
        return now is not None and row.get("params_sha256") != now

    def _gone(self, row: dict) -> bool:
        return self.existing is not None and row["checkpoint"] not in self.existing

    def _read(self) -> dict[str, dict]:
        """sweep.json's results; a damaged or foreign file is moved aside (and said so), not overwritten."""
        if not os.path.isfile(self.json_path):
            return {}
        try:
            read = _parsed(self.json_path)
        except ValueError as e:
            problem = str(e)
        else:
            self._ranked_by_on_disk = read.ranked_by
            return read.results
        aside = f"{self.json_path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.json_path, aside)
        print(f"warning: {self.json_path} is damaged ({problem}); moved it to {aside} and evaluating those "
              "checkpoints again", file=sys.stderr)
        return {}

    @staticmethod
    def shape_problem(data) -> str:
        """'' when `data` is what the sweep writes, else what is wrong: a result's reported fields must be there
        and of their kind, or the table, plot and export --best fail on it later."""
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            return "expected an object with a 'results' object"
        for key, row in data["results"].items():
            if not isinstance(row, dict):
                return f"result {key!r} is not an object"
            missing = [f for f in REQUIRED_FIELDS if f not in row]
            if missing:
                return f"result {key!r} lacks {', '.join(missing)}"
            for name, kinds in FIELD_KINDS.items():
                if isinstance(row[name], bool) or not isinstance(row[name], kinds):
                    return f"result {key!r} has {name} {row[name]!r}, not {_KIND_NAMES[kinds]}"
        return ""

    def rows(self, keys) -> list[dict]:
        return sorted((self.results[k] for k in keys if k in self.results), key=lambda r: r["step"])
