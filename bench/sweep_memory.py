"""A sweep worker's resident memory over many evaluations: one validation iterator reset between checkpoints (what
sweep_eval's Evaluator does) vs a new iterator per checkpoint (what it did before), side by side in one run:

    .venv/bin/python bench/sweep_memory.py --evaluations 40

Each way runs in its own fresh process (the same sweep_eval.Evaluator, the same checkpoint evaluated again and
again; the re-create way only drops the cached iterator before each evaluation) and records its RSS after every
evaluation. Data: generated 500x375 JPEGs packed at short side 256 (in a temporary folder), a randomly initialised
ResNet-18 checkpoint. Re-creating ImageRecordIter leaks about its prefetch buffers each time (apache/mxnet#15218).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MARKS = (1, 2, 5, 10, 20, 30, 40)


def make_data(work: str, images: int) -> str:
    from gluon_imagenet.data.demo import CLASSES, generate

    src = os.path.join(work, "src")
    generate(src, train_per_class=1, val_per_class=max(1, images // len(CLASSES)), size=(375, 500))
    root = os.path.join(work, "recordio")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "im2rec_multi.py"), src, "--root", root, "--sizes",
                    "256"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return root


def make_checkpoint(work: str, model: str, classes: int) -> str:
    import mxnet as mx

    from gluon_imagenet.model import build_model, initialize

    net = build_model(model, classes)
    initialize(net, mx.cpu())
    net(mx.nd.zeros((1, 3, 32, 32), dtype="uint8"))  # materialise the deferred shapes
    path = os.path.join(work, "ckpt.params")
    net.save_parameters(path)
    return path


def child(args) -> None:
    """One worker: evaluate the checkpoint `--evaluations` times, print the RSS after each as JSON."""
    import psutil

    from gluon_imagenet.checkpoint import Record
    from gluon_imagenet.data.iterators import packed_count
    from gluon_imagenet.devices import Device
    from gluon_imagenet.sweep_eval.evaluate import Evaluator
    from gluon_imagenet.sweep_eval.jobs import Job

    evaluator = Evaluator(Device("cpu"), args.threads)
    job = Job("ckpt-bench", args.params, args.model, args.classes, args.size, "256",
              Record(step=1, epoch=1.0, train_seconds=1.0, wall_seconds=1.0), 0.875, args.batch,
              os.path.abspath(args.root), "bench")
    process = psutil.Process()
    rss, seconds = [], []
    for _ in range(args.evaluations):
        if args.child == "recreate":
            evaluator.iterators.clear()  # the old way: a new ImageRecordIter for every checkpoint
        start = time.perf_counter()
        row = evaluator.evaluate(job)
        seconds.append(time.perf_counter() - start)
        assert row["images"] == packed_count(args.root, "256", "val")
        rss.append(process.memory_info().rss / 2 ** 20)
    print(json.dumps({"rss": rss, "seconds": seconds}))


def growth(rss: list[float], after: int) -> tuple[float, float, float]:
    """(MiB, %, MiB per evaluation) from evaluation `after` to the last."""
    base, last = rss[after - 1], rss[-1]
    return last - base, 100 * (last - base) / base, (last - base) / (len(rss) - after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluations", type=int, default=40)
    p.add_argument("--images", type=int, default=64, help="validation images (10 classes)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="resnet18_v1b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settle", type=int, default=5, help="growth is measured after this many evaluations")
    p.add_argument("--child", choices=("reuse", "recreate"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = tempfile.mkdtemp(prefix="sweep-memory-")
    try:
        root = make_data(work, args.images)
        params = make_checkpoint(work, args.model, args.classes)
        results = {}
        for way in ("reuse", "recreate"):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", way, "--root", root,
                                   "--params", params, "--evaluations", str(args.evaluations), "--size",
                                   str(args.size), "--batch", str(args.batch), "--model", args.model, "--threads",
                                   str(args.threads)], capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode:
                sys.exit(f"{way} failed:\n{proc.stderr[-3000:]}")
            results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.evaluations} evaluations of one {args.model} checkpoint, {args.images} validation images at "
          f"{args.size} px, batch {args.batch}, {args.threads} decode/compute threads, CPU")
    marks = [m for m in MARKS if m <= args.evaluations]
    print(f"{'way':<9} " + " ".join(f"{'RSS@' + str(m):>8}" for m in marks)
          + f" {'growth after ' + str(args.settle):>17} {'MiB/eval':>9} {'s/eval':>7}")
    for way in ("reuse", "recreate"):
        rss = results[way]["rss"]
        mib, pct, per = growth(rss, args.settle)
        secs = sorted(results[way]["seconds"])[len(rss) // 2]
        print(f"{way:<9} " + " ".join(f"{rss[m - 1]:>8.1f}" for m in marks)
              + f" {mib:>+9.1f} MiB {pct:>+5.1f}% {per:>9.2f} {secs:>7.2f}")


if __name__ == "__main__":
    main()
