"""Benchmarks of the trainer against its bare peers, side by side in one run:

    .venv/bin/python bench/trainer_bench.py input    # trainer's input pipeline vs a bare ImageRecordIter
    .venv/bin/python bench/trainer_bench.py loop     # Learner.step vs a minimal hand-written Gluon loop
    .venv/bin/python bench/trainer_bench.py switch   # phase switches: time to first step, memory after 1 and 10
    .venv/bin/python bench/trainer_bench.py ema      # Learner.step with and without the weight EMA's update

Data: generated 500x375 JPEGs packed at short sides 160 and 320 (in a temporary folder).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(work, images):
    from gluon_imagenet.data.demo import CLASSES, generate

    src = os.path.join(work, "src")
    generate(src, train_per_class=max(1, images // len(CLASSES)), val_per_class=1, size=(375, 500))
    root = os.path.join(work, "recordio")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "im2rec_multi.py"), src, "--root", root, "--sizes",
                    "160", "320"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return root


def bench_input(root, batches, threads):
    import mxnet as mx

    from gluon_imagenet.data.iterators import BatchStream, Shard, train_iterator, train_iterator_kwargs

    print(f"{'size':>5} {'batch':>5} {'bare img/s':>11} {'trainer img/s':>14} {'ratio':>6}")
    for size, batch, data_dir in ((128, 64, "160"), (224, 32, "320"), (288, 32, "320")):
        rates = {}
        for which in ("bare", "trainer", "bare2", "trainer2"):  # interleaved, best of two
            if which.startswith("bare"):  # the same ImageRecordIter, read with a plain loop
                it = mx.io.ImageRecordIter(**train_iterator_kwargs(root, data_dir, size, batch, Shard(), 0, threads))
                stream = ((b.data[0], b.label[0]) for b in _forever(it))
            else:
                it = train_iterator(root, data_dir, size, batch, Shard(), 0, threads)
                stream = BatchStream(it).take(batches + 2)
            for k in range(batches + 2):
                if k == 2:
                    start = time.perf_counter()
                data, label = next(stream)
                data.as_in_context(mx.cpu()).wait_to_read()
            rate = batches * batch / (time.perf_counter() - start)
            key = which.rstrip("2")
            rates[key] = max(rates.get(key, 0), rate)
            del stream, it
        print(f"{size:>5} {batch:>5} {rates['bare']:>11.1f} {rates['trainer']:>14.1f} "
              f"{rates['trainer'] / rates['bare']:>6.3f}")


def _forever(it):
    while True:
        try:
            yield it.next()
        except StopIteration:
            it.reset()


def bench_loop(model, size, batch, steps):
    import mxnet as mx
    from mxnet import autograd, gluon

    from gluon_imagenet.model import build_model, initialize, no_weight_decay

    data = mx.nd.random.randint(0, 256, shape=(batch, 3, size, size)).astype("uint8")
    label = mx.nd.random.randint(0, 10, shape=(batch,))

    def trainer_rate(amp_dtype=None):
        from gluon_imagenet.devices import Device
        from gluon_imagenet.dist import Ranks
        from gluon_imagenet.train.learner import Learner

        learner = Learner(model=model, classes=10, device=Device("cpu"), ranks=Ranks(), seed=0, lr=0.01,
                          momentum=0.9, weight_decay=1e-4, label_smoothing=0.0, first_image_size=size,
                          amp_dtype=amp_dtype)
        # The trainer reads the loss back only at log steps: one read per 20 steps, as with --log-every 20.
        losses = []

        def one():
            losses.append(learner.step(data, label, 0.01))
            if len(losses) == 20:
                losses.clear()
        return timed(one)

    def bare_rate():
        net = build_model(model, 10)
        initialize(net, mx.cpu())
        no_weight_decay(net)
        net.hybridize(static_alloc=True, static_shape=True)
        trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.01, "momentum": 0.9, "wd": 1e-4})
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

        def one():
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(batch)
            return loss.mean().asscalar()
        return timed(one)

    def timed(fn):
        for _ in range(2):
            fn()
        mx.nd.waitall()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        mx.nd.waitall()  # steps the trainer has queued but not finished count too
        return steps * batch / (time.perf_counter() - start)

    bare, ours = [], []
    for _ in range(2):  # interleaved, best of two
        bare.append(bare_rate())
        ours.append(trainer_rate())
    print(f"{model} {size} px batch {batch}, {steps} steps: bare Gluon loop {max(bare):.2f} img/s, trainer "
          f"{max(ours):.2f} img/s, ratio {max(ours) / max(bare):.3f}")
    # AMP last: amp.init changes this process for good.
    from mxnet.contrib import amp

    from gluon_imagenet.devices import cpu_supports_bfloat16

    if cpu_supports_bfloat16():
        amp.init(target_dtype="bfloat16")
        label_ = "AMP bfloat16"
    else:
        # MXNet's bfloat16 kernels fail here ("could not create a primitive descriptor iterator"): measure what
        # AMP's plumbing alone costs (loss scaler, overflow check: one read-back per step), arithmetic float32.
        amp.init(target_dtype="bfloat16", target_precision_ops=[], conditional_fp32_ops=[], fp32_ops=[])
        label_ = "AMP plumbing only (no bfloat16 on this CPU)"
    rate = max(trainer_rate("bfloat16") for _ in range(2))
    print(f"trainer with {label_}: {rate:.2f} img/s, ratio to trainer float32 {rate / max(ours):.3f}")


def bench_ema(model, size, batch, steps, every_steps=1):
    """Learner.step without and with the weight EMA (recipe `ema`, updated every `every_steps` steps): steps of the
    two alternate, each timed on its own from mx.nd.waitall() to mx.nd.waitall(), and the medians compared (a
    median shrugs off the bursts of other processes on a shared machine). Then the update alone, the same way."""
    import statistics

    import mxnet as mx

    from gluon_imagenet.devices import Device
    from gluon_imagenet.dist import Ranks
    from gluon_imagenet.recipe import EmaSettings
    from gluon_imagenet.train.learner import Learner

    data = mx.nd.random.randint(0, 256, shape=(batch, 3, size, size)).astype("uint8")
    label = mx.nd.random.randint(0, 10, shape=(batch,))
    learners = {}
    for name, ema in (("without EMA", None), ("with EMA", EmaSettings(0.5, every_steps))):
        learners[name] = Learner(model=model, classes=10, device=Device("cpu"), ranks=Ranks(), seed=0, lr=0.01,
                                 momentum=0.9, weight_decay=1e-4, label_smoothing=0.0, first_image_size=size,
                                 ema=ema)
        if ema:
            learners[name].ema.start_phase(steps_per_epoch=1000, global_step=0)

    def timed(fn):
        mx.nd.waitall()
        start = time.perf_counter()
        fn()
        mx.nd.waitall()
        return time.perf_counter() - start

    for learner in learners.values():  # warm-up: graph building, first allocations
        for _ in range(2):
            timed(lambda: learner.step(data, label, 0.01))
    times = {name: [] for name in learners}
    for _ in range(steps):
        for name, learner in learners.items():
            # Timed in groups of every_steps so that each group holds exactly one update.
            times[name].append(timed(lambda: [learner.step(data, label, 0.01) for _ in range(every_steps)])
                               / every_steps)
    ema = learners["with EMA"].ema
    update = statistics.median(timed(ema.update) for _ in range(20))
    base, with_ema = statistics.median(times["without EMA"]), statistics.median(times["with EMA"])
    print(f"{model} {size} px batch {batch}, {steps} x {every_steps} steps each, {len(ema.names)} arrays averaged "
          f"every {every_steps} step(s): median step without EMA {base * 1e3:.1f} ms, with EMA {with_ema * 1e3:.1f} "
          f"ms ({with_ema / base - 1:+.2%}); one EMA update alone {update * 1e3:.2f} ms ({update / every_steps / base:.2%}"
          " of a step)")


def bench_switch(root, threads, switches=10):
    import mxnet as mx
    import psutil

    from gluon_imagenet.data.iterators import BatchStream, Shard, train_iterator

    process = psutil.Process()
    sizes = [(128, 32, "160"), (224, 16, "320"), (288, 8, "320")]
    print(f"{'switch':>6} {'size':>5} {'to first batch s':>17} {'RSS MiB':>8}")
    rss = {}
    for switch in range(1, switches + 1):
        size, batch, data_dir = sizes[switch % len(sizes)]
        start = time.perf_counter()
        it = train_iterator(root, data_dir, size, batch, Shard(), switch, threads)
        stream = BatchStream(it)
        for data, _ in stream.take(1):
            data.as_in_context(mx.cpu()).wait_to_read()
            first = time.perf_counter() - start
        for _ in stream.take(3):
            pass
        del stream, it
        rss[switch] = process.memory_info().rss / 2 ** 20
        print(f"{switch:>6} {size:>5} {first:>17.3f} {rss[switch]:>8.1f}")
    last = max(rss)
    print(f"RSS after {last} switches / after 1: {rss[last] / rss[1]:.3f} ({rss[last] - rss[1]:+.1f} MiB, "
          f"{(rss[last] - rss[1]) / (last - 1):.1f} MiB per switch)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("input", "loop", "switch", "ema"))
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--model", default="resnet50_v1b")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--switches", type=int, default=10)
    p.add_argument("--every-steps", type=int, default=1, help="ema: update the average every K steps")
    a = p.parse_args()
    if a.what == "loop":
        bench_loop(a.model, a.size, a.batch, a.steps)
        return
    if a.what == "ema":
        bench_ema(a.model, a.size, a.batch, a.steps, a.every_steps)
        return
    work = tempfile.mkdtemp(prefix="bench_trainer_")
    try:
        root = make_data(work, a.images)
        if a.what == "input":
            bench_input(root, a.batches, a.threads)
        else:
            bench_switch(root, a.threads, a.switches)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
