"""The first command on a new machine: can this machine train a recipe, and if not, what to fix.

    python -m gluon_imagenet.doctor
    python -m gluon_imagenet.doctor --recipe recipes/imagenet104.yaml --data-root recordio --run-dir runs/imagenet104 \\
        --ranks 8

It prints one line per check, ok / warning / FAILURE (and plain "-" lines that only inform), each problem with its
fix, and exits 1 when anything failed (0 otherwise, 2 for a bad command line):

  versions   python, mxnet, numpy, gluoncv, horovod; the gluoncv networks the toolkit builds
  features   MXNet's build features (mx.runtime.Features(): CUDA, CUDNN, NCCL, MKLDNN, OPENCV, ...)
  gpus       each GPU's compute capability against the GPU code in this MXNet build (pip's mxnet-cu117 has
             sm_50..sm_86 and no PTX: nothing runs on Hopper, H100/H200)
  amp        the trainer's own step (learner.Learner.step, its optimizer and AMP set-up: float16 on a GPU,
             bfloat16 on a CPU that has the instructions, else float32) on each device, each in its own process
             (amp.init() changes a process for good, and a CUDA failure can kill it); then a checkpoint of it by
             checkpoint.save, loaded into a fresh Learner: parameters, optimizer state, loss scaler equal
  horovod    Horovod built with MXNet, and with NCCL / Gloo / MPI; under horovodrun, an allreduce and a
             broadcast of known tensors across the ranks (rank 0 then runs the other checks)
  threads    decode threads per rank by the trainer's rule (devices.decode_threads) against the CPUs
  data       the recipe's packed data by the trainer's own check (packed.check_for), the evaluation split too,
             and the first record of each split decoded (with --recipe and --data-root)
  disk       the run folder writable (a probe file) and its free space against the epoch checkpoints the plan
             writes (with --recipe, --run-dir)
  memory     per phase, one step with the trainer's Learner at its batch and image size, peak memory against
             the device's (GPU 0, or the host), and the largest batch that fits when it does not (memory_probe)

Engine variables MXNet would abort or hang on are refused first (exit 2, engine_env.py). Nothing here changes the
machine: it writes nothing but a probe file in --run-dir (or where it will be created; removed at once) and
temporary checkpoints of the probe step in the system's temporary folder.
"""
from __future__ import annotations

import argparse
import os
import sys

from gluon_imagenet.doctor.cluster import check_collectives, check_horovod, check_threads
from gluon_imagenet.doctor.gpus import check_amp, check_gpus, list_gpus, mxnet_gpu_archs
from gluon_imagenet.doctor.software import check_features, check_versions, mxnet_features
from gluon_imagenet.doctor.storage import check_data, check_disk, check_run_dir, checkpoint_bytes, load_recipe_file
from gluon_imagenet.names import MODELS  # importable without MXNet: the doctor must start when MXNet does not
from gluon_imagenet.train.probes import Result


# ------------------------------------------------------------------------------------------------ table
def format_table(results: list[Result]) -> str:
    labels = {"ok": "ok", "info": "-", "warning": "warning", "failure": "FAILURE"}
    width = max(len(r.check) for r in results)
    lines = []
    for r in results:
        lines.append(f"{labels[r.status]:<8} {r.check:<{width}}  {r.detail}")
        if r.fix and r.status in ("warning", "failure"):
            lines.append(f"{'':<8} {'':<{width}}  fix: {r.fix}")
    failures = sum(r.status == "failure" for r in results)
    warnings = sum(r.status == "warning" for r in results)
    lines.append("")
    lines.append(f"{failures} failure(s), {warnings} warning(s)" + (": fix the failures before training" if failures
                                                                      else ""))
    return "\n".join(lines)


CHECKS = ("versions", "features", "gpus", "amp", "horovod", "threads", "data", "disk", "memory")


def run_checks(args, collectives: Result | None = None) -> list[Result]:
    wanted = set(args.checks.split(",")) if args.checks else set(CHECKS)
    results: list[Result] = []
    gpus, how = list_gpus()
    ranks = args.ranks or max(1, len(gpus))
    if "versions" in wanted:
        results += check_versions(ranks)
    if "features" in wanted:
        results += check_features(mxnet_features(), gpus)
    if "gpus" in wanted:
        results += check_gpus(gpus, how, mxnet_gpu_archs() if gpus else None)
    if "amp" in wanted:
        results += check_amp(gpus, args.model)
    if "horovod" in wanted:
        results += check_horovod(gpus, ranks)
        results.append(collectives or Result("info", "collectives", "not checked: run the doctor under horovodrun "
                                                                    "(horovodrun -np N python -m gluon_imagenet.doctor)"))
    if gpus and "features" in wanted:
        from gluon_imagenet.gpu_settings import settings_for

        applied = [name for name, c in settings_for("gpu", os.environ).items() if c.applied]
        results.append(Result("info", "environment", f"a GPU run sets {len(applied)} MXNet/Horovod variables you have "
                                                     "not set: python -m gluon_imagenet.gpu_settings gpu"))
    if "threads" in wanted:
        results += check_threads(ranks, args.threads)
    recipe, classes, recipe_results = None, None, []
    if args.recipe and {"data", "disk", "memory"} & wanted:
        recipe, recipe_results = load_recipe_file(args.recipe)
        results += recipe_results  # reported once; the checks that need the recipe say they were skipped
    not_loaded = "not checked: the recipe did not load (see the recipe line)"
    if "data" in wanted or ("memory" in wanted and recipe is not None):
        if recipe is not None and args.data_root:
            data_results, classes = check_data(args.recipe, args.data_root)
            if "data" in wanted:
                results += data_results
        elif "data" in wanted:
            results.append(Result("info", "data", not_loaded if recipe_results else
                                  "not checked: give --recipe and --data-root"))
    if "disk" in wanted:
        if args.run_dir:
            results += check_run_dir(args.run_dir)
        if recipe is not None and args.run_dir:
            results += check_disk(args.run_dir, recipe.total_epochs, checkpoint_bytes(args.model,
                                                                                      len(classes or []) or 1000))
        else:
            results.append(Result("info", "disk", not_loaded if recipe_results else
                                  "not checked: give --recipe and --run-dir"))
    if "memory" in wanted:
        if recipe is not None:
            from gluon_imagenet.train.memory_probe import check_memory

            results += check_memory(recipe, args.model, len(classes or []) or 1000, gpus, amp=not args.no_amp,
                                    ranks=ranks)
        else:
            results.append(Result("info", "memory", not_loaded if recipe_results else "not checked: give --recipe"))
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe YAML: checks its packed data and the disk its checkpoints need")
    p.add_argument("--data-root", default=None, help="packed data root (with --recipe)")
    p.add_argument("--run-dir", help="the run folder: checks its free space against the plan's checkpoints")
    p.add_argument("--ranks", type=int, default=0, help="training processes on this machine (default: GPUs, or 1)")
    p.add_argument("--threads", type=int, default=0, help="decode threads per rank, as given to train (default: "
                                                          "the trainer's rule: usable CPUs per rank)")
    p.add_argument("--model", choices=MODELS, default="resnet50_v1b", help="network for the step and the sizes")
    p.add_argument("--no-amp", action="store_true", help="the memory probe in float32, as train --no-amp")
    p.add_argument("--checks", help=f"comma-separated subset of {','.join(CHECKS)} (default: all)")
    args = p.parse_args(argv)
    if args.checks and not set(args.checks.split(",")) <= set(CHECKS):
        p.error(f"--checks {args.checks}: use names from {','.join(CHECKS)}")
    if args.ranks < 0 or args.threads < 0:
        p.error("--ranks and --threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gluon_imagenet.engine_env import problem as engine_problem

    if engine_problem(os.environ):  # MXNet would abort (exit 134) or hang on it in every check below
        print(f"error: {engine_problem(os.environ)}", file=sys.stderr, flush=True)
        return 2
    from gluon_imagenet.dist import Ranks

    collectives = None
    if any(name in os.environ for name in Ranks.LAUNCHER_RANK_VARIABLES) and "horovod" in (args.checks or "horovod"):
        rank, local_size, collectives = check_collectives(bool(list_gpus()[0]))
        if rank != 0:  # rank 0 runs every other check once, for the machine; the others are done
            return 0 if collectives.status == "ok" else 1
        args.ranks = args.ranks or local_size
    results = run_checks(args, collectives)
    print(format_table(results), flush=True)
    return 1 if any(r.status == "failure" for r in results) else 0
