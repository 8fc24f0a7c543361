"""Reading one field of a recipe: its type and range checked, and the error that names the field and the fix."""
from __future__ import annotations

import math
from typing import Any


class RecipeError(ValueError):
    """A recipe that cannot be trained; the message says where and why."""


def _reject_unknown(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise ValueError


def _as_float(value: Any) -> float:
    # PyYAML reads `2e-4` (no dot) as text: accept it as the number the writer meant.
    if isinstance(value, bool):
        raise ValueError
    result = float(value)
    if not math.isfinite(result):
        raise ValueError
    return result


def _pair(raw: dict, key: str, where: str, convert) -> tuple:
    value = raw[key]
    try:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError
        return tuple(convert(v) for v in value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: field {key!r}: {value!r} must be a pair [start, end] of numbers") from None


def _scalar(raw: dict, key: str, default: Any, where: str, convert, kind: str) -> Any:
    if key not in raw:
        if default is None:
            raise RecipeError(f"{where}: missing field {key!r}")
        return default
    try:
        return convert(raw[key])
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: field {key!r}: {raw[key]!r} is not {kind}") from None


def _integer(raw, key, default, where, minimum, maximum=None):
    value = _scalar(raw, key, default, where, _as_int, "a whole number")
    if value < minimum:
        raise RecipeError(f"{where}: field {key!r}: {value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise RecipeError(f"{where}: field {key!r}: {value} must be <= {maximum}")
    return value


def _boolean(raw, key, default, where):
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: field {key!r}: {value!r} must be true or false")
    return value


def _number(raw, key, default, where, minimum, below=None):
    value = _scalar(raw, key, default, where, _as_float, "a number")
    if value < minimum or (below is not None and value >= below):
        allowed = f">= {minimum}" + (f" and < {below}" if below is not None else "")
        raise RecipeError(f"{where}: field {key!r}: {value} must be {allowed}")
    return value


def _text(raw, key, default, where):
    value = raw.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecipeError(f"{where}: field {key!r}: {value!r} must be text")
    return value


def _choice(raw, key, default, allowed, where):
    value = _scalar(raw, key, default, where, str, "text")
    if value not in allowed:
        raise RecipeError(f"{where}: field {key!r}: {value!r} is not one of {', '.join(allowed)}")
    return value
