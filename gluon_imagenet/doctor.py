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
  amp        a forward and backward pass with AMP on each device (float16 on a GPU, bfloat16 on a CPU that has
             the instructions), each in its own process: amp.init() changes a process for good, and a CUDA
             failure can kill it
  horovod    Horovod built with MXNet, and with NCCL / Gloo / MPI
  threads    decode threads per rank against the cores
  data       the recipe's packed data present and readable (with --recipe and --data-root)
  disk       free space in the run folder against the epoch checkpoints the plan writes (with --recipe, --run-dir)

Nothing here changes the machine: it writes nothing but a probe file in --run-dir (removed at once).
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

STATUSES = ("ok", "info", "warning", "failure")
SUPPORTED_PYTHONS = ((3, 10), (3, 11))
# pip's mxnet-cu* 1.9.1 wheels carry machine code for these GPU architectures and no PTX (measured on mxnet-cu117,
# see the README's GPU section); used when the CUDA toolkit's cuobjdump is not there to read the library itself.
PIP_WHEEL_ARCHS = (50, 60, 70, 80, 86)
# Measured on this project's CPU machine (one decode thread): ~400-770 img/s at 224 px.
IMAGES_PER_DECODE_THREAD_224 = 400
# Checkpoint files hold float32 values: parameters (network) + one momentum buffer per trainable parameter (NAG).
BYTES_PER_VALUE = 4
CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # names, headers, the .json record: far less than 1 MiB


@dataclass(frozen=True)
class Result:
    status: str  # one of STATUSES
    check: str  # short name, e.g. "gpu 0"
    detail: str  # what was found
    fix: str = ""  # what to do (warnings and failures)


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
def probe(device: str, model: str) -> dict:
    """One forward and backward pass with AMP (or float32) on `device` ("cpu", "cpu-float32", "gpu:N"), in this
    process: run by the doctor as a child process, one per device."""
    import mxnet as mx
    from mxnet import autograd, gluon
    from mxnet.contrib import amp

    from gluon_imagenet.devices import Device
    from gluon_imagenet.model import build_model, initialize

    start = time.perf_counter()
    use_amp = device != "cpu-float32"
    dev = Device("gpu", int(device.split(":")[1])) if device.startswith("gpu") else Device("cpu")
    if use_amp:
        amp.init(target_dtype=dev.amp_dtype)  # before the network is built
    net = build_model(model, 10)
    initialize(net, dev.context)
    data = mx.nd.random.randint(0, 256, shape=(4, 3, 32, 32), ctx=dev.context).astype("uint8")
    label = mx.nd.array([0, 1, 2, 3], ctx=dev.context)
    with autograd.train_mode():
        net(data)  # shapes first, in training mode (an inference pass upsets MKLDNN)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.01, "momentum": 0.9,
                                                          "multi_precision": use_amp}, kvstore=None)
    if use_amp:
        amp.init_trainer(trainer)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(2):
        with autograd.record():
            loss = loss_fn(net(data), label)
            if use_amp:
                with amp.scale_loss(loss, trainer) as scaled:
                    autograd.backward(scaled)
            else:
                loss.backward()
        trainer.step(data.shape[0])
    value = float(loss.mean().asscalar())  # waits for the device: errors surface here
    return {"loss": value, "finite": math.isfinite(value), "dtype": dev.amp_dtype if use_amp else "float32",
            "seconds": round(time.perf_counter() - start, 1)}


def check_amp(gpus: list[GPU], model: str, timeout: float = 600) -> list[Result]:
    from gluon_imagenet.devices import BFLOAT16_CPU_FLAGS, cpu_supports_bfloat16

    out = []
    if gpus:
        devices = [f"gpu:{g.index}" for g in gpus]
    elif cpu_supports_bfloat16():
        devices = ["cpu"]
    else:
        out.append(Result("warning", "amp cpu", "AMP is unavailable on this CPU: bfloat16 needs "
                                                f"{' or '.join(BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo",
                          "train in float32 (--no-amp) or on a GPU"))
        devices = ["cpu-float32"]  # still prove a real training step runs
    # One process per device, all at once: amp.init() is for good, and a failing CUDA kernel can kill a process.
    procs = {d: subprocess.Popen([sys.executable, "-m", "gluon_imagenet.doctor", "--probe", d, "--model", model],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in devices}
    for device, proc in procs.items():
        name = "float32 cpu" if device == "cpu-float32" else f"amp {device.replace(':', ' ')}"
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out.append(Result("failure", name, f"{model} training step did not finish in {timeout:.0f} s",
                              "a hung GPU or driver: check nvidia-smi"))
            continue
        result = _last_json(stdout)
        if proc.returncode != 0 or result is None:
            error = _last_error(stderr)
            fix = ("this MXNet has no code for this GPU: NVIDIA's MXNet container" if "no kernel image" in error
                   else "see the error; the features and gpu lines above")
            out.append(Result("failure", name, f"{model} training step failed (exit {proc.returncode}): {error}",
                              fix))
        elif not result["finite"]:
            out.append(Result("failure", name, f"{model} {result['dtype']} step gave loss {result['loss']}",
                              "a broken build or device: try --no-amp (float32)"))
        else:
            out.append(Result("ok", name, f"{model} forward + backward in {result['dtype']}, loss "
                                          f"{result['loss']:.3f}, {result['seconds']} s"))
    return out


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:400]
    return lines[-1][:400] if lines else "no output (killed?)"


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


# ------------------------------------------------------------------------------------------------ threads
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process (container, taskset) may use
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(ranks: int, threads: int, cores: int, image_size: int = 224) -> list[Result]:
    """The trainer's default is cores // ranks decode threads per rank (train.py --threads)."""
    per_rank = threads or max(1, cores // ranks)
    rate = per_rank * IMAGES_PER_DECODE_THREAD_224 * (224 / image_size) ** 2
    detail = (f"{per_rank} decode thread(s) per rank x {ranks} rank(s) on {cores} core(s): roughly {rate:,.0f} "
              f"img/s per rank at {image_size} px (~{IMAGES_PER_DECODE_THREAD_224} img/s per thread at 224 px)")
    if per_rank * ranks > cores:
        return [Result("warning", "threads", detail + ": more threads than cores",
                       f"--threads {max(1, cores // ranks)} (or fewer ranks per machine)")]
    if per_rank < 2:
        return [Result("warning", "threads", detail + ": input will likely limit training",
                       "measure with `python -m gluon_imagenet.train ... --io-only`; more cores per rank")]
    return [Result("ok", "threads", detail)]


# ------------------------------------------------------------------------------------------------ data
def check_data(recipe_path: str, data_root: str) -> tuple[list[Result], object, list[str] | None]:
    """(results, the recipe or None, the class names or None)."""
    from gluon_imagenet.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_path, data_root=data_root)
    except RecipeError as e:
        return [Result("failure", "data", str(e), "pack the data: python tools/im2rec_multi.py SRC --root "
                                                  f"{data_root} --sizes ...")], None, None
    try:
        from gluon_imagenet.data import DataError, read_class_names, train_images_for

        classes = read_class_names(data_root)
        images = train_images_for(data_root, [p.data_dir for p in recipe.phases])
    except (DataError, OSError, ValueError) as e:
        return [Result("failure", "data", str(e), "re-pack with tools/im2rec_multi.py")], recipe, None
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
                                        f"{', '.join(f'{d}/{s}.rec' for d, s in dirs)} read and decoded"))
    return out, recipe, classes


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


CHECKS = ("versions", "features", "gpus", "amp", "horovod", "threads", "data", "disk")


def run_checks(args) -> list[Result]:
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
    if gpus and "features" in wanted:
        from gluon_imagenet.gpu_settings import settings_for

        applied = [name for name, c in settings_for("gpu", os.environ).items() if c.applied]
        results.append(Result("info", "environment", f"a GPU run sets {len(applied)} MXNet/Horovod variables you have "
                                                     "not set: python -m gluon_imagenet.gpu_settings gpu"))
    if "threads" in wanted:
        results += check_threads(ranks, args.threads, usable_cores())
    recipe, classes = None, None
    if {"data", "disk"} & wanted:
        if args.recipe and args.data_root:
            data_results, recipe, classes = check_data(args.recipe, args.data_root)
            if "data" in wanted:
                results += data_results
        elif "data" in wanted:
            results.append(Result("info", "data", "not checked: give --recipe and --data-root"))
    if "disk" in wanted:
        if recipe is None and args.recipe:
            from gluon_imagenet.recipe import RecipeError, load_recipe

            try:
                recipe = load_recipe(args.recipe)
            except RecipeError as e:
                results.append(Result("failure", "recipe", str(e), "fix the recipe"))
        if recipe is not None and args.run_dir:
            results += check_disk(args.run_dir, recipe.total_epochs, checkpoint_bytes(args.model,
                                                                                      len(classes or []) or 1000))
        else:
            results.append(Result("info", "disk", "not checked: give --recipe and --run-dir"))
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe YAML: checks its packed data and the disk its checkpoints need")
    p.add_argument("--data-root", default=None, help="packed data root (with --recipe)")
    p.add_argument("--run-dir", help="the run folder: checks its free space against the plan's checkpoints")
    p.add_argument("--ranks", type=int, default=0, help="training processes on this machine (default: GPUs, or 1)")
    p.add_argument("--threads", type=int, default=0, help="decode threads per rank, as given to train (default: "
                                                          "cores per rank)")
    p.add_argument("--model", choices=MODELS, default="resnet50_v1b", help="network for the step and the sizes")
    p.add_argument("--checks", help=f"comma-separated subset of {','.join(CHECKS)} (default: all)")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one device's AMP step, in a child process
    args = p.parse_args(argv)
    if args.checks and not set(args.checks.split(",")) <= set(CHECKS):
        p.error(f"--checks {args.checks}: use names from {','.join(CHECKS)}")
    if args.ranks < 0 or args.threads < 0:
        p.error("--ranks and --threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.model)), flush=True)
        return 0
    results = run_checks(args)
    print(format_table(results), flush=True)
    return 1 if any(r.status == "failure" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
