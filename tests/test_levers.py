"""Training levers as recipe data: optimizer (nag | sgd through the aggregated update) and AMP's loss scale
(dynamic | a fixed number, which reads nothing back from the device per step)."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from gluon_imagenet import checkpoint
from gluon_imagenet.recipe import recipe_from_dict
from gluon_imagenet.recipe_fields import RecipeError

PHASES = [{"epochs": [0, 1], "lr": [0.1, 0.0], "lr_method": "linear", "batch_size": 4, "image_size": 32,
           "data_dir": "40"}]

# AMP initialised for bfloat16 but casting no operator (as tests/amp_plumbing.py): the loss scaler and
# init_trainer run for real on any CPU. Reads back from the device are counted by wrapping NDArray.asnumpy (every
# read of a value goes through it), aggregated updates by wrapping MXNet's multi_sgd_mom_update.
STEP_SCRIPT = r"""
import json, sys
from mxnet.contrib import amp
amp.init(target_dtype="bfloat16", target_precision_ops=[], conditional_fp32_ops=[], fp32_ops=[])
import mxnet as mx
import mxnet.optimizer.optimizer as mx_optimizer
from gluon_imagenet.devices import Device
from gluon_imagenet.dist import Ranks
from gluon_imagenet.train.learner import Learner

loss_scale = sys.argv[1] if sys.argv[1] == "dynamic" else float(sys.argv[1])
learner = Learner(model="resnet18_v1b", classes=4, device=Device("cpu"), ranks=Ranks(), seed=0, lr=0.1,
                  momentum=0.9, weight_decay=1e-4, label_smoothing=0.0, first_image_size=32, amp_dtype="bfloat16",
                  optimizer=sys.argv[2], loss_scale=loss_scale)
data = mx.nd.random.randint(0, 256, shape=(4, 3, 32, 32)).astype("uint8")
label = mx.nd.array([0, 1, 2, 3])
learner.step(data, label, 0.1)
mx.nd.waitall()
counts = {"reads": 0, "multi_updates": 0}
read, multi = mx.nd.NDArray.asnumpy, mx_optimizer.multi_sgd_mom_update
def counted_read(self):
    counts["reads"] += 1
    return read(self)
def counted_multi(*args, **kwargs):
    counts["multi_updates"] += 1
    return multi(*args, **kwargs)
mx.nd.NDArray.asnumpy, mx_optimizer.multi_sgd_mom_update = counted_read, counted_multi
losses = [learner.step(data, label, 0.1) for _ in range(3)]
mx.nd.waitall()
mx.nd.NDArray.asnumpy = read
trainable = sum(1 for p in learner.net.collect_params().values() if p.grad_req != "null")
print(json.dumps(dict(counts, trainable=trainable, losses=[float(l.asscalar()) for l in losses],
                      scale=learner.trainer._amp_loss_scaler.loss_scale)))
"""


def run_steps(loss_scale, optimizer, aggregation=None):
    env = dict(os.environ)
    env.pop("MXNET_OPTIMIZER_AGGREGATION_SIZE", None)
    if aggregation:
        env["MXNET_OPTIMIZER_AGGREGATION_SIZE"] = str(aggregation)
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(loss_scale), optimizer], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_static_loss_scale_reads_nothing_back_per_step():
    dynamic, static = run_steps("dynamic", "nag"), run_steps(256, "nag")
    assert dynamic["reads"] >= 3  # MXNet's dynamic scaler: one overflow read per step (has_overflow)
    assert static["reads"] == 0
    assert static["scale"] == 256.0 and dynamic["scale"] == 2.0 ** 16
    assert all(math.isfinite(v) for v in static["losses"])


def test_sgd_updates_through_the_aggregated_multi_tensor_update():
    # On the CPU MXNet's default of 4 parameters per update stays (60 is for GPUs: learner.SGD_AGGREGATION_GPU);
    # the variable, where set, decides.
    sgd, sgd60, nag = run_steps(256, "sgd"), run_steps(256, "sgd", aggregation=60), run_steps(256, "nag")
    assert sgd["multi_updates"] == 3 * math.ceil(sgd["trainable"] / 4)
    assert sgd60["multi_updates"] == 3 * math.ceil(sgd["trainable"] / 60)
    assert nag["multi_updates"] == 0
    assert all(math.isfinite(v) for v in sgd["losses"])


def recipe(**fields):
    return recipe_from_dict(dict({"phases": PHASES}, **fields))


@pytest.mark.parametrize("fields, expected", [
    ({}, ("nag", "dynamic")),
    ({"optimizer": "sgd"}, ("sgd", "dynamic")),
    ({"loss_scale": 256}, ("nag", 256.0)),
    ({"loss_scale": "dynamic", "optimizer": "nag"}, ("nag", "dynamic")),
])
def test_optimizer_and_loss_scale_fields(fields, expected):
    r = recipe(**fields)
    assert (r.optimizer, r.loss_scale) == expected
    assert r.to_dict()["optimizer"] == expected[0]


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "adam"}, "field 'optimizer': 'adam' is not one of nag, sgd"),
    ({"loss_scale": 0}, "field 'loss_scale': 0 must be 'dynamic' or a number in [1, 2**24]"),
    ({"loss_scale": "static"}, "field 'loss_scale': 'static' must be"),
    ({"loss_scale": True}, "field 'loss_scale': True must be"),
    ({"loss_scale": 2 ** 30}, "must be 'dynamic' or a number"),
])
def test_bad_optimizer_and_loss_scale_refused(fields, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        recipe(**fields)


@pytest.mark.parametrize("method, last_step_lr", [("linear", 0.1 / 10), ("cosine", 0.1 * (1 - math.cos(math.pi / 10)) / 2)])
def test_linear_and_cosine_decay_to_exactly_zero(method, last_step_lr):
    from gluon_imagenet.schedule import lr_at, make_plan

    plan = make_plan(recipe(reference_workers=1, phases=[dict(PHASES[0], lr_method=method)]), train_images=40,
                     workers=1)  # 10 steps
    assert plan.phases[0].lr(plan.total_steps) == 0.0  # the schedule reaches 0 where training ends
    assert lr_at(plan, plan.total_steps - 1) == pytest.approx(last_step_lr, rel=1e-12)
    assert lr_at(plan, 0) == pytest.approx(0.1)


def test_exp_decay_to_zero_refused():
    with pytest.raises(RecipeError, match="must be > 0 at both ends for lr_method 'exp'"):
        recipe(phases=[dict(PHASES[0], lr_method="exp")])


@pytest.mark.slow
def test_sgd_with_a_static_loss_scale_under_horovod(packed_root, tmp_path):
    from test_amp import horovod

    from conftest import TWO_PHASES, metrics, train_cmd, write_recipe

    lever = dict(TWO_PHASES, reference_workers=2, optimizer="sgd", loss_scale=256, eval_image_size=32)
    lever["phases"] = [dict(TWO_PHASES["phases"][0], epochs=[0, 1])]
    run_dir = str(tmp_path / "run")
    args = ["tests/amp_plumbing.py", *train_cmd(write_recipe(str(tmp_path), lever), packed_root, run_dir, "--amp")[2:]]
    proc = subprocess.run(horovod(args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = re.findall(r"rank \d/2: finished at step (\d+), parameter digest (\w+)", proc.stdout)
    assert len(digests) == 2 and digests[0] == digests[1], proc.stdout[-2000:]
    assert int(digests[0][0]) == 8  # 240 images, 2 ranks x 16: 8 steps
    assert all(math.isfinite(m["loss"]) for m in metrics(run_dir))
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    assert (run["recipe"]["optimizer"], run["recipe"]["loss_scale"]) == ("sgd", 256.0)
    final = checkpoint.scan(run_dir)[0][-1]
    assert final.record.loss_scaler == {"loss_scale": 256.0, "next_loss_scale": 256.0, "unskipped": 0}


def ffcv_resolution(epoch, min_res, max_res, start_ramp, end_ramp):
    """FFCV's get_resolution (ffcv-imagenet train_imagenet.py): interpolated, rounded to a multiple of 32."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    import numpy as np

    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("epochs, start_ramp, end_ramp", [(16, 11, 13), (40, 29, 34), (88, 65, 76)])
def test_ffcv_recipes_follow_ffcv_schedules(epochs, start_ramp, end_ramp):
    """Epoch by epoch, each transcribed recipe trains at FFCV's resolution with FFCV's cyclic lr (peak 1.7 at
    epoch 2, from 1e-4 x peak, to 0 at the end) on 8 workers of 512 images."""
    from gluon_imagenet.recipe import load_recipe
    from gluon_imagenet.schedule import lr_at, make_plan, phase_at

    plan = make_plan(load_recipe(os.path.join(ROOT, "recipes", f"ffcv_rn50_{epochs}.yaml")), 1281167, 8)
    assert plan.lr_scale == 1 and plan.recipe.optimizer == "sgd" and plan.recipe.label_smoothing == 0.1
    assert plan.recipe.resolved_eval_image_size == 256
    for epoch in range(epochs):
        phase = next(p for p in plan.phases if p.phase.epochs[0] <= epoch < p.phase.epochs[1])
        assert phase.image_size == ffcv_resolution(epoch, 160, 192, start_ramp, end_ramp), epoch
        assert phase.batch_size == 512
        step = phase.first_step + (epoch - phase.phase.epochs[0]) * phase.steps_per_epoch
        assert phase_at(plan, step) is phase
        ffcv_lr = float(np.interp([epoch], [0, 2, epochs], [1.7e-4, 1.7, 0])[0])
        assert lr_at(plan, step) == pytest.approx(ffcv_lr, rel=1e-4, abs=1e-9), epoch
    assert plan.phases[-1].lr(plan.total_steps) == 0.0
