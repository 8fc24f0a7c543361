"""MXNet's engine variables, checked before MXNet starts: values it would abort on, hang on or refuse with a
traceback become one line naming the variable, why, and what to set (the trainer and the doctor both exit 2).

What each value does in MXNet 1.9.1 (read in its source, and seen here):
  MXNET_ENGINE_TYPE: src/engine/engine.cc lines 32-51 knows ThreadedEnginePerDevice (the default),
    ThreadedEngine and NaiveEngine; anything else (an empty value too) is LOG(FATAL) "Cannot find Engine".
  The thread-pool sizes (src/initialize.cc line 91, src/common/utils.h line 509,
    src/engine/threaded_engine_perdevice.cc lines 81-83) are read with dmlc::GetEnv as integers: a value that
    is not one ("abc", "1.5", "2x") throws dmlc::ParamError during MXNet's static start-up, which aborts the
    process (exit 134) before Python prints anything; 0 or less fails ThreadPool's `Check failed: size > 0`
    (src/engine/thread_pool.h line 69) inside an engine thread and the process hangs (the CPU pool at its
    first operation; the GPU pools at the first GPU operation).
  The bulk-execution sizes are integers read the same way (0 turns bulking off, which is allowed).
An empty value of an integer variable means its default (dmlc::GetEnv), so it passes.
"""
from __future__ import annotations

import re
from typing import Mapping

ENGINE_TYPES = ("ThreadedEnginePerDevice", "ThreadedEngine", "NaiveEngine")
THREAD_POOLS = {  # variable: what the pool does
    "MXNET_CPU_WORKER_NTHREADS": "CPU operator threads",
    "MXNET_CPU_PRIORITY_NTHREADS": "CPU priority-operator threads",
    "MXNET_GPU_WORKER_NTHREADS": "computation threads per GPU",
    "MXNET_GPU_COPY_NTHREADS": "copy threads per GPU",
}
INTEGERS = ("MXNET_MP_WORKER_NTHREADS", "MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_FWD",
            "MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_BWD", "MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN",
            "MXNET_EXEC_BULK_EXEC_MAX_NODE_INFERENCE")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")  # what dmlc's istream parsing accepts for an int


def problems(environ: Mapping[str, str]) -> list[str]:
    """One message per engine variable in `environ` that MXNet would abort on, hang on or refuse."""
    out = []
    engine = environ.get("MXNET_ENGINE_TYPE")
    if engine is not None and engine not in ENGINE_TYPES:
        out.append(f"MXNET_ENGINE_TYPE={engine!r} is not an MXNet engine (MXNet stops with 'Cannot find Engine'): "
                   f"unset it, or use one of {', '.join(ENGINE_TYPES)}")
    for name in (*THREAD_POOLS, *INTEGERS):
        value = environ.get(name)
        if value is None or value == "":
            continue
        if not _INTEGER.fullmatch(value):
            out.append(f"{name}={value!r} is not a whole number (MXNet aborts at start on it): unset it or set "
                       f"e.g. {name}=1")
        elif name in THREAD_POOLS and int(value) < 1:
            out.append(f"{name}={value!r}: MXNet needs at least 1 ({THREAD_POOLS[name]}; with {value.strip()} it "
                       f"fails 'Check failed: size > 0' and hangs): unset it or set e.g. {name}=1")
    return out


def problem(environ: Mapping[str, str]) -> str:
    """All of problems() in one line ("" when MXNet can start with this environment)."""
    return "; ".join(problems(environ))
