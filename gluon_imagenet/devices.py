"""Which device a process computes on, decided in one place: its MXNet context, the device ImageRecordIter pins its
batches for, and the precision AMP uses there.

A GPU rank (or sweep worker) uses GPU `index` for everything: its context, and `device_id=index` for
ImageRecordIter, whose pinned host buffers are otherwise allocated under GPU 0 (src/io/image_iter_common.h
`device_id` defaults to 0), which puts a CUDA context of every rank on GPU 0 (horovod/horovod#2625; Horovod's
own examples/mxnet/mxnet_imagenet_resnet50.py passes device_id=local_rank). A CPU process reads into plain CPU
memory (device_id -1: no pinned memory without a GPU).

AMP means float16 on GPUs and bfloat16 on CPUs: MXNet 1.9.1 has no float16 kernels on the CPU ("FP16 gemm on cpu
not implemented"), and its bfloat16 kernels (oneDNN) need a CPU with AVX-512 bfloat16 or AMX instructions.
MXNet is imported only inside the functions, so a caller can set MXNet's environment variables first.
"""
from __future__ import annotations

from dataclasses import dataclass

# CPU flags (Linux /proc/cpuinfo) under which oneDNN runs bfloat16 convolutions natively.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class DeviceError(Exception):
    """The requested device cannot be used here; the message says what to do instead."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "gpu"
    index: int = 0  # GPU id (0 for the CPU)

    @property
    def context(self):
        import mxnet as mx

        return mx.gpu(self.index) if self.kind == "gpu" else mx.cpu()

    @property
    def iterator_device_id(self) -> int:
        """ImageRecordIter's device_id: pinned buffers for this GPU, plain memory (-1) on a CPU."""
        return self.index if self.kind == "gpu" else -1

    @property
    def amp_dtype(self) -> str:
        return "float16" if self.kind == "gpu" else "bfloat16"

    def __str__(self) -> str:
        return f"gpu({self.index})" if self.kind == "gpu" else "cpu"


def gpu_count() -> int:
    import mxnet as mx

    return mx.context.num_gpus()


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    return bool(cpu_flags(cpuinfo) & set(BFLOAT16_CPU_FLAGS))


def for_rank(requested: str | None, local_rank: int) -> Device:
    """The device of the process with this local rank: GPU `local_rank` when GPUs are requested or present."""
    gpus = gpu_count()
    kind = requested or ("gpu" if gpus > 0 else "cpu")
    if kind == "gpu" and gpus == 1 and local_rank > 0 and len(_visible_gpus()) == 1:
        return Device("gpu", 0)  # the launcher shows each rank only its own GPU (CUDA_VISIBLE_DEVICES per rank)
    if kind == "gpu":
        if local_rank >= gpus:
            raise DeviceError(f"local rank {local_rank} needs GPU {local_rank}, but MXNet sees {gpus} GPU(s): start "
                              "fewer processes per machine (-np / -H host:N)" if gpus else
                              "--ctx gpu: MXNet sees no GPU (a CPU build of MXNet, or no driver): use --ctx cpu")
        return Device("gpu", local_rank)
    return Device("cpu")


def _visible_gpus() -> list[str]:
    import os

    return [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def check_amp(device: Device) -> str:
    """The AMP dtype on this device, or DeviceError when the device cannot run it."""
    if device.kind == "cpu" and not cpu_supports_bfloat16():
        raise DeviceError("--amp on a CPU trains in bfloat16, which needs a CPU with AVX-512 bfloat16 or AMX "
                          f"instructions ({' or '.join(BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo); this one has neither: "
                          "train in float32 with --no-amp, or use a GPU")
    return device.amp_dtype
