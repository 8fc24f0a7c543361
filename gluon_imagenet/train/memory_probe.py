"""Will each phase fit in memory? One forward, backward and update per phase with the trainer's own Learner (its
model, AMP setting, optimizer, and the phase's batch and image size) on one device, each in a fresh process, its
peak against what the device has. A phase that does not fit is refused before any training, naming the phase and
the largest batch that would fit, found by trying smaller ones: a run that would run out of memory at the first
step of phase 3, hours in, stops in its first minutes instead.

The peak: on a GPU, what MXNet holds on the device after the step (mx.context.gpu_memory_info: total - free; its
pooled allocator keeps what the step needed, so that is the step's peak, with whatever other processes hold
on that GPU); on the CPU, the process's peak resident
memory (getrusage ru_maxrss), against the host's available memory shared by the ranks of this machine. A fresh
process per probe, since a process's peak never goes down. GLUON_IMAGENET_MEMORY_BUDGET (bytes, or with a K/M/G
suffix) replaces what the device has: the real probe against a smaller budget (tests; or to keep headroom).

    python -m gluon_imagenet.train.memory_probe '{"model": ..., "batch_size": ..., ...}'   # one probe: one JSON line
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Callable

BUDGET_VARIABLE = "GLUON_IMAGENET_MEMORY_BUDGET"
BISECTION_PROBES = 4  # after a refusal: probes between batch 1 and the phase's batch (1/16 of it)
PROBE_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Probe:
    """One phase's training step, as the trainer would run it on one device."""
    model: str
    classes: int
    device: str  # "cpu" or "gpu:N"
    amp_dtype: str | None
    batch_size: int
    image_size: int
    momentum: float
    weight_decay: float
    label_smoothing: float
    optimizer: str = "nag"  # recipe.OPTIMIZERS
    loss_scale: float | str = "dynamic"
    ema_half_life_epochs: float = 0.0  # recipe.ema (0: off): its copy of the weights is memory too
    ema_every_steps: int = 1


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{BUDGET_VARIABLE}={text!r}: give a number of bytes, e.g. 512M or 16G")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


def ema_settings(probe: Probe):
    from gluon_imagenet.recipe import EmaSettings

    return EmaSettings(probe.ema_half_life_epochs, probe.ema_every_steps) if probe.ema_half_life_epochs else None


def measure(probe: Probe) -> dict:
    """In this process: the step, then {"peak": bytes, "total": bytes the device has}."""
    import resource

    import mxnet as mx

    from gluon_imagenet.train.probes import device_from_spec, make_learner, random_batch

    device = device_from_spec(probe.device)
    learner = make_learner(probe.model, probe.classes, device, probe.amp_dtype, probe.image_size,
                           momentum=probe.momentum, weight_decay=probe.weight_decay,
                           label_smoothing=probe.label_smoothing, optimizer=probe.optimizer,
                           loss_scale=probe.loss_scale, ema=ema_settings(probe))
    if learner.ema:
        learner.ema.start_phase(1, 0)  # the decay does not change the memory
    data, label = random_batch(probe.batch_size, probe.image_size, probe.classes)
    learner.step(data, label, 0.01).asscalar()  # waits for the step: an out-of-memory error surfaces here
    mx.nd.waitall()
    if device.kind == "gpu":
        free, total = mx.context.gpu_memory_info(device.index)
        return {"peak": total - free, "total": total}
    import psutil

    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "total": psutil.virtual_memory().total}


def measure_in_child(probe: Probe, timeout: float = PROBE_TIMEOUT_SECONDS) -> tuple[int | None, str]:
    """(peak bytes, "") or (None, why the probe failed); an out-of-memory failure is (None, "out of memory: ...")."""
    from gluon_imagenet.train.probes import start_child, wait_child

    child = wait_child(start_child(["-m", "gluon_imagenet.train.memory_probe", json.dumps(asdict(probe))]), timeout)
    result = child.last_json()
    if child.returncode == 0 and result is not None:
        return int(result["peak"]), ""
    error = child.error()
    if re.search(r"out of memory|cudaMalloc|bad_alloc|MemoryError", child.stderr, re.IGNORECASE) or \
            child.returncode == -9:
        return None, f"out of memory: {error}"
    return None, f"the probe failed ({child.why or f'exit {child.returncode}'}): {error}"


def device_budget(device: str, ranks_sharing: int, environ=os.environ) -> tuple[int, str]:
    """(bytes one probe may use, where that figure comes from)."""
    if environ.get(BUDGET_VARIABLE):
        return parse_bytes(environ[BUDGET_VARIABLE]), f"{BUDGET_VARIABLE}"
    if device.startswith("gpu"):
        import mxnet as mx

        _, total = mx.context.gpu_memory_info(int(device.split(":")[1]))
        return total, f"GPU {device.split(':')[1]}'s memory"
    import psutil

    available = psutil.virtual_memory().available
    return available // max(1, ranks_sharing), (f"available host memory / {ranks_sharing} rank(s)"
                                                if ranks_sharing > 1 else "available host memory")


@dataclass(frozen=True)
class PhaseFit:
    phase: int  # 1-based, as the messages name phases
    batch_size: int
    image_size: int
    peak: int | None  # bytes the phase's batch needed (None: it failed)
    budget: int
    budget_source: str
    fits: bool
    largest_fitting: int | None = None  # when it does not fit: the largest batch found to fit (None: not even 1)
    largest_peak: int | None = None
    failure: str = ""  # why the phase's own probe failed, when it did not simply need too much

    def message(self) -> str:
        head = (f"phase {self.phase} (batch_size {self.batch_size} at {self.image_size} px) needs "
                f"{_size(self.peak) if self.peak else 'more than there is'} of {_size(self.budget)} "
                f"({self.budget_source})")
        if self.fits:
            return head
        if self.failure:
            head += f" ({self.failure})"
        if self.largest_fitting:
            return (f"{head}: it will not fit; batch_size {self.largest_fitting} does ({_size(self.largest_peak)}): "
                    f"set phase {self.phase}'s batch_size to {self.largest_fitting} or less (and its lr in proportion)")
        return f"{head}: it will not fit, not even batch_size 1: a device with more memory, or a smaller image_size"


def fit_phase(phase: int, probe: Probe, budget: int, budget_source: str,
              peak_of: Callable[[Probe], tuple[int | None, str]] = measure_in_child,
              bisection_probes: int = BISECTION_PROBES) -> PhaseFit:
    """The phase's own batch; when it does not fit, batch 1, then bisection between what fits and what does not."""
    peak, why = peak_of(probe)
    fits = peak is not None and peak <= budget
    base = dict(phase=phase, batch_size=probe.batch_size, image_size=probe.image_size, peak=peak, budget=budget,
                budget_source=budget_source)
    if fits:
        return PhaseFit(**base, fits=True)
    failure = "" if peak is not None or why.startswith("out of memory") else why
    if failure:  # not a question of size: trying smaller batches would only repeat the failure
        return PhaseFit(**base, fits=False, failure=failure)
    lo, lo_peak, hi = 0, None, probe.batch_size  # lo: largest known to fit (0: none), hi: smallest known not to
    candidates = [1] if probe.batch_size > 1 else []
    for _ in range(1 + bisection_probes):
        if not candidates:
            break
        batch = candidates.pop()
        small_peak, _ = peak_of(Probe(**dict(asdict(probe), batch_size=batch)))
        if small_peak is not None and small_peak <= budget:
            lo, lo_peak = batch, small_peak
        else:
            hi = batch
        if lo == 0:
            break  # not even batch 1
        if hi - lo > 1:
            candidates.append((lo + hi) // 2)
    return PhaseFit(**base, fits=False, largest_fitting=lo or None, largest_peak=lo_peak)


def phase_probes(plan_phases, model: str, classes: int, device: str, amp_dtype: str | None, recipe) -> list:
    """[(1-based phase number, Probe)] for recipe phases (or plan phases: anything with batch_size, image_size)."""
    out = []
    for number, phase in plan_phases:
        out.append((number, Probe(model, classes, device, amp_dtype, phase.batch_size, phase.image_size,
                                  recipe.momentum, recipe.weight_decay, recipe.label_smoothing, recipe.optimizer,
                                  recipe.loss_scale, recipe.ema.half_life_epochs if recipe.ema else 0.0,
                                  recipe.ema.every_steps if recipe.ema else 1)))
    return out


def check_phases(probes, ranks_sharing: int = 1, stop_at_first: bool = False, environ=os.environ) -> list[PhaseFit]:
    fits = []
    for number, probe in probes:
        budget, source = device_budget(probe.device, ranks_sharing if probe.device == "cpu" else 1, environ)
        fits.append(fit_phase(number, probe, budget, source))
        if stop_at_first and not fits[-1].fits:
            break
    return fits


def refusal(fits: list[PhaseFit]) -> str:
    """The trainer's one-line refusal ("" when every phase fits)."""
    return "; ".join(f.message() for f in fits if not f.fits)


def check_memory(recipe, model: str, classes: int, gpus, amp: bool, ranks: int) -> list:
    """The doctor's lines: one per phase, probed on GPU 0 (or the CPU)."""
    from gluon_imagenet.train.probes import Result

    device = "gpu:0" if gpus else "cpu"
    amp_dtype = "float16" if gpus and amp else None
    try:
        fits = check_phases(phase_probes(enumerate(recipe.phases, 1), model, classes, device, amp_dtype, recipe),
                            ranks_sharing=ranks)
    except ValueError as e:  # a bad budget variable
        return [Result("failure", "memory", str(e), f"unset {BUDGET_VARIABLE} or give bytes")]
    return [Result("ok" if f.fits else "failure", f"memory phase {f.phase}", f.message(),
                   "" if f.fits else "lower that phase's batch_size as said, or use a device with more memory")
            for f in fits]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure(Probe(**json.loads(argv[0])))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def untrained_phases(plan, done_steps: int) -> list:
    """[(1-based number, plan phase)] of the phases with steps still to train after `done_steps` (the phase a
    resumed run is in counts: its batch runs again)."""
    return [(p.index + 1, p) for p in plan.phases if p.end_step > done_steps]


def trainer_check(setup, ranks, resume_from, *, model: str, memory_check: bool | None) -> str:
    """The trainer's check at start, on GPUs (memory_check None: --memory-check not given) or with
    --memory-check, of the phases not yet trained: "" or the refusal. Each rank probes its own device."""
    wanted = setup.device.kind == "gpu" if memory_check is None else memory_check
    if not wanted:
        return ""
    phases = untrained_phases(setup.plan, resume_from.step if resume_from else 0)
    device = f"gpu:{setup.device.index}" if setup.device.kind == "gpu" else "cpu"
    probes = phase_probes(phases, model, len(setup.classes), device, setup.amp_dtype, setup.plan.recipe)
    ranks.print(f"memory check: one step of each of {len(probes)} phase(s) on {setup.device} (--no-memory-check "
                "skips it)")
    try:
        fits = check_phases(probes, ranks.local_size, stop_at_first=True)
    except ValueError as e:
        return str(e)
    for fit in fits:
        if fit.fits:
            ranks.print(f"memory: {fit.message()}")
    return refusal(fits)
