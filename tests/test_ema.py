"""The weight EMA (recipe field `ema`): its closed form, the checkpoint files and record, resume, two ranks."""
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, TWO_PHASES, run_tool, train_cmd, write_recipe
from gluon_imagenet import checkpoint
from gluon_imagenet.recipe import recipe_from_dict
from gluon_imagenet.recipe_fields import RecipeError


def tiny_net():
    import mxnet as mx
    from mxnet import autograd, gluon

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4), gluon.nn.BatchNorm())
    net.initialize(mx.init.Uniform(1.0), ctx=mx.cpu())
    with autograd.train_mode():
        net(mx.nd.random.uniform(shape=(5, 3)))
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def test_running_stats_are_batchnorms_running_mean_and_var_only():
    """model.is_running_stat: the one rule the EMA and the ranks' averaging (dist.py) use."""
    from gluon_imagenet.ema import WeightEMA
    from gluon_imagenet.model import is_running_stat

    net = tiny_net()
    named = net._collect_params_with_prefix()
    assert sorted(n for n, p in named.items() if is_running_stat(n, p)) == ["1.running_mean", "1.running_var"]
    assert WeightEMA(net, half_life_epochs=0.5).running_stat_names == ["1.running_mean", "1.running_var"]


@pytest.mark.parametrize("aggregate", [False, True], ids=["per-array", "multi-tensor"])
@pytest.mark.parametrize("every_steps, steps", [(1, 7), (3, 7), (3, 9)])
def test_ema_equals_its_closed_form_with_constant_weights(every_steps, steps, aggregate):
    import mxnet as mx
    import numpy as np

    from gluon_imagenet.ema import WeightEMA

    net = tiny_net()
    params = net._collect_params_with_prefix()
    start = {name: p.data().asnumpy() for name, p in params.items()}
    ema = WeightEMA(net, half_life_epochs=0.5, every_steps=every_steps, aggregate=aggregate)
    ema.start_phase(steps_per_epoch=4, global_step=0)
    target = {name: value + 1.5 + np.arange(value.size).reshape(value.shape) for name, value in start.items()}
    for name, p in params.items():  # the weights (and BatchNorm statistics) jump to a constant and stay there
        p.set_data(mx.nd.array(target[name]))
    for _ in range(steps):
        ema.after_step()
    updates = steps // every_steps
    kept = (0.5 ** (1 / (0.5 * 4))) ** (every_steps * updates)  # d**K per update, d from the half-life
    assert any("running_mean" in name for name in ema.names) and any("running_var" in name for name in ema.names)
    for name in params:
        np.testing.assert_allclose(ema.averages[name].asnumpy(), kept * start[name] + (1 - kept) * target[name],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_after_one_half_life_the_start_weighs_one_half():
    import mxnet as mx
    import numpy as np

    from gluon_imagenet.ema import WeightEMA

    net = tiny_net()
    params = net._collect_params_with_prefix()
    start = {name: p.data().asnumpy() for name, p in params.items()}
    ema = WeightEMA(net, half_life_epochs=1.5, every_steps=2)
    ema.start_phase(steps_per_epoch=4, global_step=0)  # 1.5 epochs = 6 steps = 3 updates
    for p in params.values():
        p.set_data(mx.nd.zeros(p.shape))
    for _ in range(6):
        ema.after_step()
    for name in params:
        np.testing.assert_allclose(ema.averages[name].asnumpy(), start[name] / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ema, message", [
    (0.5, "field 'ema': 0.5 must be a mapping {half_life_epochs: H, every_steps: K}"),
    ({"every_steps": 2}, "field 'ema.half_life_epochs' is missing"),
    ({"half_life_epochs": 0}, "field 'ema.half_life_epochs': 0 must be a number of epochs > 0"),
    ({"half_life_epochs": "soon"}, "field 'ema.half_life_epochs': 'soon' must be a number of epochs > 0"),
    ({"half_life_epochs": 1, "every_steps": 0}, "field 'ema.every_steps': 0 must be a whole number >= 1"),
    ({"half_life_epochs": 1, "every_steps": 2.5}, "field 'ema.every_steps': 2.5 must be a whole number >= 1"),
    ({"half_life_epochs": 1, "decay": 0.999}, "field 'ema': unknown field(s) 'decay'"),
])
def test_bad_ema_settings_refused(ema, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe_from_dict(dict(TWO_PHASES, ema=ema))


def test_ema_field_defaults_and_digest():
    plain = recipe_from_dict(TWO_PHASES)
    assert recipe_from_dict(dict(TWO_PHASES, ema=None)) == plain and plain.ema is None
    assert "ema" not in plain.to_dict()  # recipes without it keep their digest
    on = recipe_from_dict(dict(TWO_PHASES, ema={"half_life_epochs": 0.25}))
    assert (on.ema.half_life_epochs, on.ema.every_steps) == (0.25, 1) and on.digest() != plain.digest()
    assert recipe_from_dict(on.to_dict()) == on  # what a checkpoint records reads back the same


def test_recipe_show_refuses_a_bad_ema_with_exit_2(tmp_path):
    path = write_recipe(str(tmp_path), dict(TWO_PHASES, ema={"half_life_epochs": -1}))
    proc = run_tool(["-m", "gluon_imagenet.recipe", "show", path])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "field 'ema.half_life_epochs': -1" in proc.stderr


# Two phases at 32 px from the same data dir: 15 steps at batch 16, then 10 at batch 24; an update every 2 steps.
EMA_RECIPE = dict(TWO_PHASES, eval_image_size=32, ema={"half_life_epochs": 0.5, "every_steps": 2}, phases=[
    dict(TWO_PHASES["phases"][0], epochs=[0, 1]),
    dict(TWO_PHASES["phases"][1], epochs=[1, 2], batch_size=24, image_size=32, data_dir="40")])


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def ema_run(packed_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    recipe = write_recipe(str(folder), EMA_RECIPE)
    run_dir = str(folder / "run")
    proc = run_tool(train_cmd(recipe, packed_root, run_dir, "--no-tensorboard"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe, run_dir


def test_ema_saved_beside_each_checkpoint_and_checksummed(ema_run):
    import mxnet as mx

    from gluon_imagenet.model import build_model

    _, run_dir = ema_run
    good, bad = checkpoint.scan(run_dir)
    assert bad == [] and [c.step for c in good] == [15, 25]
    for ckpt in good:
        listed = ckpt.record.files[checkpoint.EMA_EXT]
        assert listed == {"bytes": os.path.getsize(ckpt.ema_params_path), "sha256": sha256(ckpt.ema_params_path)}
        assert ckpt.record.ema == {"half_life_epochs": 0.5, "every_steps": 2}
    final = good[-1]
    # The same names and format as .params: Gluon loads it into the same architecture.
    assert sorted(mx.nd.load(final.ema_params_path)) == sorted(mx.nd.load(final.params_path))
    net = build_model("resnet18_v1b", 10)
    net.load_parameters(final.ema_params_path, ctx=mx.cpu())
    averaged = {k: v.asnumpy() for k, v in mx.nd.load(final.ema_params_path).items()}
    raw = {k: v.asnumpy() for k, v in mx.nd.load(final.params_path).items()}
    differ = [k for k in raw if not (averaged[k] == raw[k]).all()]
    assert any("running_mean" in k for k in differ) and any("weight" in k for k in differ)

    damaged = os.path.join(os.path.dirname(run_dir), "damaged")
    shutil.copytree(run_dir, damaged)
    with open(os.path.join(damaged, final.name + checkpoint.EMA_EXT), "r+b") as f:
        f.truncate(100)
    good, bad = checkpoint.scan(damaged)
    assert [c.step for c in good] == [15] and bad == [(final.name, f"{final.name}.ema.params has 100 bytes, "
                                                                  f"expected {listed['bytes']}")]


def test_a_phase_boundary_resume_with_ema_is_bit_identical(ema_run, packed_root, tmp_path):
    recipe, run_dir = ema_run
    copy = str(tmp_path / "run")
    os.makedirs(copy)
    for name in os.listdir(run_dir):  # the run up to the phase boundary (step 15)
        if name == "run.json" or (name.startswith("ckpt-") and int(name[5:13]) <= 15):
            shutil.copy(os.path.join(run_dir, name), copy)
    proc = run_tool(train_cmd(recipe, packed_root, copy, "--no-tensorboard", "--resume"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from ckpt-00000015: step 15" in proc.stdout
    for ext in (".params", checkpoint.EMA_EXT):
        assert sha256(os.path.join(copy, "ckpt-00000025" + ext)) == sha256(os.path.join(run_dir, "ckpt-00000025" + ext))


@pytest.mark.slow
def test_two_ranks_train_and_save_the_ema(packed_root, tmp_path):
    import mxnet as mx
    import numpy as np
    from test_amp import horovod

    one_phase = dict(EMA_RECIPE, reference_workers=2, phases=EMA_RECIPE["phases"][:1])  # 240 / (2 x 16): 8 steps
    run_dir = str(tmp_path / "run")
    args = ["tests/ema_ranks.py", *train_cmd(write_recipe(str(tmp_path), one_phase), packed_root, run_dir,
                                             "--no-tensorboard")[2:]]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(horovod(args), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = re.findall(r"rank \d/2: finished at step 8, parameter digest (\w+)", proc.stdout)
    assert len(digests) == 2 and digests[0] == digests[1], proc.stdout[-2000:]
    good, bad = checkpoint.scan(run_dir)
    assert bad == [] and [c.step for c in good] == [8]
    saved = mx.nd.load(good[0].ema_params_path)
    assert sorted(saved) == sorted(mx.nd.load(good[0].params_path))
    # Each rank's average of its own BatchNorm statistics differs; the saved one is their mean.
    before = [np.load(os.path.join(run_dir, f"ema-before-rank{r}.npz")) for r in (0, 1)]
    assert before[0].files and all(name in saved for name in before[0].files)
    assert any(not np.array_equal(before[0][name], before[1][name]) for name in before[0].files)
    for name in before[0].files:
        np.testing.assert_allclose(saved[name].asnumpy(), (before[0][name] + before[1][name]) / 2, rtol=1e-6,
                                   atol=1e-7, err_msg=name)
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["recipe"]["ema"] == {"half_life_epochs": 0.5, "every_steps": 2}


@pytest.mark.parametrize("aggregate", [False, True], ids=["per-array", "multi-tensor"])
def test_an_ema_update_reads_nothing_back_from_the_device(aggregate, monkeypatch):
    import mxnet as mx

    from gluon_imagenet.ema import WeightEMA

    net = tiny_net()
    ema = WeightEMA(net, half_life_epochs=0.5, aggregate=aggregate)
    ema.start_phase(steps_per_epoch=4, global_step=0)
    for p in net.collect_params().values():  # away from the averages, so each update changes them
        p.set_data(p.data() + 1)
    before = {name: array.copy() for name, array in ema.averages.items()}
    mx.nd.waitall()
    reads = []
    for method in ("asnumpy", "wait_to_read"):  # asscalar and printing go through asnumpy
        real = getattr(mx.nd.NDArray, method)
        monkeypatch.setattr(mx.nd.NDArray, method, lambda self, _real=real, _m=method: reads.append(_m) or _real(self))
    monkeypatch.setattr(mx.nd, "waitall", lambda _real=mx.nd.waitall: reads.append("waitall") or _real())
    for _ in range(3):
        ema.after_step()
    assert reads == []
    monkeypatch.undo()
    assert all((ema.averages[name] - before[name]).min().asscalar() > 0.5 for name in before)  # 3 updates ran


def test_a_resume_refuses_a_changed_ema():
    from gluon_imagenet.recipe import resume_edit_problem

    trained = recipe_from_dict(dict(TWO_PHASES, ema={"half_life_epochs": 0.5, "every_steps": 2}))
    assert resume_edit_problem(trained, trained, 1) == ""
    assert resume_edit_problem(trained, recipe_from_dict(dict(TWO_PHASES, ema={"half_life_epochs": 1})), 1) == (
        "run-wide field 'ema' is {'half_life_epochs': 0.5, 'every_steps': 2} there and "
        "{'half_life_epochs': 1.0, 'every_steps': 1} here")
    assert resume_edit_problem(trained, recipe_from_dict(TWO_PHASES), 0) == (
        "run-wide field 'ema' is {'half_life_epochs': 0.5, 'every_steps': 2} there and None here")


def test_a_save_interrupted_while_writing_the_ema_leaves_no_piece(tmp_path):
    import mxnet as mx

    from gluon_imagenet.ema import WeightEMA

    net = tiny_net()
    trainer = mx.gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.1, "momentum": 0.9}, kvstore=None)
    ema = WeightEMA(net, half_life_epochs=0.5)

    def full_disk(path):
        ema.save(path)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        checkpoint.save(str(tmp_path), 10, net, trainer, checkpoint.Record(), {checkpoint.EMA_EXT: full_disk})
    assert os.listdir(tmp_path) == []
    saved = checkpoint.save(str(tmp_path), 10, net, trainer, checkpoint.Record(), {checkpoint.EMA_EXT: ema.save})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000010" + ext for ext in (".ema.params", ".json", ".params",
                                                                               ".states")]
    assert checkpoint.scan(str(tmp_path)) == ([saved], [])
    os.remove(saved.json_path)  # a save killed before its record: one partial checkpoint, not two
    assert checkpoint.scan(str(tmp_path)) == ([], [("ckpt-00000010", "partial: no .json record (interrupted while "
                                                                      "saving)")])
