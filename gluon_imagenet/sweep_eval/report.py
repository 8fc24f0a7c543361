"""The sweep's report, as numbers and as a picture: the first checkpoint reaching the targets, the best one (the
rule of gluon_imagenet.best), the table, and sweep.png."""
from __future__ import annotations

import os

from gluon_imagenet import best
from gluon_imagenet.rundir import RunRecord
from gluon_imagenet.sweep_eval.jobs import Job
from gluon_imagenet.sweep_eval.options import SweepOptions
from gluon_imagenet.sweep_eval.plan import SweepError
from gluon_imagenet.sweep_eval.results import ResultStore
from gluon_imagenet.sweep_eval.settings import describe_setting, is_default

SEED_TARGET_TOP5 = 0.93  # the seed's goal when no target is given
# With top-5 meaningless (5 classes or fewer) the default target is top-1: ResNet-50's published top-1 at the
# seed's 93% top-5.
SEED_TARGET_TOP1 = 0.759


def resolve_targets(target_top5: float | None, target_top1: float | None,
                    classes: int | None = None) -> tuple[float | None, float | None]:
    """The targets given, else the default one: the seed's top-5, or top-1 when top-5 means nothing."""
    if (target_top5, target_top1) != (None, None):
        return target_top5, target_top1
    if classes is not None and not best.top5_meaningful(classes):
        return None, SEED_TARGET_TOP1
    return SEED_TARGET_TOP5, None


def time_to_accuracy(rows: list[dict], target_top5: float | None, target_top1: float | None) -> dict | None:
    """The first checkpoint (by step) reaching every given target."""
    for row in rows:
        if (target_top5 is None or row["top5"] >= target_top5) and (target_top1 is None or row["top1"] >= target_top1):
            return row
    return None


def ranking_metric(target_top5: float | None, target_top1: float | None) -> str:
    """The metric the user asked about: top-1 when a top-1 target is given, else top-5."""
    return "top1" if target_top1 is not None else "top5"


def best_row(rows: list[dict], target_top5: float | None, target_top1: float | None) -> dict:
    """The best by the target's metric (gluon_imagenet.best: the rule `export --best` follows too)."""
    return best.best_row(rows, ranking_metric(target_top5, target_top1))


def per_checkpoint(rows: list[dict], metric: str = "top5") -> list[dict]:
    """Per checkpoint (by step): its default-setting result (scale 1, no flip, raw weights; None when not evaluated)
    and its best result over every setting (gluon_imagenet.best's rule)."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["step"]):
        groups.setdefault(r["checkpoint"], []).append(r)
    return [{"checkpoint": name, "default": next((r for r in group if is_default(r)), None),
             "best": best.best_row(group, metric)} for name, group in groups.items()]


def format_table(rows: list[dict], top5_meaningful: bool = True, metric: str = "top5") -> str:
    """One line per checkpoint and setting shown: its default setting, and its best one when that is another
    (named: scale, flip, weights)."""
    lines = [f"{'checkpoint':<14} {'epoch':>7} {'step':>7} {'train s':>9} {'setting':<20} {'weights':<7} {'size':>5} "
             f"{'top-1':>7} {'top-5':>7} {'images':>7}"]
    for entry in per_checkpoint(rows, metric):
        shown = [("default", entry["default"])] if entry["default"] is not None else []
        if entry["best"] is entry["default"]:
            shown = [("default (best)" if len(rows) > len(per_checkpoint(rows, metric)) else "default",
                      entry["default"])]
        else:
            scale_flip = describe_setting(entry["best"]).rsplit(" ", 1)[0]
            shown.append((f"best: {scale_flip}", entry["best"]))
        for label, r in shown:
            top5 = f"{r['top5']:>7.2%}" if top5_meaningful else f"{'n/a':>7}"
            lines.append(f"{r['checkpoint']:<14} {r['epoch']:>7.2f} {r['step']:>7} {r['train_seconds']:>9.1f} "
                         f"{label:<20} {r.get('weights', 'raw'):<7} {r['image_size']:>5} {r['top1']:>7.2%} {top5} "
                         f"{r['images']:>7}")
    if not top5_meaningful:
        lines.append(f"top-5 n/a: with {best.TOP5_MEANINGLESS_CLASSES} classes or fewer it is 100% for any network")
    return "\n".join(lines)


def describe_target(target_top5, target_top1) -> str:
    parts = [f"top-5 >= {target_top5:.2%}" if target_top5 is not None else "",
             f"top-1 >= {target_top1:.2%}" if target_top1 is not None else ""]
    return " and ".join(p for p in parts if p)


def _minutes_at(step: int, points: list[tuple[int, float]]) -> float | None:
    """Training minutes at `step`, interpolated between checkpoints (and step 0 at 0 s); None past the last."""
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if step in (s0, s1):  # a phase usually ends with a checkpoint: its own time, exactly
            return (t0 if step == s0 else t1) / 60
        if s0 < step < s1:
            return (t0 + (t1 - t0) * (step - s0) / (s1 - s0)) / 60
    return None


def plot_data(rows: list[dict], run, targets: tuple[float | None, float | None], title: str = "",
              top5_meaningful: bool = True) -> dict:
    """Everything sweep.png shows, as numbers: accuracy against training minutes, where each phase starts (in
    minutes, interpolated between the checkpoints around its first step) and its image size, the target lines,
    and the first checkpoint reaching the targets. `run`: run.json (rundir.RunRecord)."""
    every = sorted(rows, key=lambda r: r["step"])
    metric = ranking_metric(*targets)
    entries = per_checkpoint(every, metric)
    # The main curves: the default setting (all results before settings existed); the best setting per
    # checkpoint is drawn beside it when other settings were evaluated.
    rows = [e["default"] for e in entries if e["default"] is not None] or [e["best"] for e in entries]
    several = any(not is_default(r) for r in every)
    best_rows = [e["best"] for e in entries]
    points = [(0, 0.0)] + [(r["step"], float(r["train_seconds"])) for r in best_rows]
    phases = []
    for i, p in enumerate(run.phases):
        minutes = 0.0 if i == 0 else _minutes_at(p.first_step, points)
        phases.append({"first_step": p.first_step, "image_size": p.image_size, "label": f"{p.image_size} px",
                       "minutes": None if minutes is None else round(minutes, 4)})
    target_top5, target_top1 = targets
    lines = [{"metric": m, "value": v, "label": f"target {name} {v:.1%}"}
             for m, name, v in (("top5", "top-5", target_top5), ("top1", "top-1", target_top1)) if v is not None]
    hit = time_to_accuracy(rows, target_top5, target_top1)
    hit_best = time_to_accuracy(every, target_top5, target_top1) if several else None
    return {
        "title": title,
        "checkpoints": [r["checkpoint"] for r in rows],
        "minutes": [round(r["train_seconds"] / 60, 4) for r in rows],
        "top1": [r["top1"] for r in rows], "top5": [r["top5"] for r in rows], "top5_meaningful": top5_meaningful,
        "phases": phases,
        "boundaries": [p["minutes"] for p in phases[1:] if p["minutes"] is not None],
        "targets": lines,
        "hit": None if hit is None else {
            "checkpoint": hit["checkpoint"], "minutes": round(hit["train_seconds"] / 60, 4), "metric": metric,
            "value": hit[metric],
            "label": f"first to reach: {hit['checkpoint']}\n({hit['train_seconds'] / 60:.1f} min)"},
        "best": None if not several else {
            "checkpoints": [r["checkpoint"] for r in best_rows], "settings": [describe_setting(r) for r in best_rows],
            "minutes": [round(r["train_seconds"] / 60, 4) for r in best_rows],
            "top1": [r["top1"] for r in best_rows], "top5": [r["top5"] for r in best_rows]},
        "hit_best": None if hit_best is None else {
            "checkpoint": hit_best["checkpoint"], "minutes": round(hit_best["train_seconds"] / 60, 4),
            "metric": metric, "value": hit_best[metric], "setting": describe_setting(hit_best),
            "label": f"first to reach, best setting: {hit_best['checkpoint']} ({describe_setting(hit_best)})\n"
                     f"({hit_best['train_seconds'] / 60:.1f} min)"},
    }


def plot(data: dict, path: str) -> None:
    """Draw plot_data's numbers: one panel, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(9, 5))
    of_default = ", default setting" if data.get("best") else ""
    ax.plot(data["minutes"], data["top1"], "o-", color="tab:blue", label=f"top-1{of_default}")
    if data.get("top5_meaningful", True):
        ax.plot(data["minutes"], data["top5"], "s-", color="tab:orange", label=f"top-5{of_default}")
    if data.get("best"):
        ax.plot(data["best"]["minutes"], data["best"]["top1"], "o--", color="tab:cyan",
                label="top-1, best setting per checkpoint")
        if data.get("top5_meaningful", True):
            ax.plot(data["best"]["minutes"], data["best"]["top5"], "s--", color="gold",
                    label="top-5, best setting per checkpoint")
    else:  # a flat 100% line would read as a result
        ax.plot([], [], " ", label=f"top-5 not shown: 100% with <= {best.TOP5_MEANINGLESS_CLASSES} classes")
    for i, phase in enumerate(data["phases"]):
        if phase["minutes"] is None:
            continue
        if i:
            ax.axvline(phase["minutes"], color="gray", linestyle="--", linewidth=1)
        ax.annotate(phase["label"], (phase["minutes"], 1.0), xytext=(4, -4), textcoords="offset points",
                    ha="left", va="top", color="dimgray", fontsize=9)
    for target in data["targets"]:
        ax.axhline(target["value"], color="tab:orange" if target["metric"] == "top5" else "tab:blue",
                   linestyle=":", linewidth=1.5, label=target["label"])
    hit = data["hit"]
    if hit:
        ax.plot([hit["minutes"]], [hit["value"]], marker="*", markersize=20, color="crimson", linestyle="none",
                zorder=5, label=hit["label"])
    if data.get("hit_best"):
        hb = data["hit_best"]
        ax.plot([hb["minutes"]], [hb["value"]], marker="*", markersize=16, color="darkviolet", linestyle="none",
                zorder=5, label=hb["label"])
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # outside: never over a curve or label
    ax.set_title(data["title"], fontsize=10)
    fig.tight_layout()
    temp = f"{path}.{os.getpid()}.partial.png"  # two sweeps of one run may plot at the same moment
    fig.savefig(temp, dpi=100)
    plt.close(fig)
    os.replace(temp, path)


# ------------------------------------------------------------------------------------------------ reporting
def targets_for(options: SweepOptions, classes: int) -> tuple[float | None, float | None]:
    """The targets to report on; a top-5 target with 5 classes or fewer is refused (any network reaches it), and
    the default target is then top-1 (said so)."""
    if best.top5_meaningful(classes):
        return resolve_targets(options.target_top5, options.target_top1)
    if options.target_top5 is not None:
        raise SweepError(f"--target-top5 {options.target_top5:g}: the run has {classes} classes, so top-5 is 100% for "
                         "any network and the target means nothing; give --target-top1 instead")
    targets = resolve_targets(None, options.target_top1, classes)
    if options.target_top1 is None:
        print(f"with {classes} classes top-5 is 100% for any network: the target is top-1 >= {targets[1]:.2%} "
              "(choose one with --target-top1)")
    return targets


def accuracies(row: dict, top5_meaningful: bool) -> str:
    top5 = f"{row['top5']:.2%}" if top5_meaningful else "n/a"
    return f"top-1 {row['top1']:.2%}, top-5 {top5}"


def report(options: SweepOptions, run: RunRecord, store: ResultStore, jobs: list[Job], targets: tuple) -> None:
    """The table (per checkpoint: the default setting and the best one), the time to the targets of both, the
    best result, sweep.png."""
    rows = store.rows(k for j in jobs for k in j.keys)
    if not rows:
        return
    top5_meaningful = best.top5_meaningful(len(run.classes or []))
    metric = ranking_metric(*targets)
    print(format_table(rows, top5_meaningful, metric))
    wanted = describe_target(*targets)
    store.set_ranked_by(metric)  # export --best ranks as this report does
    several = any(not is_default(r) for r in rows)
    series = [("default setting (x1 raw, no flip)", [r for r in rows if is_default(r)]),
              ("best setting per checkpoint", rows)] if several else [("", rows)]
    for label, chosen_rows in series:
        hit = time_to_accuracy(chosen_rows, *targets)
        of = f" ({label})" if label else ""
        if hit:
            setting = f", setting {describe_setting(hit)}" if several else ""
            print(f"time to {wanted}{of}: {hit['train_seconds']:.1f} s of training ({hit['wall_seconds']:.1f} s "
                  f"wall), step {hit['step']}, epoch {hit['epoch']:.2f}, {hit['checkpoint']}{setting} "
                  f"({accuracies(hit, top5_meaningful)})")
        elif label and chosen_rows:
            print(f"time to {wanted}{of}: not reached")
    if not time_to_accuracy(rows, *targets):
        chosen = best_row(rows, *targets)
        setting = f"setting {describe_setting(chosen)}, " if several else ""
        print(f"no checkpoint reached {wanted}: the best is {chosen['checkpoint']} "
              f"({setting}{accuracies(chosen, top5_meaningful)}; {best.describe(metric)})")
    elif several:
        chosen = best_row(rows, *targets)
        print(f"the best result: {chosen['checkpoint']} with setting {describe_setting(chosen)} "
              f"({accuracies(chosen, top5_meaningful)}; {best.describe(metric)})")
    png = os.path.join(options.run_dir, "sweep.png")
    plot(plot_data(rows, run, targets, f"{options.run_dir}: {options.size_policy} size policy, center crop "
                   f"{options.crop_fraction:g}", top5_meaningful), png)
    print(f"results: {store.csv_path}, {store.json_path}, {png}")
