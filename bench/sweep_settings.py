"""Evaluation images/s per sweep setting, side by side in one process on one checkpoint:

    .venv/bin/python bench/sweep_settings.py --repeats 5

Ways, interleaved (each repeat runs every way once, so load from other processes falls on all alike):
  before      the sweep's evaluation loop as it was before settings existed (count_hits, copied below verbatim),
              over the Evaluator's own iterator and network
  x1          Evaluator.evaluate_all at scale 1, no flip (the default setting now)
  x1 +flip    scale 1, with and without flip from one pass: one decode, two forward passes, two results
  x1.15       scale 1.15 (a larger crop from the same packed data)
Data: generated 500x375 JPEGs packed at short side 256 (temporary folder), a randomly initialised checkpoint
(bench/sweep_memory.py's helpers). img/s = validation images / seconds of one pass (median over repeats).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def count_hits_before(net, ctx, iterator, total: int, batch_size: int):
    """sweep_eval.count_hits before --flip (commit 15a6ea5), for the side-by-side."""
    import mxnet as mx

    top1 = top5 = seen = 0
    for batch in iterator:
        real = min(batch_size, total - seen)
        if real <= 0:
            break
        scores = net(batch.data[0].as_in_context(ctx))[:real]
        labels = batch.label[0][:real].as_in_context(ctx).reshape((-1, 1))
        ranked = mx.nd.topk(scores, k=min(5, scores.shape[1]), ret_typ="indices").astype(labels.dtype)
        top1 += int((ranked[:, 0:1] == labels).sum().asscalar())
        top5 += int((ranked == labels).sum().asscalar())
        seen += real
    return top1, top5, seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=128, help="validation images (10 classes)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="resnet18_v1b")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from sweep_memory import make_checkpoint, make_data

    from gluon_imagenet.checkpoint import Record
    from gluon_imagenet.devices import Device
    from gluon_imagenet.sweep_eval.evaluate import Evaluator
    from gluon_imagenet.sweep_eval.jobs import Job
    from gluon_imagenet.sweep_eval.plan import round8

    work = tempfile.mkdtemp(prefix="sweep-settings-")
    try:
        root = os.path.abspath(make_data(work, args.images))
        params = make_checkpoint(work, args.model, 10)
        record = Record(step=1, epoch=1.0, train_seconds=1.0, wall_seconds=1.0)

        def job(scale, flips):
            size = args.size if scale == 1 else round8(args.size * scale)
            return Job("ckpt-bench", params, args.model, 10, size, "256", record, 0.875, args.batch, root, "bench",
                       scale, flips)

        evaluator = Evaluator(Device("cpu"), args.threads)

        def before():
            net = evaluator.net(args.model, 10)
            net.load_parameters(params, ctx=evaluator.ctx)
            iterator, total = evaluator.iterator(root, "256", args.size, args.batch, 0.875)
            return count_hits_before(net, evaluator.ctx, iterator, total, args.batch)[2]

        ways = {"before": before,
                "x1": lambda: evaluator.evaluate_all(job(1.0, (False,)))[0][1]["images"],
                "x1 +flip": lambda: evaluator.evaluate_all(job(1.0, (False, True)))[0][1]["images"],
                "x1.15": lambda: evaluator.evaluate_all(job(1.15, (False,)))[0][1]["images"]}
        for way in ways.values():  # warm-up: graphs built, iterators created
            way()
        rates = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                images = way()
                rates[name].append(images / (time.perf_counter() - start))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.model}, {args.images} validation images, batch {args.batch}, {args.threads} threads, CPU; median "
          f"of {args.repeats} interleaved passes")
    base = statistics.median(rates["before"])
    # Paired: each repeat's pass against the `before` pass of the same repeat, so a load change between repeats
    # (other processes on a shared machine) falls on both sides of the ratio.
    print(f"{'setting':<10} {'crop':>5} {'img/s':>7} {'vs before':>10} {'paired':>8}  (min..max img/s)")
    for name, values in rates.items():
        crop = round8(args.size * 1.15) if name == "x1.15" else args.size
        median = statistics.median(values)
        paired = statistics.median(v / b for v, b in zip(values, rates["before"]))
        print(f"{name:<10} {crop:>5} {median:>7.1f} {100 * (median / base - 1):>+9.1f}% {100 * (paired - 1):>+7.1f}%  "
              f"({min(values):.1f}..{max(values):.1f})")


if __name__ == "__main__":
    main()
