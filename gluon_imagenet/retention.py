"""Reading checkpoints beside a trainer whose retention (--keep-mid-epoch) deletes them: on the reader side, a
checkpoint that disappears while it is being chosen or read was pruned on purpose, not damaged.

checkpoint.prune_mid_epoch deletes a checkpoint's record (.json) first, then .params and .states. So a checkpoint
whose record was seen and is gone now, at any moment of a reader's work, was pruned; a save writes its record last,
so a checkpoint never seen with a record is still being saved (or was interrupted while saving). Epoch
checkpoints are never pruned: a reader that needs a checkpoint to stay takes one of those.
"""
from __future__ import annotations

import os

PRUNED = "pruned by the trainer's retention (a mid-epoch checkpoint beyond --keep-mid-epoch)"


def was_pruned(record_path: str | None, had_record: bool) -> bool:
    """Whether a checkpoint that failed a check or a read was deleted by retention meanwhile: its record was seen
    (`had_record`, or `record_path` was listed) and is gone now."""
    if record_path is not None:
        return not os.path.exists(record_path)
    return had_record


class Pruned(Exception):
    """The checkpoint was deleted by the trainer's retention while being read."""
