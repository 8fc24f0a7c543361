"""The whole job on a small generated dataset: generate -> pack -> train (horovodrun, 2 ranks) -> sweep ->
export the best checkpoint (MXNet and ONNX) and classify one validation image with it -> the one-page report.

    make demo                      # sets up .venv first, then runs this
    .venv/bin/python tools/demo.py --out demo --train-per-class 300 --val-per-class 40

Every step is one of the toolkit's own command lines, printed before it runs. Re-running continues: the images
and packed data are kept, training resumes from its newest checkpoint, the sweep evaluates only new ones.
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(title, cmd, env=None):
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: '{title}' failed with exit code {proc.returncode}; fix the error above and re-run "
                 "(finished steps are kept)")
    return time.time() - start


def predict_one(python, model_dir, image):
    """Classify one image with the exported model; returns its summary line."""
    cmd = [python, "-m", "gluon_imagenet.predict", model_dir, image, "--top", "3", "--json"]
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: predicting {image} failed with exit code {proc.returncode}:\n{proc.stderr}")
    top = json.loads(proc.stdout)["predictions"][0]["top"]
    true_class = os.path.basename(os.path.dirname(image))  # val/<class>/<file>
    return (f"prediction for {image} (true class {true_class}): "
            + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in top))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="folder for images, packed data and the run (default: demo)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--sizes", nargs="+", default=["40", "80"], help="short sides to pack (the recipe's data dirs)")
    p.add_argument("--model", default="resnet18_v1b", help="resnet18_v1b keeps the CPU demo short")
    p.add_argument("--np", type=int, default=2, help="training processes (horovodrun -np)")
    p.add_argument("--target-top1", default="0.7")
    a = p.parse_args()

    python = sys.executable
    bin_dir = os.path.dirname(python)
    images, recordio, run = (os.path.join(a.out, name) for name in ("images", "recordio", "run"))
    seconds = {}
    if not os.path.isdir(os.path.join(images, "val")):
        seconds["generate"] = step("1/5 generate a small dataset in the ImageNet layout", [
            python, "-m", "gluon_imagenet.data.demo", images, "--train-per-class", str(a.train_per_class),
            "--val-per-class", str(a.val_per_class)])
    seconds["pack"] = step("2/5 pack it into RecordIO at two sizes", [
        python, "tools/im2rec_multi.py", images, "--root", recordio, "--sizes", *a.sizes])
    # One thread per rank: the ranks share the machine's cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1")
    train = [os.path.join(bin_dir, "horovodrun"), "--gloo", "-np", str(a.np), "-H", f"localhost:{a.np}", python,
             "-m", "gluon_imagenet.train", "--recipe", a.recipe, "--data-root", recordio, "--run-dir", run,
             "--model", a.model, "--threads", "1"]
    if os.path.isdir(run):
        train.append("--resume")
    seconds["train"] = step(f"3/5 train with progressive resizing on {a.np} Horovod ranks", train, env)
    seconds["sweep"] = step("4/5 evaluate every checkpoint on 2 worker processes", [
        python, "-m", "gluon_imagenet.sweep_eval", "--run-dir", run, "--workers", "2", "--target-top1",
        a.target_top1])
    model = os.path.join(run, "export", "best")  # a fixed name: a re-run replaces it with the new best
    start = time.time()
    step("5/5 export the best checkpoint and classify one validation image", [
        python, "-m", "gluon_imagenet.export", "--run-dir", run, "--best", "--out", model, "--onnx"])
    prediction = predict_one(python, model, sorted(glob.glob(os.path.join(images, "val", "*", "*")))[0])
    seconds["export"] = time.time() - start
    report = os.path.join(run, "report.png")
    seconds["report"] = step("the run on one page", [python, "-m", "gluon_imagenet.report", run, "--target-top1",
                                                     a.target_top1])
    print("\n=== demo done: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    print(f"report: {report}   plot: {os.path.join(run, 'sweep.png')}   table: {os.path.join(run, 'sweep.csv')}   "
          f"training log: {os.path.join(run, 'metrics.jsonl')}   run record: {os.path.join(run, 'run.json')}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(run, 'tensorboard')}")
    print(f"model: {model} (python -m gluon_imagenet.predict {model} IMAGE..., --runtime onnx for its model.onnx)")
    print(prediction)


if __name__ == "__main__":
    main()
