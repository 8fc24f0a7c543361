"""Probes that run the trainer's own code in a child process, and the one way the doctor and the trainer wait for
such a child.

A probe runs in its own process: amp.init() changes a process for good, a CUDA failure can kill it, and a
process's peak memory only ever grows (a per-phase peak needs a fresh process per phase). A child that reports
an error and then stops making progress (MXNet prints `Check failed` inside an engine thread and waits forever)
is ended at once and its error reported, rather than after the whole timeout.

Result, one line of the doctor's report, lives here so that the doctor and the probes it runs (memory_probe)
both import it without importing each other.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

STATUSES = ("ok", "info", "warning", "failure")


@dataclass(frozen=True)
class Result:
    """One line of the doctor's report."""
    status: str  # one of STATUSES
    check: str  # short name, e.g. "gpu 0"
    detail: str  # what was found
    fix: str = ""  # what to do (warnings and failures)


# A child whose stderr shows an error and that has not ended this many seconds later is taken to be stuck.
STUCK_AFTER_ERROR_SECONDS = 10.0
ERROR_MARKERS = ("Error", "error:", "Check failed", "Traceback", "terminate called")


@dataclass(frozen=True)
class ChildResult:
    returncode: int | None  # None: ended by us (stuck or timed out)
    stdout: str
    stderr: str
    why: str  # "" when it ended by itself; else why it was ended

    def last_json(self) -> dict | None:
        for line in reversed(self.stdout.strip().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return None

    def error(self) -> str:
        """The most telling line of stderr."""
        lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip()]
        for line in reversed(lines):
            if any(marker in line for marker in ERROR_MARKERS) and not line.startswith("Traceback"):
                return line[:400]
        return lines[-1][:400] if lines else "no output (killed?)"


def start_child(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_child(proc: subprocess.Popen, timeout: float, stuck_after_error: float | None = None) -> ChildResult:
    """Wait for `proc` (started by start_child), reading its output as it comes; end it when it has reported an
    error and not ended `stuck_after_error` seconds (default STUCK_AFTER_ERROR_SECONDS) later, or after
    `timeout` seconds."""
    if stuck_after_error is None:
        stuck_after_error = STUCK_AFTER_ERROR_SECONDS
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(s.readline, "")), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    start, error_seen, why = time.monotonic(), None, ""
    while proc.poll() is None:
        now = time.monotonic()
        if error_seen is None and any(marker in line for line in list(err) for marker in ERROR_MARKERS):
            error_seen = now
        if error_seen is not None and now - error_seen > stuck_after_error:
            why = f"reported an error and had not ended {stuck_after_error:.0f} s later"
        elif now - start > timeout:
            why = f"did not finish in {timeout:.0f} s"
        if why:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    for reader in readers:
        reader.join(timeout=5)
    return ChildResult(None if why else proc.returncode, "".join(out), "".join(err), why)


# ------------------------------------------------------------------------------------------------ training step
def device_from_spec(spec: str):
    """"cpu" or "gpu:N" (what the doctor passes to a child) as a devices.Device."""
    from gluon_imagenet.devices import Device

    return Device("gpu", int(spec.split(":")[1])) if spec.startswith("gpu") else Device("cpu")


def make_learner(model: str, classes: int, device, amp_dtype: str | None, image_size: int, *, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 1e-4, label_smoothing: float = 0.0,
                 params_path: str | None = None, optimizer: str = "nag", loss_scale: float | str = "dynamic",
                 ema=None):
    """The trainer's Learner for one process (no Horovod): the optimizer and AMP set-up training uses."""
    from gluon_imagenet.dist import Ranks
    from gluon_imagenet.train.learner import Learner

    return Learner(model=model, classes=classes, device=device, ranks=Ranks(), seed=0, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, label_smoothing=label_smoothing, first_image_size=image_size,
                   amp_dtype=amp_dtype, params_path=params_path, optimizer=optimizer, loss_scale=loss_scale,
                   ema=ema)


def random_batch(batch_size: int, image_size: int, classes: int):
    """uint8 images and labels on the CPU, as ImageRecordIter hands them to Learner.step."""
    import mxnet as mx

    data = mx.nd.random.randint(0, 256, shape=(batch_size, 3, image_size, image_size)).astype("uint8")
    return data, mx.nd.array([i % classes for i in range(batch_size)])


def training_step_probe(device_spec: str, model: str, amp: bool) -> dict:
    """Two Learner.step calls on `device_spec` with AMP (its dtype there) or float32, then the trainer's
    checkpoint code: save, load into a fresh Learner, and compare parameters, optimizer state and the AMP loss
    scaler. Returns what the doctor prints."""
    import mxnet as mx

    from gluon_imagenet import checkpoint

    start = time.perf_counter()
    device = device_from_spec(device_spec)
    amp_dtype = device.amp_dtype if amp else None
    classes, size = 10, 32
    learner = make_learner(model, classes, device, amp_dtype, size)
    data, label = random_batch(4, size, classes)
    for _ in range(2):
        loss = learner.step(data, label, 0.01)
    value = float(loss.asscalar())  # waits for the device: errors surface here
    result = {"loss": value, "finite": math.isfinite(value), "dtype": amp_dtype or "float32",
              "step_seconds": round(time.perf_counter() - start, 1)}
    with tempfile.TemporaryDirectory(prefix="doctor-checkpoint-") as folder:
        record = checkpoint.Record(loss_scaler=learner.loss_scaler_state() if amp_dtype else None)
        saved = checkpoint.save(folder, 2, learner.net, learner.trainer, record)
        reread, problem = checkpoint.problem(saved.json_path)
        if reread is None:
            return dict(result, checkpoint=f"the checkpoint just written does not verify: {problem}")
        fresh = make_learner(model, classes, device, amp_dtype, size, params_path=reread.params_path)
        fresh.load_states(reread.states_path, reread.record.loss_scaler)
        result["checkpoint"] = compare_learners(learner, fresh)
        result["compared"] = {"parameters": len(learner.net._collect_params_with_prefix()),
                              "optimizer_states": len(learner.trainer._updaters[0].states),
                              "loss_scaler": learner.loss_scaler_state()}
    mx.nd.waitall()
    return result


def compare_learners(saved, loaded) -> str:
    """"" when `loaded` holds what `saved` held: every parameter, every optimizer state array, the optimizer's
    update counts and the loss scaler; else the first difference."""
    import numpy as np

    # By structural name: each network instance prefixes its ParameterDict differently (resnetv1b0_, ..._1).
    params_a, params_b = saved.net._collect_params_with_prefix(), loaded.net._collect_params_with_prefix()
    if sorted(params_a) != sorted(params_b):
        return f"{len(params_b)} parameters came back, {len(params_a)} were saved"
    for name, a in params_a.items():
        b = params_b[name]
        if not np.array_equal(a.data().asnumpy(), b.data().asnumpy()):
            return f"parameter {name} differs after loading"
    updater_a, updater_b = saved.trainer._updaters[0], loaded.trainer._updaters[0]
    if sorted(updater_a.states) != sorted(updater_b.states):
        return f"optimizer state for {len(updater_b.states)} parameters came back, {len(updater_a.states)} saved"

    def arrays(state):
        if state is None:
            return []
        if isinstance(state, (tuple, list)):
            return [x for s in state for x in arrays(s)]
        return [state.asnumpy()]

    for index in updater_a.states:
        if not all(np.array_equal(x, y) for x, y in zip(arrays(updater_a.states[index]),
                                                        arrays(updater_b.states[index]))):
            return f"optimizer state of parameter {index} differs after loading"
    counts = lambda u: (u.optimizer.num_update, dict(u.optimizer._index_update_count))  # noqa: E731
    if counts(updater_a) != counts(updater_b):
        return f"optimizer update counts differ after loading: {counts(updater_a)[0]} vs {counts(updater_b)[0]}"
    if saved.loss_scaler_state() != loaded.loss_scaler_state():
        return f"loss scaler {loaded.loss_scaler_state()} after loading, {saved.loss_scaler_state()} saved"
    return ""


def main(argv: list[str] | None = None) -> int:
    """python -m gluon_imagenet.train.probes step DEVICE MODEL AMP(0/1): one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] != "step":
        print("usage: python -m gluon_imagenet.train.probes step DEVICE MODEL 0|1", file=sys.stderr)
        return 2
    print(json.dumps(training_step_probe(argv[1], argv[2], argv[3] == "1")), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
