"""Each checkpoint's files verified once across --watch polls."""
from __future__ import annotations

import os

from gluon_imagenet import checkpoint, retention
from gluon_imagenet.sweep_eval.settings import EMA_EXT, ema_problem


class Verifier:
    """checkpoint.scan that hashes each checkpoint once per process. --watch looks every 30 s; re-hashing every
    checkpoint each time reads the whole run (8 GB for an ImageNet run) from a shared file system again. A
    checkpoint is verified again only when one of its files is new or changed (size, mtime or inode: the trainer
    replaces files by renaming, so a rewritten file is a new inode)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._known: dict[str, tuple] = {}  # name -> (file stamps, (checkpoint or None, problem))
        self._had_record: set[str] = set()  # names seen with their record: one without it now was pruned
        self._ema_known: dict[str, tuple] = {}  # name -> (file stamps, problem of its EMA file)

    def _stamp(self, name: str) -> tuple:
        stamps = []
        for ext in (".json", ".params", ".states", EMA_EXT):
            try:
                st = os.stat(os.path.join(self.run_dir, name + ext))
                stamps.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def scan(self) -> tuple[list[checkpoint.Checkpoint], list[tuple[str, str]]]:
        """(intact checkpoints, [(name, problem)]) sorted by step, like checkpoint.scan."""
        good, bad = [], []
        # checkpoint's own listing and check, so both readers agree on what a checkpoint is.
        for name, record_path in checkpoint.candidates(self.run_dir):
            stamp = self._stamp(name)  # before hashing: a file changed meanwhile differs at the next look
            known = self._known.get(name)
            if known and known[0] == stamp:
                ckpt, why = known[1]
            else:
                # The raw weights are evaluated even when the EMA file is damaged: that is checked on its own.
                ckpt, why = checkpoint.check(name, record_path, required_only=True)
                if ckpt is None and retention.was_pruned(record_path, name in self._had_record):
                    why = retention.PRUNED
                self._known[name] = (stamp, (ckpt, why))
            if record_path is not None:
                self._had_record.add(name)
            if ckpt:
                good.append(ckpt)
            else:
                bad.append((name, why))
        return good, bad

    def ema_problem(self, ckpt: checkpoint.Checkpoint) -> str:
        """ema_settings.ema_problem, hashed once per version of the files (like scan)."""
        stamp = self._stamp(ckpt.name)
        known = self._ema_known.get(ckpt.name)
        if not known or known[0] != stamp:
            known = self._ema_known[ckpt.name] = (stamp, ema_problem(ckpt))
        return known[1]
