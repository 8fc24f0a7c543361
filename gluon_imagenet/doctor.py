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
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from gluon_imagenet.names import MODELS  # importable without MXNet: the doctor must start when MXNet does not
from gluon_imagenet.probes import Result  # importable without MXNet too; memory_probe's lines as well

SUPPORTED_PYTHONS = ((3, 10), (3, 11))
# pip's mxnet-cu* 1.9.1 wheels carry machine code for these GPU architectures and no PTX (measured on mxnet-cu117,
# see the README's GPU section); used when the CUDA toolkit's cuobjdump is not there to read the library itself.
PIP_WHEEL_ARCHS = (50, 60, 70, 80, 86)
# Measured on this project's CPU machine (one decode thread): ~400-770 img/s at 224 px.
IMAGES_PER_DECODE_THREAD_224 = 400
# Checkpoint files hold float32 values: parameters (network) + one momentum buffer per trainable parameter (NAG).
BYTES_PER_VALUE = 4
CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # names, headers, the .json record: far less than 1 MiB


# ------------------------------------------------------------------------------------------------ versions
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
    except Exception as e:  # a broken install raises anything at import: report it, do not crash the doctor
        return f"broken ({type(e).__name__}: {e})"


def check_versions(ranks: int) -> list[Result]:
    out = []
    py = sys.version_info[:2]
    if py in SUPPORTED_PYTHONS:
        out.append(Result("ok", "python", platform.python_version()))
    else:
        out.append(Result("warning", "python", f"{platform.python_version()} is not one the toolkit is tested on",
                          "use Python 3.10 (NVIDIA's MXNet container) or 3.11 (tools/setup.sh)"))
    numpy = _version("numpy")
    try:
        import mxnet as mx

        out.append(Result("ok", "mxnet", f"{mx.__version__} ({os.path.dirname(mx.__file__)})"))
    except Exception as e:
        fix = "bash tools/setup.sh (CPU), GLUON_IMAGENET_DEVICE=gpu (V100/A100) or =system (NVIDIA's container)"
        if numpy and re.match(r"1\.(2[4-9]|[3-9]\d)|[2-9]\.", numpy):
            fix = f"numpy {numpy} breaks mxnet 1.9.1 (np.bool is gone): pip install numpy==1.23.5"
        out.append(Result("failure", "mxnet", f"import mxnet failed: {type(e).__name__}: {e}", fix))
    out.append(Result("ok" if numpy else "failure", "numpy", numpy or "not installed",
                      "" if numpy else "bash tools/setup.sh"))
    out.extend(_check_gluoncv())
    horovod = _version("horovod")
    if horovod:
        out.append(Result("ok", "horovod", horovod))
    else:
        status = "failure" if ranks > 1 else "warning"
        out.append(Result(status, "horovod", f"not installed ({ranks} rank(s) asked)",
                          "bash tools/setup.sh builds it against this mxnet; one process trains without it"))
    return out


def _check_gluoncv() -> list[Result]:
    """The calls model.py makes: get_model(name, classes=..., last_gamma=True) for each of its networks; for the
    bottleneck networks last_gamma must set the last BatchNorm's gamma initializer to zeros."""
    version = _version("gluoncv")
    fix = ("pip install --no-deps gluoncv==0.10.5.post0 (the pinned one; --no-deps keeps this mxnet and numpy), or "
           "GLUON_IMAGENET_DEVICE=system bash tools/setup.sh")
    if version is None or version.startswith("broken"):
        return [Result("failure", "gluoncv", version or "not installed", fix)]
    try:
        from gluoncv.model_zoo import get_model

        for name in MODELS:
            net = get_model(name, classes=10, last_gamma=True)
            if "50" in name and str(net.layer1[0].bn3.gamma.init) != "zeros":
                return [Result("failure", "gluoncv", f"{version}: {name}(last_gamma=True) does not start the last "
                                                     "BatchNorm of its blocks at gamma = 0", fix)]
    except Exception as e:
        return [Result("failure", "gluoncv", f"{version}: building the toolkit's networks failed: "
                                             f"{type(e).__name__}: {e}", fix)]
    return [Result("ok", "gluoncv", f"{version}; builds {', '.join(MODELS)}")]


# ------------------------------------------------------------------------------------------------ MXNet features
IMPORTANT_FEATURES = ("CUDA", "CUDNN", "NCCL", "TENSORRT", "MKLDNN", "OPENCV", "BLAS_MKL", "BLAS_OPEN", "DIST_KVSTORE",
                      "INT64_TENSOR_SIZE", "SIGNAL_HANDLER")


def mxnet_features() -> dict[str, bool] | None:
    try:
        import mxnet as mx

        return {f.name: f.enabled for f in mx.runtime.Features().values()}
    except Exception:
        return None


def check_features(features: dict[str, bool] | None, gpus: list[GPU]) -> list[Result]:
    if features is None:
        return [Result("failure", "features", "mxnet does not import", "see the mxnet line above")]
    shown = ", ".join(f"{'+' if features.get(n) else '-'}{n}" for n in IMPORTANT_FEATURES if n in features)
    out = [Result("info", "features", shown)]
    if not features.get("OPENCV"):
        out.append(Result("failure", "opencv", "this MXNet has no OpenCV: ImageRecordIter cannot decode images",
                          "use an MXNet build with OpenCV (pip's wheels and NVIDIA's container have it)"))
    if gpus and not features.get("CUDA"):
        out.append(Result("failure", "cuda", f"{len(gpus)} GPU(s) here but this MXNet is a CPU build",
                          "GLUON_IMAGENET_DEVICE=gpu bash tools/setup.sh (V100/A100), or NVIDIA's MXNet container "
                          "with GLUON_IMAGENET_DEVICE=system (H100/H200)"))
    if features.get("CUDA") and not features.get("CUDNN"):
        out.append(Result("warning", "cudnn", "CUDA without cuDNN: convolutions will be slow",
                          "use an MXNet build with cuDNN (pip's mxnet-cu117, NVIDIA's container)"))
    if not gpus and not features.get("MKLDNN"):
        out.append(Result("warning", "mkldnn", "no oneDNN (MKLDNN): CPU convolutions are slow and bfloat16 AMP "
                                               "is unavailable", "use pip's mxnet==1.9.1 (built with oneDNN)"))
    return out


# ------------------------------------------------------------------------------------------------ GPUs
@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    capability: tuple[int, int]  # (major, minor)

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


def list_gpus() -> tuple[list[GPU], str]:
    """The GPUs this process may use, numbered as MXNet numbers them, and how they were found."""
    gpus, how = _all_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # nvidia-smi lists every GPU; CUDA (so MXNet's gpu(i)) sees only these, renumbered from 0.
    if visible is not None and re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?", visible):
        by_index = {g.index: g for g in gpus}
        ids = [int(i) for i in visible.split(",") if i.strip()]
        gpus = [GPU(k, by_index[i].name, by_index[i].capability) for k, i in enumerate(ids) if i in by_index]
        how += f", CUDA_VISIBLE_DEVICES={visible}"
    return gpus, how


def _all_gpus() -> tuple[list[GPU], str]:
    """Every GPU: nvidia-smi first, else the CUDA driver library through ctypes."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                gpus = []
                for line in proc.stdout.strip().splitlines():
                    index, name, cap = (p.strip() for p in line.split(","))
                    major, minor = cap.split(".")
                    gpus.append(GPU(int(index), name, (int(major), int(minor))))
                return gpus, "nvidia-smi"
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass  # an old driver without compute_cap: ask the driver library below
    return _gpus_from_driver()


def _gpus_from_driver() -> tuple[list[GPU], str]:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return [], "no NVIDIA driver (no nvidia-smi, no libcuda.so.1)"
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return [], "the NVIDIA driver reports no usable GPU"
    gpus = []
    for i in range(count.value):
        major, minor, name = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(256)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, i)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, i)
        cuda.cuDeviceGetName(name, 256, i)
        gpus.append(GPU(i, name.value.decode(errors="replace"), (major.value, minor.value)))
    return gpus, "libcuda"


def mxnet_gpu_archs() -> tuple[set[int], set[int], str] | None:
    """(SASS architectures, PTX architectures, how known) of the GPU code in this MXNet's library, or None."""
    try:
        import mxnet as mx

        lib = mx.libinfo.find_lib_path()[0]
    except Exception:
        return None
    tool = shutil.which("cuobjdump")
    if tool:
        found = []
        for flag in ("--list-elf", "--list-ptx"):
            try:
                proc = subprocess.run([tool, flag, lib], capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired):
                break
            found.append({int(m) for m in re.findall(r"sm_(\d+)", proc.stdout)})
        if len(found) == 2 and (found[0] or found[1]):
            return found[0], found[1], f"cuobjdump {os.path.basename(lib)}"
    dist = _mxnet_distribution()
    if dist and re.fullmatch(r"mxnet-cu\d+", dist[0]) and dist[1].startswith("1.9"):
        return set(PIP_WHEEL_ARCHS), set(), f"pip wheel {dist[0]}=={dist[1]}"
    return None


def _mxnet_distribution() -> tuple[str, str] | None:
    from importlib import metadata

    for name in metadata.packages_distributions().get("mxnet", []):
        try:
            return name.lower(), metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def runs_on(gpu: GPU, sass: set[int], ptx: set[int]) -> bool:
    """Machine code runs on GPUs of the same major architecture and an equal or higher minor; PTX is compiled
    for any GPU at least as new as it."""
    major, minor = gpu.capability
    return (any(a // 10 == major and a % 10 <= minor for a in sass)
            or any(a <= gpu.sm for a in ptx))


def check_gpus(gpus: list[GPU], how: str, archs) -> list[Result]:
    if not gpus:
        return [Result("info", "gpus", f"no GPU: CPU training ({how})")]
    out = []
    try:
        import mxnet as mx

        seen = mx.context.num_gpus()
    except Exception:
        seen = 0
    if seen != len(gpus):
        out.append(Result("failure", "gpus", f"{len(gpus)} GPU(s) here ({how}), MXNet sees {seen}",
                          "use a CUDA build of MXNet (GLUON_IMAGENET_DEVICE=gpu, or NVIDIA's container); if this "
                          "is one, its CUDA libraries do not load or CUDA_VISIBLE_DEVICES hides GPUs"))
    for gpu in gpus:
        name = f"gpu {gpu.index}"
        cap = f"{gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]} (sm_{gpu.sm})"
        if archs is None:
            out.append(Result("warning", name, f"{cap}; which GPUs this MXNet build supports is unknown",
                              "the amp line below runs a real kernel on it"))
            continue
        sass, ptx, source = archs
        built = ", ".join([f"sm_{a}" for a in sorted(sass)] + [f"PTX {a}" for a in sorted(ptx)]) or "none"
        if runs_on(gpu, sass, ptx):
            out.append(Result("ok", name, f"{cap}; this MXNet has {built} ({source})"))
        elif gpu.sm >= 90:
            out.append(Result("failure", name, f"{cap}: this MXNet has only {built} ({source}): no kernel runs "
                                               "on Hopper", "use NVIDIA's MXNet container (24.05/24.06), then "
                                                            "GLUON_IMAGENET_DEVICE=system bash tools/setup.sh"))
        else:
            out.append(Result("failure", name, f"{cap}: this MXNet has only {built} ({source})",
                              "an MXNet built for this GPU: NVIDIA's MXNet container"))
    return out


# ------------------------------------------------------------------------------------------------ AMP probes
def check_amp(gpus: list[GPU], model: str, timeout: float = 600) -> list[Result]:
    """The trainer's own step (learner.Learner.step, its optimizer and AMP set-up) on each device, then a
    checkpoint of it written by checkpoint.save and loaded into a fresh Learner (probes.training_step_probe)."""
    from gluon_imagenet.devices import BFLOAT16_CPU_FLAGS, cpu_supports_bfloat16
    from gluon_imagenet.probes import start_child, wait_child

    out = []
    if gpus:
        devices = [(f"gpu:{g.index}", True) for g in gpus]
    elif cpu_supports_bfloat16():
        devices = [("cpu", True)]
    else:
        out.append(Result("warning", "amp cpu", "AMP is unavailable on this CPU: bfloat16 needs "
                                                f"{' or '.join(BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo",
                          "train in float32 (--no-amp) or on a GPU"))
        devices = [("cpu", False)]  # still prove a real training step runs
    # One process per device, all at once: amp.init() is for good, and a failing CUDA kernel can kill a process.
    procs = {(d, amp): start_child(["-m", "gluon_imagenet.probes", "step", d, model, "1" if amp else "0"])
             for d, amp in devices}
    for (device, amp), proc in procs.items():
        name = f"amp {device.replace(':', ' ')}" if amp else f"float32 {device.replace(':', ' ')}"
        child = wait_child(proc, timeout)
        result = child.last_json()
        if child.returncode != 0 or result is None:
            error = child.error()
            if "no kernel image" in error:
                fix = "this MXNet has no code for this GPU: NVIDIA's MXNet container"
            elif child.why and device.startswith("gpu") and not child.stderr.strip():
                fix = "a hung GPU or driver: check nvidia-smi"
            else:
                fix = "see the error; the features and gpu lines above"
            ended = f"ended: it {child.why}" if child.why else f"exit {child.returncode}"
            out.append(Result("failure", name, f"{model} training step failed ({ended}): {error}", fix))
        elif not result["finite"]:
            out.append(Result("failure", name, f"{model} {result['dtype']} step gave loss {result['loss']}",
                              "a broken build or device: try --no-amp (float32)"))
        else:
            out.append(Result("ok", name, f"{model} Learner.step x2 in {result['dtype']}, loss "
                                          f"{result['loss']:.3f}, {result['step_seconds']} s"))
            compared = result.get("compared", {})
            if result.get("checkpoint"):
                out.append(Result("failure", f"checkpoint {device.replace(':', ' ')}", result["checkpoint"],
                                  "a checkpoint would not resume this run: report it with the versions above"))
            else:
                scaler = "and loss scaler " if compared.get("loss_scaler") else ""
                out.append(Result("ok", f"checkpoint {device.replace(':', ' ')}",
                                  f"saved and loaded into a fresh Learner: {compared.get('parameters')} parameters, "
                                  f"{compared.get('optimizer_states')} optimizer states {scaler}equal"))
    return out


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


# ------------------------------------------------------------------------------------------------ data
def load_recipe_file(recipe_path: str) -> tuple[object, list[Result]]:
    """(the recipe, []) or (None, [the one failure]): the file itself, before any packed data is looked at."""
    from gluon_imagenet.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe_path), []
    except RecipeError as e:
        fix = ("give the path of a recipe file, e.g. --recipe recipes/imagenet104.yaml" if not
               os.path.isfile(recipe_path) else "fix that field of the recipe (the README's Recipes section lists "
                                                "the fields and what they allow)")
        return None, [Result("failure", "recipe", str(e), fix)]


def check_data(recipe_path: str, data_root: str) -> tuple[list[Result], list[str] | None]:
    """(results, the class names or None) for a recipe that loads: its packed data by packed.check_for, the
    trainer's own check, with the evaluation split the sweep reads, then the first record of each split
    decoded."""
    from gluon_imagenet.packed import check_for

    recipe, failures = load_recipe_file(recipe_path)
    if recipe is None:
        return failures, None
    problems = check_for(recipe, data_root, eval_split=True)
    if problems:
        return [Result("failure", "data", problem.detail, problem.fix) for problem in problems], None
    try:
        from gluon_imagenet.data import DataError, read_class_names, train_images_for

        classes = read_class_names(data_root)
        images = train_images_for(data_root, [p.data_dir for p in recipe.phases])
    except (DataError, OSError, ValueError) as e:
        return [Result("failure", "data", str(e), "re-pack with tools/im2rec_multi.py")], None
    out = []
    dirs = [(d, "train") for d in sorted({p.data_dir for p in recipe.phases})]
    dirs.append((recipe.resolved_eval_data_dir, "val"))
    for data_dir, split in dirs:
        problem = _first_record_problem(data_root, data_dir, split)
        if problem:
            out.append(Result("failure", f"data {data_dir}/{split}", problem, "re-pack with tools/im2rec_multi.py "
                                                                              "(--verify checks a pack)"))
    if not out:
        out.append(Result("ok", "data", f"{recipe_path}: {len(classes)} classes, {images:,} training images; "
                                        f"{', '.join(f'{d}/{s}.rec' for d, s in dirs)} checked as the trainer "
                                        "checks them, first records decoded"))
    return out, classes


def _first_record_problem(data_root: str, data_dir: str, split: str) -> str:
    """Read and decode the first image of a packed split: "" or what is wrong."""
    import mxnet as mx

    from gluon_imagenet.packed import split_paths

    rec, idx = split_paths(data_root, data_dir, split)
    try:
        reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
        try:
            if not reader.keys:
                return f"{idx} lists no record"
            header, image = mx.recordio.unpack_img(reader.read_idx(reader.keys[0]))
        finally:
            reader.close()
    except Exception as e:
        return f"cannot read {rec}: {type(e).__name__}: {e}"
    if image is None or getattr(image, "ndim", 0) != 3:
        return f"the first record of {rec} does not decode to a colour image"
    return ""


# ------------------------------------------------------------------------------------------------ disk
def checkpoint_bytes(model: str, classes: int) -> int:
    """Bytes one checkpoint takes: every network value (weights, BatchNorm statistics) in .params, plus one NAG
    momentum buffer per trainable value in .states, float32, plus headers and the record. The network is built
    (not trained) on the CPU to count them."""
    import mxnet as mx

    from gluon_imagenet.model import build_model, initialize

    net = build_model(model, classes)
    initialize(net, mx.cpu())
    net(mx.nd.zeros((1, 3, 32, 32), dtype="uint8"))  # deferred shapes
    params = net.collect_params()
    total = sum(p.data().size for p in params.values())
    trainable = sum(p.data().size for p in params.values() if p.grad_req != "null")
    return (total + trainable) * BYTES_PER_VALUE + CHECKPOINT_OVERHEAD_BYTES


def check_run_dir(run_dir: str) -> list[Result]:
    """Whether the trainer can write there: a probe file is written (and removed at once) in the run dir, or,
    when it does not exist yet, in the folder the trainer would create it in; nothing else is created."""
    fix = "give a --run-dir on a writable file system, as a folder (the trainer creates it)"
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return [Result("failure", "run dir", f"{run_dir} exists and is not a folder", fix)]
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [Result("failure", "run dir", f"{run_dir}: {existing} is not a folder, so it cannot be created", fix)]
    probe = os.path.join(existing, f".doctor-write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        return [Result("failure", "run dir", f"{run_dir}: cannot write in {existing} ({e.strerror or e})", fix)]
    where = "in it" if existing == path else f"in {existing}, where it will be created"
    return [Result("ok", "run dir", f"{run_dir}: writable (a probe file was written {where} and removed)")]


def free_bytes(path: str) -> int:
    """Free space for an unprivileged writer on the file system that holds `path` (or would, once created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_disk(run_dir: str, checkpoints: int, bytes_per_checkpoint: int,
               free: Callable[[str], int] = free_bytes) -> list[Result]:
    """One checkpoint per epoch is kept, plus one being written (.partial) at a time."""
    need = (checkpoints + 1) * bytes_per_checkpoint
    have = free(run_dir)
    detail = (f"{run_dir}: {_size(have)} free; the plan writes {checkpoints} epoch checkpoints of "
              f"{_size(bytes_per_checkpoint)} = {_size(need)} (with one being written)")
    if have < need:
        return [Result("failure", "disk", detail + ": not enough", f"free {_size(need - have)} there, or use another "
                                                                   "--run-dir (the sweep needs every checkpoint)")]
    if have < need * 1.2:
        return [Result("warning", "disk", detail + ": less than 20% to spare", "free some space or another --run-dir")]
    return [Result("ok", "disk", detail)]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


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
            from gluon_imagenet.memory_probe import check_memory

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


if __name__ == "__main__":
    sys.exit(main())
