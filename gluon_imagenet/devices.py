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


# ------------------------------------------------------------------------------------------------ decode threads
# MXNet 1.9.1's ImageRecordIter (src/io/iter_image_recordio_2.cc, ImageRecordIOParser2::Init, lines 141-156) with
# its default `ctx` (gpu, src/io/image_iter_common.h line 362) lowers preprocess_threads to
# max(omp_get_num_procs() / 2, 1) ("be conservative, set number of real cores"); OpenMP counts the CPUs of the
# affinity mask, not a cgroup quota. More threads asked than that are silently not started.
def image_record_iter_thread_cap(affinity_cpus: int) -> int:
    return max(affinity_cpus // 2, 1)


def _cgroup_quota(cgroup_root: str, proc_cgroup: str) -> float | None:
    """CPUs the cgroup's CFS quota allows (e.g. 2.5), or None without a quota: cgroup v2's cpu.max
    ("max 100000" or "250000 100000") or v1's cpu.cfs_quota_us / cpu.cfs_period_us (quota -1: none), in this
    process's own cgroup and at the mount's root (a container sees its own cgroup as the root)."""
    import os

    own = {"v2": "", "v1": ""}
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                    own["v2"] = parts[2].lstrip("/")
                elif len(parts) == 3 and "cpu" in parts[1].split(","):
                    own["v1"] = parts[2].lstrip("/")
    except OSError:
        pass
    quotas = []
    for path in {os.path.join(cgroup_root, own["v2"], "cpu.max"), os.path.join(cgroup_root, "cpu.max")}:
        try:
            with open(path) as f:
                quota, period = f.read().split()[:2]
            if quota != "max" and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in {os.path.join(cgroup_root, controller, own["v1"]), os.path.join(cgroup_root, controller)}:
            try:
                with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
                    quota = int(f.read())
                with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
                    period = int(f.read())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def usable_cpus(*, affinity: int | None = None, cgroup_root: str = "/sys/fs/cgroup",
                proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, int, str]:
    """(CPUs this process may use, CPUs in its affinity mask, where that came from): the affinity mask (taskset,
    a container's cpuset) bounded by the cgroup CPU quota where one is set (a quota of 2.5 CPUs gives 2)."""
    import os

    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            affinity = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    cpus = affinity if quota is None else max(1, min(affinity, int(quota)))
    source = f"{affinity} CPU(s) in the affinity mask" + ("" if quota is None else f", a cgroup quota of {quota:g}")
    return cpus, affinity, source


@dataclass(frozen=True)
class DecodeThreads:
    threads: int  # preprocess_threads per rank, as ImageRecordIter will really run them
    cpus: int  # CPUs this process may use
    capped: bool  # ImageRecordIter's own cap decided `threads`
    note: str  # how it was decided, and what bound it

    def __str__(self) -> str:
        return f"{self.threads} decode thread(s) per rank ({self.note})"


def decode_threads(local_ranks: int, requested: int = 0, **where) -> DecodeThreads:
    """The one rule for decode threads per rank (trainer, sweep workers, doctor): the CPUs this process may use
    (usable_cpus) shared among the `local_ranks` processes on this machine, at most what ImageRecordIter really
    starts. `requested` (--threads) wins when given, capped the same way; the note says when the cap binds.
    `where` passes usable_cpus' affinity / cgroup_root / proc_cgroup (for tests)."""
    cpus, affinity, source = usable_cpus(**where)
    local_ranks = max(1, local_ranks)
    wanted = requested or max(1, cpus // local_ranks)
    how = f"--threads {requested}" if requested else f"{cpus} usable CPU(s) / {local_ranks} rank(s) ({source})"
    cap = image_record_iter_thread_cap(affinity)
    if wanted > cap:
        return DecodeThreads(cap, cpus, True, f"{how} gives {wanted}, but ImageRecordIter starts at most {cap}: "
                                              f"half the {affinity} CPU(s) it sees")
    return DecodeThreads(wanted, cpus, False, how)
