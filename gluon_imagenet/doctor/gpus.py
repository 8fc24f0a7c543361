"""The GPUs: which there are, whether this MXNet build runs on them, and AMP."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from gluon_imagenet.train.probes import Result

# pip's mxnet-cu* 1.9.1 wheels carry machine code for these GPU architectures and no PTX (measured on mxnet-cu117,
# see docs/gpus.md); used when the CUDA toolkit's cuobjdump is not there to read the library itself.
PIP_WHEEL_ARCHS = (50, 60, 70, 80, 86)


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
    from gluon_imagenet.train.probes import start_child, wait_child

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
    procs = {(d, amp): start_child(["-m", "gluon_imagenet.train.probes", "step", d, model, "1" if amp else "0"])
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
