"""Horovod, a real collective under horovodrun, and decode threads."""
from __future__ import annotations

import os
import shutil
import sys

from gluon_imagenet.doctor.gpus import GPU
from gluon_imagenet.train.probes import Result

# Measured on this project's CPU machine (one decode thread): ~400-770 img/s at 224 px.
IMAGES_PER_DECODE_THREAD_224 = 400


# ------------------------------------------------------------------------------------------------ Horovod
def check_horovod(gpus: list[GPU], ranks: int) -> list[Result]:
    """Horovod 0.28.1 has no mxnet_built(): horovod.mxnet imports only when its MXNet extension was built
    (horovod/common/util.py check_extension raises otherwise; `horovodrun --check-build` tests the same way)."""
    try:
        import horovod.mxnet as hvd
    except Exception as e:
        status = "failure" if ranks > 1 else "warning"
        return [Result(status, "horovod.mxnet", f"does not import (not built with MXNet?): {type(e).__name__}: {e}",
                       "bash tools/setup.sh builds Horovod against this mxnet (HOROVOD_WITH_MXNET=1)")]
    out = []
    nccl = hvd.nccl_built()  # NCCL_VERSION_CODE, or 0 (horovod/common/basics.py)
    built = [name for name, yes in (("NCCL" + (f" {nccl}" if nccl > 1 else ""), nccl), ("Gloo", hvd.gloo_built()),
                                    ("MPI", hvd.mpi_built())) if yes]
    detail = f"built with MXNet and {', '.join(built) or 'no collective library'}"
    if not built:
        out.append(Result("failure", "horovod.mxnet", detail, "rebuild with HOROVOD_WITH_GLOO=1 (and NCCL on GPUs)"))
    elif gpus and not nccl:
        out.append(Result("warning", "horovod.mxnet", detail + ": GPU gradients go through host memory",
                          "GLUON_IMAGENET_DEVICE=gpu bash tools/setup.sh builds it with HOROVOD_GPU_OPERATIONS=NCCL"))
    else:
        out.append(Result("ok", "horovod.mxnet", detail))
    if ranks > 1 and not shutil.which("horovodrun"):
        out.append(Result("failure", "horovodrun", "not on PATH", "activate the environment: "
                                                                  "source .venv/bin/activate"))
    return out


def check_collectives(on_gpus: bool) -> tuple[int, int, Result]:
    """Under horovodrun (every rank runs this): an allreduce and a broadcast of known tensors across the ranks,
    through dist.Ranks as the trainer starts Horovod, on each rank's own GPU (NCCL) or on the CPU (Gloo or
    MPI). Returns (rank, local size, the result every rank agrees on); Horovod is shut down on every rank after."""
    import mxnet as mx

    from gluon_imagenet.dist import Ranks

    try:
        ranks = Ranks.start()
    except Exception as e:  # horovod.mxnet missing or not built with MXNet: the horovod line says more
        rank = int(next((os.environ[v] for v in Ranks.LAUNCHER_RANK_VARIABLES if v in os.environ), "0"))
        return rank, 1, Result("failure", "collectives", f"Horovod does not start: {type(e).__name__}: {e}",
                               "bash tools/setup.sh builds Horovod against this mxnet")
    hvd = ranks.horovod
    ctx = mx.gpu(ranks.local_rank) if on_gpus else mx.cpu()
    problem = ""
    try:
        mine = mx.nd.arange(4, ctx=ctx) + 10 * ranks.rank  # rank r holds [10r, 10r+1, 10r+2, 10r+3]
        total = hvd.allreduce(mine, op=hvd.Sum, name="doctor.allreduce").asnumpy().tolist()
        n = ranks.size
        expected = [n * i + 10 * n * (n - 1) / 2 for i in range(4)]
        if total != expected:
            problem = f"rank {ranks.rank}: allreduce gave {total}, expected {expected}"
        sent = mx.nd.full((3,), 7 + ranks.rank, ctx=ctx)
        hvd.broadcast_(sent, root_rank=0, name="doctor.broadcast")
        if not problem and sent.asnumpy().tolist() != [7.0] * 3:
            problem = f"rank {ranks.rank}: broadcast from rank 0 gave {sent.asnumpy().tolist()}, expected [7.0] * 3"
    except Exception as e:  # a collective that fails here would fail the first step of training
        problem = f"rank {ranks.rank}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
    failed = ranks.allreduce_sum(1.0 if problem else 0.0, "doctor.verdict")
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    library = "NCCL" if on_gpus and hvd.nccl_built() else ("Gloo" if hvd.gloo_enabled() else "MPI")
    where = f"{ranks.size} ranks ({ranks.local_size} on this machine), {'each on its GPU' if on_gpus else 'on CPUs'}"
    if failed:
        result = Result("failure", "collectives", f"allreduce / broadcast across {where} via {library}: "
                                                  f"{int(failed)} rank(s) got wrong values or failed (each says "
                                                  "which on stderr)", "check the network between the machines "
                                                                      "and horovodrun's -H; see the errors")
    else:
        result = Result("ok", "collectives", f"allreduce and broadcast of known tensors across {where} via "
                                             f"{library}: every rank got the expected values")
    rank, local_size = ranks.rank, ranks.local_size
    hvd.shutdown()  # every rank together: rank 0's checks below need no collective
    return rank, local_size, result


# ------------------------------------------------------------------------------------------------ threads
def check_threads(ranks: int, threads: int, cores: int | None = None, image_size: int = 224) -> list[Result]:
    """Decode threads per rank by the trainer's own rule (devices.decode_threads); `cores` stands in for this
    process's affinity mask (tests), else the real mask and cgroup quota are read."""
    from gluon_imagenet.devices import decode_threads

    decode = decode_threads(ranks, threads, **({"affinity": cores} if cores else {}))
    per_rank = decode.threads
    rate = per_rank * IMAGES_PER_DECODE_THREAD_224 * (224 / image_size) ** 2
    detail = (f"{decode} x {ranks} rank(s) on {decode.cpus} usable CPU(s): roughly {rate:,.0f} img/s per rank at "
              f"{image_size} px (~{IMAGES_PER_DECODE_THREAD_224} img/s per thread at 224 px)")
    if threads and decode.capped:
        return [Result("warning", "threads", detail, f"--threads {per_rank}: more are not started")]
    if per_rank * ranks > decode.cpus:
        return [Result("warning", "threads", detail + ": more threads than CPUs",
                       f"--threads {max(1, decode.cpus // ranks)} (or fewer ranks per machine)")]
    if per_rank < 2:
        return [Result("warning", "threads", detail + ": input will likely limit training",
                       "measure with `python -m gluon_imagenet.train ... --io-only`; more cores per rank")]
    return [Result("ok", "threads", detail)]
