"""Which checkpoint to export: --best by the one rule, else the newest epoch."""
from __future__ import annotations

import os
import re
import sys

from gluon_imagenet import best as best_rule
from gluon_imagenet import checkpoint, retention
from gluon_imagenet.data import packed
from gluon_imagenet.rundir import RunDirError, RunRecord
from gluon_imagenet.sweep_eval.results import SWEEP_JSON, SweepResultsError, read_results


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
    and checked by the sweep's own reader (sweep_eval/results.py)."""
    try:
        read = read_results(run_dir)
    except SweepResultsError as e:
        raise ExportError(str(e)) from None
    return list(read.results.values()), read.ranked_by


def data_root_of(data_root: str | None, run: RunRecord) -> str:
    """The data root export reads (absolute): `data_root` (--data-root) if given, else the run's."""
    return os.path.abspath(run.data_root_or(data_root))


def current_identity(data_root: str, data_dir: str) -> str | None:
    try:
        return packed.data_identity(data_root, data_dir, "val")
    except OSError:  # the packed data is not there (moved, or another machine): nothing to compare
        return None


def usable_rows(run_dir: str, root: str, rows: list[dict]) -> list[dict]:
    """The results export may use: measured on the data root `root` (data_root_of) as it is now, of checkpoints
    still in the run dir. What is left out is said, in one line per reason."""
    elsewhere = sorted({str(r.get("data_root")) for r in rows if r.get("data_root") != root})
    mine = [r for r in rows if r.get("data_root") == root]
    changed = [r for r in mine if r.get("data_id") not in (None, current_identity(root, r["data_dir"]))
               and current_identity(root, r["data_dir"]) is not None]
    mine = [r for r in mine if r not in changed]
    gone = sorted({r["checkpoint"] for r in mine
                   if not os.path.isfile(os.path.join(run_dir, r["checkpoint"] + ".json"))})
    if elsewhere:
        print(f"note: ignoring {len(rows) - len(mine) - len(changed)} sweep result(s) on other data roots "
              f"({', '.join(elsewhere)}); pass --data-root to use those", file=sys.stderr)
    if changed:
        print(f"warning: ignoring {len(changed)} sweep result(s) on {root}: its packed validation data changed since "
              "they were measured; re-run the sweep", file=sys.stderr)
    if gone:
        print(f"note: ignoring the sweep results of {len(gone)} checkpoint(s) no longer in {run_dir} (deleted or "
              f"pruned by the trainer's retention): {', '.join(gone)}", file=sys.stderr)
    return [r for r in mine if r["checkpoint"] not in gone]


def ranking_metric(by: str | None, run: RunRecord, ranked_by: str | None) -> str:
    """The metric --best ranks by: `by` (--by) if given, else the sweep's (`ranked_by`), else the default."""
    classes = len(run.classes or [])
    metric = by or ranked_by or best_rule.default_metric(classes)
    if metric == "top5" and not best_rule.top5_meaningful(classes):
        if by:
            raise ExportError(f"--by top5: the run has {classes} classes, so top-5 is 100% for any "
                              "network and ranks nothing; use --by top1")
        metric = "top1"
    return metric


def checkpoint_names(run_dir: str) -> list[str]:
    """Names of the checkpoint records in the run (nothing verified: cheap)."""
    return sorted(n[: -len(".json")] for n in os.listdir(run_dir) if checkpoint.NAME.match(n))


def choose(run_dir: str, rows: list[dict], metric: str, *, best: bool,
           named: str | None) -> tuple[str, str, dict | None]:
    """(checkpoint name, how it was chosen, the sweep result that chose it with --best); rows: usable_rows.
    best: --best; named: --checkpoint (a name or a step), else the newest epoch checkpoint."""
    if best:
        if not rows:
            raise ExportError(f"--best: {os.path.join(run_dir, SWEEP_JSON)!r} holds no results on this data "
                              f"root whose checkpoint still exists; evaluate the checkpoints first (python -m "
                              f"gluon_imagenet.sweep_eval --run-dir {run_dir}) or name one with --checkpoint")
        chosen = best_rule.best_row(rows, metric)
        return chosen["checkpoint"], f"--best: {best_rule.describe(metric)} of the sweep's results", chosen
    names = checkpoint_names(run_dir)
    if named:
        wanted = named
        if wanted.isdigit():
            wanted = os.path.basename(checkpoint.prefix_for("", int(wanted)))
        wanted = re.sub(r"\.(json|params|states)$", "", os.path.basename(wanted))
        if wanted not in names:
            listed = ", ".join(names) if names else "none"
            raise ExportError(f"--checkpoint {named!r} is not in {run_dir!r}; available: {listed}")
        return wanted, "--checkpoint", None
    newest, damaged, mid_epoch = newest_epoch_checkpoint(run_dir)
    for name, why in damaged:
        print(f"skipping {name}: {why}", file=sys.stderr)
    if newest is not None:
        newer = [n for n in mid_epoch if n > newest.name]
        note = f"; newer mid-epoch ones ({', '.join(newer)}) only when named with --checkpoint" if newer else ""
        return newest.name, f"the newest epoch checkpoint (neither --checkpoint nor --best given{note})", None
    if mid_epoch:
        raise ExportError(f"no epoch checkpoint in {run_dir!r} yet, only mid-epoch ones ({', '.join(mid_epoch)}), "
                          "which the trainer's retention may delete while they are read: name one with --checkpoint, "
                          "or wait for the first epoch to end")
    raise ExportError(f"no intact checkpoint in {run_dir!r}")


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
