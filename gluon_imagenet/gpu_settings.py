"""The MXNet and Horovod environment settings that fast GPU runs use, applied where the user has not set them.

Every value below comes from a file that was read, cited next to it:
  NVIDIA/DeepLearningExamples MxNet/Classification/RN50v1.5/runner (NVIDIA's MXNet ResNet-50, the fastest published
  MXNet ResNet-50 runs; sets its environment in lines 71-89) and its Dockerfile; apache/mxnet 1.9.1 (what reads each
  variable, and its default); horovod/horovod v0.28.1 (the same for Horovod).

They are environment variables that MXNet and Horovod read when they start or build a graph, so they must be set
before `import mxnet` (and before horovod.mxnet is imported): call `apply` first thing in the trainer, print its
result and keep it in run.json. A value already in the environment is the user's and is never changed; under
`horovodrun --autotune` the fusion buffer and cycle time are left to the autotuner (a value set in the
environment is held constant by it: horovod docs/autotune.rst lines 44-56, common/operations.cc lines 519-540).
Nothing is set on a CPU: the bulk-execution sizes also change CPU runs, and the rest mean nothing there.

Read but not applied:
  MXNET_OPTIMIZER_AGGREGATION_SIZE=60 (runner line 76): MXNet 1.9.1 reads it only in SGD, LARS and LAMB
    (python/mxnet/optimizer/optimizer.py lines 581, 833, 1262); the toolkit trains with NAG, which does not aggregate.
  MXNET_UPDATE_ON_KVSTORE=0 (runner line 71): the toolkit's trainers use no kvstore (Horovod's DistributedTrainer,
    or kvstore=None), so there is nothing to update on.
  HOROVOD_BATCH_D2D_MEMCOPIES=1 (runner line 87): already Horovod 0.28.1's default (common/global_state.h line 109).
  MXNET_EXEC_ENABLE_ADDTO, MXNET_HOROVOD_NUM_GROUPS, HOROVOD_GROUPED_ALLREDUCES (runner lines 72, 84, 88): no
    upstream MXNet 1.9.1 or Horovod 0.28.1 code reads them (they are for NVIDIA's own builds, whose source was not
    read); set them yourself inside NVIDIA's container to match its runner exactly.
  (MXNET_ASYNC_GPU_ENGINE, runner line 79, is applied: Horovod 0.28.1 reads it, see GPU_SETTINGS.)
  HOROVOD_NUM_NCCL_STREAMS: Horovod reads it (common/operations.cc line 465; default 1 stream, global_state.h line
    92), but no source read recommends another value; `horovodrun --num-nccl-streams N` sets it.
  OMP_NUM_THREADS=1 (runner line 89): it would also bound the CPU work of the input pipeline, which the toolkit
    sizes itself (--threads).

    python -m gluon_imagenet.gpu_settings gpu    # what a GPU run would set, given this shell's environment
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, MutableMapping, NamedTuple

NVIDIA_RUNNER = "NVIDIA/DeepLearningExamples MxNet/Classification/RN50v1.5/runner"
NVIDIA_DOCKERFILE = "NVIDIA/DeepLearningExamples MxNet/Classification/RN50v1.5/Dockerfile"


class Setting(NamedTuple):
    name: str
    value: str
    source: str  # where the value comes from, and what reads it
    horovod: bool = False  # a Horovod tensor-fusion knob: left to the autotuner under --autotune


GPU_SETTINGS = (
    # cuDNN convolution algorithms by heuristics instead of timing every algorithm for every new input shape:
    # progressive resizing brings new shapes each phase, and each re-tuning costs time and grows memory
    # (apache/mxnet#15529, #18982). Upstream default 1 (docs/static_site/src/pages/api/faq/env_var.md line 255).
    Setting("MXNET_CUDNN_AUTOTUNE_DEFAULT", "0", f"{NVIDIA_RUNNER} line 86; {NVIDIA_DOCKERFILE} line 10"),
    # Engine threads per GPU for computation (2 is also MXNet's default: src/common/utils.h line 509) and for
    # copies (default 2: src/engine/threaded_engine_perdevice.cc line 81).
    Setting("MXNET_GPU_WORKER_NTHREADS", "2", f"{NVIDIA_RUNNER} line 74"),
    Setting("MXNET_GPU_COPY_NTHREADS", "1", f"{NVIDIA_RUNNER} line 75"),
    # Bulk execution of a hybridized (CachedOp) graph: the whole forward pass, and the backward pass in segments of
    # 25 operators so that Horovod can start reducing the first gradients while the rest are computed
    # (read by include/mxnet/imperative.h lines 191-196 for src/imperative/cached_op.h lines 332-335).
    Setting("MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_FWD", "999", f"{NVIDIA_RUNNER} line 80"),
    Setting("MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_BWD", "25", f"{NVIDIA_RUNNER} line 81"),
    # CUDA graphs for a Gluon network hybridized with static_alloc and static_shape, which the trainer does
    # (MXNet 1.9.1 env_var.md lines 137-140; src/executor/cuda_graphs.h line 307; default off).
    Setting("MXNET_ENABLE_CUDA_GRAPHS", "1", f"{NVIDIA_RUNNER} line 83"),
    # Tensor fusion: a 64 MiB fusion buffer (Horovod's default is 128 MiB: common/operations.cc line 519;
    # docs/tensor-fusion.rst lines 12-13) and a 0.1 ms cycle (default 1 ms: operations.cc line 527; docs lines 31-35).
    Setting("HOROVOD_FUSION_THRESHOLD", "67108864", f"{NVIDIA_RUNNER} line 78", horovod=True),
    Setting("HOROVOD_CYCLE_TIME", "0.1", f"{NVIDIA_RUNNER} line 77", horovod=True),
    # Finish GPU allreduces with an event instead of a blocking wait in Horovod's finalizer thread (read by
    # common/operations.cc line 619, used in common/ops/gpu_operations.cc lines 64-135). Default off. What MXNet
    # then does with the event is the next setting's business.
    Setting("HOROVOD_ENABLE_ASYNC_COMPLETION", "1", f"{NVIDIA_RUNNER} line 85"),
    # Horovod 0.28.1 reads it: horovod/mxnet/mpi_ops.cc line 222 (dmlc::GetEnv, default false), in the completion
    # callback of every MXNet collective. Set, it hands Horovod's CUDA event to the output array's sync object so
    # that MXNet's engine waits for it on the GPU (lines 218-259); unset, the callback blocks its thread in
    # gpuEventSynchronize (line 261) before MXNet may use the result. That code is compiled only against an MXNet
    # whose headers define MXNET_ASYNC_GPU_ENGINE_SUPPORTED (or MXNet >= 2: mpi_ops.cc lines 27-29), as NVIDIA's
    # MXNet builds with the asynchronous GPU engine do (their source was not read); upstream 1.9.1 does not
    # (include/mxnet/base.h: MXNET_MAJOR 1, no such define), so with pip's mxnet-cu117 nothing reads it. Applied
    # as NVIDIA's runner sets it for its own container, the one place where it changes anything.
    Setting("MXNET_ASYNC_GPU_ENGINE", "1", f"{NVIDIA_RUNNER} line 79; horovod/mxnet/mpi_ops.cc line 222 (v0.28.1)"),
)

DEVICE_KINDS = ("cpu", "gpu")


class Choice(NamedTuple):
    value: str  # the recommended value
    source: str  # where it comes from
    applied: bool  # True: the environment lacked it and gets this value
    reason: str = ""  # why not applied


def _autotuning(environ: Mapping[str, str]) -> bool:
    # Horovod turns autotuning on when HOROVOD_AUTOTUNE parses as an integer > 0 (common/operations.cc line 628).
    try:
        return int(environ.get("HOROVOD_AUTOTUNE", "0")) > 0
    except ValueError:
        return False


def settings_for(device_kind: str, environ: Mapping[str, str]) -> dict[str, Choice]:
    """The settings for a run on `device_kind`, each marked applied or not (and why) given `environ`. Pure."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device kind {device_kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    if device_kind == "cpu":
        return {}
    autotune = _autotuning(environ)
    out = {}
    for s in GPU_SETTINGS:
        if s.name in environ:
            out[s.name] = Choice(s.value, s.source, False, f"kept the environment's {s.name}={environ[s.name]}")
        elif s.horovod and autotune:
            out[s.name] = Choice(s.value, s.source, False, "HOROVOD_AUTOTUNE is on: left to Horovod's autotuner")
        else:
            out[s.name] = Choice(s.value, s.source, True)
    return out


def apply(device_kind: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the settings `environ` (default os.environ) lacks for a run on `device_kind`; returns {name: value}
    of what was set. Call before MXNet and Horovod are imported."""
    environ = os.environ if environ is None else environ
    applied = {}
    for name, choice in settings_for(device_kind, environ).items():
        if choice.applied:
            environ[name] = choice.value
            applied[name] = choice.value
    return applied


def device_kind_before_import(requested: str | None, dev: str = "/dev") -> str:
    """The device kind a run will most likely use, decided without importing MXNet: `requested` when given,
    else "gpu" when an NVIDIA device node exists (/dev/nvidia0, ...). The trainer should compare it with the
    device it finally uses and say so when they differ."""
    if requested:
        return requested
    try:
        names = os.listdir(dev)
    except OSError:
        return "cpu"
    return "gpu" if any(n.startswith("nvidia") and n[len("nvidia"):].isdigit() for n in names) else "cpu"


def format_settings(choices: Mapping[str, Choice]) -> str:
    """One line per setting, for the start of a run or the doctor."""
    if not choices:
        return "environment: no GPU settings (CPU run)"
    lines = []
    for name, c in choices.items():
        if c.applied:
            lines.append(f"  {name}={c.value}  (from {c.source})")
        else:
            lines.append(f"  {name} not set to {c.value}: {c.reason}  (from {c.source})")
    return "environment settings for GPUs:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in DEVICE_KINDS:
        print(f"usage: python -m gluon_imagenet.gpu_settings {{{','.join(DEVICE_KINDS)}}}", file=sys.stderr)
        return 2
    print(format_settings(settings_for(argv[0], os.environ)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
