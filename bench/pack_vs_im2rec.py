"""Benchmark: tools/im2rec_multi.py packing sizes 160 and 320 against MXNet's own im2rec run once per size.

    .venv/bin/python bench/pack_vs_im2rec.py --images 2000

Same input for both: generated 500x375 JPEGs with texture (not flat colour), in 10 class folders. im2rec gets
--resize S --num-thread <cores> --quality 90 for each size, after one `--list` pass; im2rec_multi gets
--sizes 160 320 --workers <cores> --quality 90. Reports wall seconds and the ratio (im2rec / im2rec_multi).
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

from gluon_imagenet.data.demo import CLASSES, generate


def timed(cmd, **kw):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 320])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_pack_")
    try:
        src = os.path.join(work, "src")
        generate(src, train_per_class=a.images // len(CLASSES), val_per_class=0, size=(375, 500))
        shutil.rmtree(os.path.join(src, "val"))
        train = os.path.join(src, "train")
        n = sum(len(files) for _, _, files in os.walk(train))
        print(f"{n} images of 500x375 px, sizes {a.sizes}, {a.workers} workers/threads, {os.cpu_count()} cores")
        ours, theirs = [], []
        for _ in range(a.repeats):
            out = os.path.join(work, "ours")
            shutil.rmtree(out, ignore_errors=True)
            ours.append(timed([sys.executable, os.path.join(ROOT, "tools", "im2rec_multi.py"), src, "--root", out,
                               "--splits", "train", "--sizes", *map(str, a.sizes), "--workers", str(a.workers),
                               "--quality", "90"]))
            out = os.path.join(work, "im2rec")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            start = time.perf_counter()
            prefix = os.path.join(out, "train")
            subprocess.run([sys.executable, "-m", "mxnet.tools.im2rec", "--list", "--recursive", prefix, train],
                           check=True, stdout=subprocess.DEVNULL)
            for size in a.sizes:
                folder = os.path.join(out, str(size))
                os.makedirs(folder)
                shutil.copy(prefix + ".lst", os.path.join(folder, "train.lst"))
                subprocess.run([sys.executable, "-m", "mxnet.tools.im2rec", "--resize", str(size), "--num-thread",
                                str(a.workers), "--quality", "90", os.path.join(folder, "train"), train], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            theirs.append(time.perf_counter() - start)
        best_ours, best_theirs = min(ours), min(theirs)
        print(f"{'tool':<34} {'seconds':>8} {'img/s':>8}")
        print(f"{'im2rec_multi (one pass, all sizes)':<34} {best_ours:>8.2f} {n / best_ours:>8.1f}")
        print(f"{'mxnet.tools.im2rec (once per size)':<34} {best_theirs:>8.2f} {n / best_theirs:>8.1f}")
        print(f"ratio (im2rec / im2rec_multi): {best_theirs / best_ours:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
