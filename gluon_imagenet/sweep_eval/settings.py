"""The sweep's evaluation settings besides the checkpoint: scales of its size, the mirror average (flip) and which
weights (raw, or the EMA weights the trainer saves beside a checkpoint), with their checks.

The EMA interface the trainer writes: `<prefix>.ema.params` (net.save_parameters of the same architecture, the same
parameter names as `.params`, BatchNorm running statistics included), listed in the record's `files` under
".ema.params" with "bytes" and "sha256", and record.ema = {"half_life_epochs": ..., "every_steps": ...}
(checkpoint.Record).
"""
from __future__ import annotations

import math

from gluon_imagenet import checkpoint

EMA_EXT = ".ema.params"
WEIGHTS = ("raw", "ema", "both")
DEFAULT_SETTING = (1.0, False, "raw")  # scale, flip, weights: what the sweep measured before settings existed


class SettingsError(Exception):
    """A setting that means nothing; the message names it and the fix."""


def parse_scales(text: str, flag: str = "--eval-scales") -> tuple[float, ...]:
    """'1.0,1.15,1.3' -> (1.0, 1.15, 1.3); non-numbers, values <= 0 and duplicates are refused by name."""
    scales = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise SettingsError(f"{flag} {text}: {part.strip()!r} is not a number; give factors of the checkpoint's "
                                "size like 1.0,1.15,1.3") from None
        if not (value > 0 and math.isfinite(value)):
            raise SettingsError(f"{flag} {text}: must be factors > 0 (1 = the checkpoint's own size), not "
                                f"{part.strip()}")
        if value in scales:
            raise SettingsError(f"{flag} {text}: {value:g} is given twice; give each scale once")
        scales.append(value)
    return tuple(scales)


def has_ema(record: checkpoint.Record) -> bool:
    return EMA_EXT in record.files


def ema_path(ckpt: checkpoint.Checkpoint) -> str:
    return ckpt.params_path[: -len(".params")] + EMA_EXT


def ema_problem(ckpt: checkpoint.Checkpoint) -> str:
    """'' when the checkpoint's EMA file is there and matches its record, else what is wrong with it (the
    checkpoint's own rule: one notion of intact)."""
    why = checkpoint.file_problem(ema_path(ckpt), ckpt.record.files[EMA_EXT])
    return f"the record's {EMA_EXT} entry has no bytes and sha256" if why.startswith("record lists no") else why


def weights_for(choice: str | None, record: checkpoint.Record) -> tuple[list[str], str]:
    """(the weights to evaluate, why EMA weights are left out or ''). Default: both when the checkpoint has EMA
    weights, else raw."""
    present = has_ema(record)
    choice = choice or ("both" if present else "raw")
    if choice == "raw":
        return ["raw"], ""
    if not present:
        why = f"no EMA weights (its record lists no {EMA_EXT}: trained without ema)"
        return ([], why) if choice == "ema" else (["raw"], why)
    return (["ema"] if choice == "ema" else ["raw", "ema"]), ""


def setting_of(row: dict) -> tuple[float, bool, str]:
    """(scale, flip, weights) of a result; results from before settings existed are the default setting."""
    return float(row.get("eval_scale", 1.0)), bool(row.get("flip", False)), str(row.get("weights", "raw"))


def is_default(row: dict) -> bool:
    return setting_of(row) == DEFAULT_SETTING


def describe_setting(row: dict) -> str:
    """e.g. 'x1.15 flip ema', 'x1 raw'."""
    scale, flip, weights = setting_of(row)
    return f"x{scale:g}{' flip' if flip else ''} {weights}"
