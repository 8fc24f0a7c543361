"""Worker processes: one per device, each evaluating its checkpoints on the validation set."""
from __future__ import annotations

import multiprocessing
import queue
import signal
import sys
import time

from gluon_imagenet import best, retention, stops
from gluon_imagenet.devices import Device, decode_threads
from gluon_imagenet.sweep_eval.jobs import Job, count_hits_per_flip
from gluon_imagenet.sweep_eval.results import ResultStore
from gluon_imagenet.sweep_eval.settings import setting_of


# ------------------------------------------------------------------------------------------------ evaluating
class Evaluator:
    """One worker's networks and validation iterators, kept for all its checkpoints.

    One iterator per (data dir, size, batch size, crop), reset between checkpoints: re-creating ImageRecordIter
    leaks about its prefetch buffers each time (apache/mxnet#15218; bench/sweep_memory.py measures it), which
    over hundreds of checkpoints at ImageNet batch sizes is gigabytes per worker. The iterator pins its batches
    for the worker's own GPU (device_id), so a worker never opens a CUDA context on GPU 0."""

    def __init__(self, device: Device, threads: int):
        self.device = device
        self.ctx = device.context
        self.threads = threads
        self.nets: dict[tuple, object] = {}
        self.iterators: dict[tuple, tuple] = {}  # key -> (iterator, images in the split)

    def net(self, model: str, classes: int):
        from gluon_imagenet.model import build_model

        if (model, classes) not in self.nets:
            net = build_model(model, classes)
            net.hybridize(static_alloc=True, static_shape=True)
            self.nets[(model, classes)] = net
        return self.nets[(model, classes)]

    def iterator(self, data_root: str, data_dir: str, image_size: int, batch_size: int, crop_fraction: float):
        from gluon_imagenet.data.iterators import packed_count, val_iterator

        key = (data_root, data_dir, image_size, batch_size, crop_fraction)
        if key not in self.iterators:
            self.iterators[key] = (val_iterator(data_root, data_dir, image_size, batch_size, self.threads,
                                                crop_fraction, device_id=self.device.iterator_device_id),
                                   packed_count(data_root, data_dir, "val"))
        iterator, total = self.iterators[key]
        iterator.reset()  # also after a pass that stopped early (an error in the previous checkpoint)
        return iterator, total

    def evaluate(self, job: Job) -> dict:
        """The result of the job's first flip setting (see evaluate_all)."""
        return self.evaluate_all(job)[0][1]

    def evaluate_all(self, job: Job) -> list[tuple[str, dict]]:
        """[(key, result)] for each of the job's flip settings, from one pass over the validation data."""
        start = time.time()
        net = self.net(job.model, job.classes)
        net.load_parameters(job.weights_path, ctx=self.ctx)
        iterator, total = self.iterator(job.data_root, job.data_dir, job.image_size, job.batch_size,
                                        job.crop_fraction)
        counted = count_hits_per_flip(net, self.ctx, iterator, total, job.batch_size, job.flips)
        seconds = round(time.time() - start, 2)
        r = job.record
        rows = []
        for flip, (top1, top5, images) in zip(job.flips, counted):
            if images != total:
                raise RuntimeError(f"evaluated {images} validation images of {total} in {job.data_dir}")
            rows.append((job.key_for(flip), {
                "checkpoint": job.checkpoint, "step": r.step, "epoch": round(r.epoch, 4),
                "train_seconds": round(r.train_seconds, 2), "wall_seconds": round(r.wall_seconds, 2),
                "image_size": job.image_size, "data_dir": job.data_dir, "crop_fraction": job.crop_fraction,
                "batch_size": job.batch_size, "data_root": job.data_root, "data_id": job.data_id,
                "eval_scale": job.eval_scale, "flip": flip, "weights": job.weights, "ema_sha256": job.ema_sha256,
                "params_sha256": job.params_sha256, "top1": top1 / images, "top5": top5 / images, "images": images,
                "classes": job.classes, "top5_meaningful": best.top5_meaningful(job.classes),
                "eval_seconds": seconds, "device": str(self.device)}))
        return rows


def worker_main(device: Device, jobs: list[Job], threads: int, results) -> None:
    """One process per device: evaluate its checkpoints in order, put each result on the queue."""
    stops.ignore_in_child()
    evaluator = Evaluator(device, threads)
    for job in jobs:
        try:
            rows = evaluator.evaluate_all(job)
        except Exception as e:  # one bad checkpoint must not stop the others
            pruned = retention.was_pruned(job.params_path[: -len(".params")] + ".json", True)
            for key in job.keys:
                if pruned:
                    results.put(("pruned", key, retention.PRUNED))
                else:
                    results.put(("error", key, f"{type(e).__name__}: {e}"))
            continue
        for key, row in rows:
            results.put(("done", key, row))


def start_worker(proc) -> None:
    """Start with SIGINT and SIGTERM blocked: the spawned interpreter inherits the mask, so a Ctrl-C reaching the
    process group while it imports MXNet (before it can ignore signals) prints no traceback of its own; a stop
    arriving meanwhile waits here and is raised once they are unblocked."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops.SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def run_jobs(jobs: list[Job], devices: list[Device], store: "ResultStore", board=None,
             board_scale: float = 1.0) -> tuple[dict[str, str], dict[str, str]]:
    """Round-robin over devices; results stored (and drawn on the TensorBoard `board`) as they arrive. Returns
    (errors, pruned checkpoints) by job key.
    On any way out (a stop included) the workers are killed: they ignore SIGINT and SIGTERM."""
    context = multiprocessing.get_context("spawn")  # a fresh MXNet engine per worker
    results = context.Queue()
    threads = decode_threads(len(devices)).threads  # the trainer's and the doctor's rule
    processes = []
    try:
        for i, device in enumerate(devices):
            share = jobs[i:: len(devices)]
            if share:
                proc = context.Process(target=worker_main, args=(device, share, threads, results), daemon=True)
                start_worker(proc)
                processes.append((proc, {k for j in share for k in j.keys}))
        return collect(jobs, processes, results, store, board, board_scale)
    finally:
        for proc, _ in processes:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)


def collect(jobs: list[Job], processes: list, results, store: "ResultStore", board=None, board_scale: float = 1.0):
    from tqdm import tqdm

    pending, errors, pruned = {k for j in jobs for k in j.keys}, {}, {}
    with tqdm(total=len(pending), desc="checkpoints", unit="result", file=sys.stderr) as bar:  # closed before a stop's line
        images = 0
        start = time.time()
        while pending:
            try:
                kind, key, payload = results.get(timeout=5)
            except queue.Empty:
                for proc, keys in processes:
                    lost = keys & pending
                    if not proc.is_alive() and lost:  # a crashed worker: its other checkpoints are reported
                        for k in sorted(lost):
                            errors[k] = f"worker on {proc.name} exited with code {proc.exitcode}"
                        pending -= lost
                continue
            pending.discard(key)
            if kind == "done":
                store.add(key, payload)
                if board is not None and setting_of(payload) == (board_scale, False, "raw"):
                    board.add(payload)  # one curve: the first scale's, raw weights, no flip
                if not payload["flip"]:  # one decode per image, whatever the flips
                    images += payload["images"]
                bar.set_postfix_str(f"{images / (time.time() - start):.0f} img/s")
            else:
                (pruned if kind == "pruned" else errors)[key] = payload
            bar.update()
    for proc, _ in processes:
        proc.join(timeout=30)
    return errors, pruned
