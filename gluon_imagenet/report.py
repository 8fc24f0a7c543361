"""One picture of a run: python -m gluon_imagenet.report RUN_DIR writes RUN_DIR/report.png.

    python -m gluon_imagenet.report runs/demo --target-top1 0.7

Header: recipe, model, world size, device, AMP, steps, wall and training time. Panels: the training loss (each
step, and smoothed) with the learning rate against steps; img/s per phase (median of the logged rates, the
first log line of each phase left out: it includes the phase's start-up); the sweep's top-1 and top-5 against
training minutes, with the phases as bands labelled by image size, the target and the first checkpoint reaching
it (the numbers are sweep_eval.plot_data's, as in sweep.png). Reads run.json, metrics.jsonl, the checkpoint
records and sweep.json; a part that is missing is said in its panel.

Exit codes: 0 written; 2 RUN_DIR is not a run folder or an argument is unusable (nothing written).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from gluon_imagenet import checkpoint
from gluon_imagenet.rundir import RunDirError, RunRecord
from gluon_imagenet.sweep_eval.plan import SweepError
from gluon_imagenet.sweep_eval.report import describe_target, plot_data, resolve_targets
from gluon_imagenet.sweep_eval.results import SweepResultsError, read_results

SMOOTHING = 0.9  # exponential moving average weight, as TensorBoard's smoothing slider
PHASE_COLOURS = ("#dbe9f6", "#fde8d4", "#dff2dc", "#eee1f3", "#f7f3d0")


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl's steps (torn lines skipped: a crash may leave one)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                row["loss"] = float(row["loss"])  # "nan" / "inf" are written as strings
                rows.append(row)
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def newest_record(run_dir: str) -> checkpoint.Record:
    """The checkpoint record with the most steps (its wall and training seconds); an empty Record without
    checkpoints."""
    best = checkpoint.Record()
    for _, path in checkpoint.candidates(run_dir):
        try:
            record = checkpoint.read_record(path) if path else None
        except (OSError, ValueError):
            continue
        if record is not None and isinstance(record.step, int) and record.step > (best.step or -1):
            best = record
    return best


def sweep_rows(run_dir: str) -> list[dict]:
    """Every stored result, by step (plot_data picks each checkpoint's default and best setting from them); none
    when sweep.json is damaged (said so: the sweep moves it aside and evaluates again)."""
    try:
        results = read_results(run_dir).results
    except SweepResultsError as e:
        print(f"warning: {e}", file=sys.stderr)
        return []
    return sorted(results.values(), key=lambda r: r["step"])


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average; non-finite values are skipped (and drawn as gaps)."""
    out, last, count = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        count += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** count))
    return out


def phase_rates(metrics: list[dict], phases: list) -> list[float | None]:
    """Median logged img/s of each phase (rundir.PlannedPhase), without its first log line (start-up, new input
    stream)."""
    rates = []
    for p in phases:
        logged = [m["img_per_s"] for m in metrics if "img_per_s" in m and p.first_step <= m["step"] < p.end_step]
        logged = logged[1:] if len(logged) > 1 else logged
        rates.append(statistics.median(logged) if logged else None)
    return rates


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d} min"


def header(run: RunRecord, record: checkpoint.Record, metrics: list[dict]) -> str:
    total = run.final_step
    done = record.step if record.step is not None else metrics[-1]["step"] + 1 if metrics else 0
    amp = run.amp_dtype or "off"
    return (f"{run.recipe.get('name', '?')}  ·  {run.model or '?'}  ·  "
            f"{run.world_size or '?'} worker(s) on {run.device or '?'}  ·  AMP {amp}\n"
            f"step {done}/{total}  ·  wall {duration(record.wall_seconds)}  ·  training "
            f"{duration(record.train_seconds)}")


def draw(run_dir: str, run: RunRecord, targets, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    metrics, record, rows = read_metrics(run_dir), newest_record(run_dir), sweep_rows(run_dir)
    phases = run.phases
    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.15], hspace=0.38, wspace=0.55)
    fig.suptitle(header(run, record, metrics), fontsize=12, y=0.985)

    # --- loss and lr against steps
    ax = fig.add_subplot(grid[0, :2])
    if metrics:
        steps = [m["step"] + 1 for m in metrics]
        losses = [m["loss"] for m in metrics]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (each step)")
        ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label=f"loss (smoothed {SMOOTHING:g})")
        for p in phases[1:]:
            ax.axvline(p.first_step, color="gray", linestyle="--", linewidth=1)
        for p in phases:
            ax.annotate(f"{p.image_size} px", (p.first_step, 1), xycoords=("data", "axes fraction"),
                        xytext=(4, -4), textcoords="offset points", va="top", fontsize=9, color="dimgray")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [m["lr"] for m in metrics], color="tab:red", linewidth=1.5, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="tab:red")
        lr_ax.tick_params(axis="y", colors="tab:red")
        lr_ax.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=9)
        ax.set_xlim(0, run.final_step)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_title("training loss and learning rate", fontsize=11)
    ax.grid(alpha=0.3)

    # --- img/s per phase
    ax = fig.add_subplot(grid[0, 2])
    rates = phase_rates(metrics, phases)
    labels = [f"phase {i + 1}\n{p.image_size} px" for i, p in enumerate(phases)]
    bars = ax.bar(labels, [r or 0 for r in rates], color=[PHASE_COLOURS[i % len(PHASE_COLOURS)] for i in
                                                          range(len(phases))], edgecolor="dimgray")
    for bar, rate in zip(bars, rates):
        ax.annotate("not run" if rate is None else f"{rate:.0f}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=10)
    ax.set_ylabel("img/s (all workers)")
    ax.set_title("training throughput per phase (median)", fontsize=11)
    ax.set_ylim(0, max([r or 0 for r in rates] + [1]) * 1.18)
    ax.grid(alpha=0.3, axis="y")

    # --- the sweep's accuracy against training minutes
    ax = fig.add_subplot(grid[1, :])
    if rows:
        data = plot_data(rows, run, targets)
        ends = [p["minutes"] for p in data["phases"][1:]] + [max(data["minutes"])]
        for i, (phase, end) in enumerate(zip(data["phases"], ends)):
            if phase["minutes"] is None or end is None:
                continue
            ax.axvspan(phase["minutes"], end, color=PHASE_COLOURS[i % len(PHASE_COLOURS)], zorder=0)
            ax.annotate(f"phase {i + 1}: {phase['label']}", ((phase["minutes"] + end) / 2, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, -5), textcoords="offset points",
                        ha="center", va="top", fontsize=10, color="dimgray")
        of_default = ", default setting" if data.get("best") else ""
        ax.plot(data["minutes"], data["top1"], "o-", color="tab:blue", label=f"top-1{of_default}")
        ax.plot(data["minutes"], data["top5"], "s-", color="tab:orange", label=f"top-5{of_default}")
        if data.get("best"):  # other settings evaluated (scales, flip, EMA weights): the best one per checkpoint
            ax.plot(data["best"]["minutes"], data["best"]["top1"], "o--", color="tab:cyan",
                    label="top-1, best setting")
            ax.plot(data["best"]["minutes"], data["best"]["top5"], "s--", color="gold", label="top-5, best setting")
        for target in data["targets"]:
            ax.axhline(target["value"], color="tab:orange" if target["metric"] == "top5" else "tab:blue",
                       linestyle=":", linewidth=1.8, label=target["label"])
        hit = data.get("hit_best") or data["hit"]
        if hit:
            ax.plot([hit["minutes"]], [hit["value"]], marker="*", markersize=20, color="crimson", linestyle="none",
                    zorder=5, label=hit["label"].replace("\n", " "))
        else:
            ax.text(0.99, 0.04, f"no checkpoint reached {describe_target(*targets)}", transform=ax.transAxes,
                    ha="right", fontsize=10, color="black")
        ax.set_xlim(0, max(data["minutes"]) * 1.02 or 1)
        # Below the panel: never over a curve or a phase label.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=5, fontsize=9, frameon=False)
    else:
        ax.text(0.5, 0.5, f"no sweep results yet: python -m gluon_imagenet.sweep_eval --run-dir {run_dir}",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("validation accuracy of each checkpoint (the sweep)", fontsize=11)
    ax.grid(alpha=0.3)

    temp = f"{out}.{os.getpid()}.partial.png"
    fig.savefig(temp, dpi=90)
    plt.close(fig)
    os.replace(temp, out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder written by gluon_imagenet.train")
    p.add_argument("--target-top5", type=float, help="target top-5, 0-1 (default 0.93 when no --target-top1)")
    p.add_argument("--target-top1", type=float, help="target top-1, 0-1")
    p.add_argument("--out", help="picture to write (default: RUN_DIR/report.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for flag, value in (("--target-top5", args.target_top5), ("--target-top1", args.target_top1)):
            if value is not None and not 0 <= value <= 1:
                raise SweepError(f"{flag} {value:g}: must be an accuracy in [0, 1], e.g. 0.7 for 70%")
        run = RunRecord.read(args.run_dir)
    except (SweepError, RunDirError) as e:
        print(f"error: {str(e).replace('--run-dir ', 'run folder ', 1)}", file=sys.stderr)  # the sweep's words
        return 2
    out = args.out or os.path.join(args.run_dir, "report.png")
    draw(args.run_dir, run, resolve_targets(args.target_top5, args.target_top1), out)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
