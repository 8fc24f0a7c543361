"""--synthetic and --io-only: what one phase's compute (random data on the device) or input pipeline (no model)
delivers, per rank and in total, so a slow run can be blamed on the right side."""
from __future__ import annotations

import time

import mxnet as mx

from gluon_imagenet.data.iterators import BatchStream
from gluon_imagenet.train.learner import Learner
from gluon_imagenet.train.loop import RunOptions, phase_iterator


def measure(setup, ranks, *, synthetic: bool, steps: int, model: str, seed: int, data_root: str) -> None:
    """Time `steps` steps per phase (after two warm-up steps) and print a table: with `synthetic`, training steps
    on random data already on the device; otherwise the phase's input stream alone."""
    plan, ctx = setup.plan, setup.device.context
    learner = None
    if synthetic:
        recipe = plan.recipe
        learner = Learner(model=model, classes=len(setup.classes), device=setup.device, ranks=ranks,
                          seed=seed, lr=plan.phases[0].lr_start, momentum=recipe.momentum,
                          optimizer=recipe.optimizer, loss_scale=recipe.loss_scale, ema=recipe.ema,
                          weight_decay=recipe.weight_decay, label_smoothing=recipe.label_smoothing,
                          first_image_size=plan.phases[0].phase.image_size, amp_dtype=setup.amp_dtype)
    options = RunOptions(None, data_root, model, seed, setup.threads, 1, 0, 0, 0)
    rows = []
    for phase in plan.phases:
        if learner and learner.ema:
            learner.ema.start_phase(phase.steps_per_epoch, phase.first_step)  # its update is part of the step
        if learner:
            shape = (phase.batch_size, 3, phase.image_size, phase.image_size)
            data = mx.nd.random.randint(0, 256, shape=shape, ctx=ctx).astype("uint8")
            label = mx.nd.random.randint(0, len(setup.classes), shape=(phase.batch_size,), ctx=ctx)
            batches = ((data, label) for _ in range(steps + 2))
        else:
            iterator = phase_iterator(plan, phase, phase.first_step, options, ranks, setup.device)
            batches = BatchStream(iterator).take(steps + 2)
        for k, (data, label) in enumerate(batches):
            if k == 2:  # two warm-up steps: graph building, memory planning, prefetch
                start = time.perf_counter()
            if learner:
                learner.step(data, label, phase.lr_start).wait_to_read()
            else:
                data.as_in_context(ctx).wait_to_read()
        mx.nd.waitall()  # the last step's backward and update count too
        seconds = time.perf_counter() - start
        rows.append((phase.index + 1, phase.image_size, phase.batch_size, steps * phase.batch_size / seconds))
    what = "compute (synthetic data)" if synthetic else "input pipeline (no model)"
    ranks.print(f"{what}, {steps} steps per phase, {setup.device}, amp {setup.amp_dtype or 'off'}, "
                f"{ranks.size} workers")
    ranks.print(f"{'phase':>5} {'size':>5} {'batch':>5} {'img/s/worker':>13} {'img/s total':>12}")
    for index, size, batch, rate in rows:
        ranks.print(f"{index:>5} {size:>5} {batch:>5} {rate:>13.1f} {rate * ranks.size:>12.1f}")
