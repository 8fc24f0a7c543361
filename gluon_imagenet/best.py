"""The one rule for "the best checkpoint" of a sweep, shared by the sweep's report and `export --best` (two rules
named different checkpoints for one sweep), and the one rule for when top-5 means nothing.

Best = the highest value of the ranking metric, then the higher other metric, then the EARLIER step: of two
checkpoints scoring the same, the one that got there with less training. Every evaluation setting (scale,
flip, raw or EMA weights) is a result of its own, ranked alike; of equal ones the cheaper setting wins
(rank_key). The sweep ranks by the metric of its
target and records it in sweep.json (`ranked_by`), so that `export --best` ranks as the sweep reported.
"""
from __future__ import annotations

METRICS = ("top1", "top5")
NAMES = {"top1": "top-1", "top5": "top-5"}
TOP5_MEANINGLESS_CLASSES = 5  # with this many classes or fewer, every network's top-5 holds every class
RULE_HELP = "the highest METRIC, then the other of top-1/top-5, then the earlier step (it got there sooner)"


def other(metric: str) -> str:
    return "top5" if metric == "top1" else "top1"


def rank_key(row: dict, metric: str):
    """Ties between settings of one checkpoint go to the cheaper one to use: no flip (one forward pass), raw
    weights, the scale nearest 1 (then the smaller)."""
    scale = float(row.get("eval_scale", 1.0))
    return (row[metric], row[other(metric)], -int(row["step"]), not row.get("flip", False),
            row.get("weights", "raw") == "raw", -abs(scale - 1), -scale)


def best_row(rows: list[dict], metric: str) -> dict:
    if metric not in METRICS:
        raise ValueError(f"ranking metric {metric!r} is not one of {', '.join(METRICS)}")
    return max(rows, key=lambda r: rank_key(r, metric))


def describe(metric: str) -> str:
    """The rule in words, for the lines that name a best checkpoint."""
    return f"the highest {NAMES[metric]}, then {NAMES[other(metric)]}, then the earlier step"


def top5_meaningful(classes: int) -> bool:
    """Whether top-5 accuracy says anything: with 5 classes or fewer it is 100% for any network."""
    return classes > TOP5_MEANINGLESS_CLASSES


def default_metric(classes: int) -> str:
    """The metric of the sweep's default target: the seed's top-5, unless top-5 means nothing."""
    return "top5" if top5_meaningful(classes) else "top1"
