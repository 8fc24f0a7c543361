"""The doctor (python -m gluon_imagenet.doctor) on this CPU machine, where every CPU check is real and the GPU
checks say "no GPU"; and the GPU environment settings (gluon_imagenet.gpu_settings), a pure function."""
import copy
import os

import pytest

from conftest import TWO_PHASES, run_tool, write_recipe
from gluon_imagenet import devices, gpu_settings
from gluon_imagenet.devices import cpu_supports_bfloat16
from gluon_imagenet.doctor import cluster as doctor_cluster
from gluon_imagenet.doctor import gpus as doctor_gpus
from gluon_imagenet.doctor import storage as doctor_storage

SMALL = ["--model", "resnet18_v1b"]  # the small network keeps the real training step quick


def doctor_cmd(*args):
    return run_tool(["-m", "gluon_imagenet.doctor", *SMALL, *args], timeout=600)


def lines_of(stdout, check):
    return [line for line in stdout.splitlines() if line.split()[1:2] == [check]]


@pytest.mark.slow  # the whole doctor: a child process runs a real training step (~10-25 s here)
def test_all_checks_pass_here(packed_root, tmp_path):
    recipe = write_recipe(str(tmp_path))
    proc = doctor_cmd("--recipe", recipe, "--data-root", packed_root, "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for check in ("python", "mxnet", "numpy", "gluoncv", "horovod", "horovod.mxnet", "data", "disk", "run", "memory",
                  "checkpoint"):
        assert lines_of(out, check) and lines_of(out, check)[0].startswith("ok "), (check, out)
    # On 2 CPUs ImageRecordIter starts 1 decode thread (its cap: half the CPUs), which the doctor now says, with
    # the warning that input will limit training; the count is the trainer's (devices.decode_threads).
    assert f" {devices.decode_threads(1).threads} decode thread(s) per rank" in lines_of(out, "threads")[0], out
    assert len(lines_of(out, "memory")) == 2  # one line per phase, each the real peak of a real step
    for line in lines_of(out, "memory"):
        peak_mib = float(line.split(" needs ")[1].split(" MiB")[0].replace(",", ""))
        assert 100 < peak_mib < 8000 and "(available host memory)" in line, line
    assert "no GPU: CPU training" in out
    assert "+OPENCV" in out
    assert "240 training images" in out  # 10 classes x 24, read from the packed data
    if cpu_supports_bfloat16():
        assert lines_of(out, "amp")[0].startswith("ok ") and "bfloat16" in out, out
    else:  # AMP is unavailable here: said so, and a float32 step still runs for real
        assert "AMP is unavailable on this CPU" in out and lines_of(out, "float32")[0].startswith("ok "), out
    assert "0 failure(s)" in out
    assert "ok       collectives" not in out and "not checked: run the doctor under horovodrun" in out
    assert not os.path.exists(tmp_path / "run")  # the doctor creates nothing


def test_missing_packed_data_fails(packed_root, tmp_path):
    recipe = copy.deepcopy(TWO_PHASES)
    recipe["phases"][1]["data_dir"] = "80"  # never packed
    path = write_recipe(str(tmp_path), recipe)
    proc = doctor_cmd("--checks", "data", "--recipe", path, "--data-root", packed_root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failure = lines_of(proc.stdout, "data")[0]
    assert failure.startswith("FAILURE") and "'80' has no train.rec" in failure, proc.stdout
    assert "fix: pack the data" in proc.stdout


def test_damaged_packed_data_fails(packed_root, tmp_path):
    """Present but unreadable: the first record of a copy whose .rec was cut to nothing."""
    import shutil

    root = tmp_path / "recordio"
    shutil.copytree(packed_root, root)
    open(root / "72" / "train.rec", "wb").close()
    proc = doctor_cmd("--checks", "data", "--recipe", write_recipe(str(tmp_path)), "--data-root", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(line.startswith("FAILURE") and "72/train" in line for line in proc.stdout.splitlines()), proc.stdout


def test_run_dir_without_enough_disk_fails(packed_root, tmp_path):
    """A plan of ten million epochs needs petabytes of checkpoints: more than any disk here."""
    recipe = copy.deepcopy(TWO_PHASES)
    recipe["phases"][1]["epochs"] = [3, 10_000_000]
    path = write_recipe(str(tmp_path), recipe)
    proc = doctor_cmd("--checks", "disk", "--recipe", path, "--data-root", packed_root, "--run-dir",
                      str(tmp_path / "run"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failure = lines_of(proc.stdout, "disk")[0]
    assert failure.startswith("FAILURE") and "10000000 epoch checkpoints" in failure and "not enough" in failure
    assert "fix: free" in proc.stdout


@pytest.mark.parametrize("free_factor, status", [(2.0, "ok"), (1.1, "warning"), (0.99, "failure")])
def test_disk_check_against_free_space(free_factor, status):
    need = (40 + 1) * 1000
    results = doctor_storage.check_disk("/runs/x", 40, 1000, free=lambda path: int(need * free_factor))
    assert [r.status for r in results] == [status]


def test_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path):
    """The disk check's size function against the files checkpoint.save really writes."""
    import mxnet as mx
    from mxnet import autograd, gluon

    from gluon_imagenet import checkpoint
    from gluon_imagenet.model import build_model, initialize

    net = build_model("resnet18_v1b", 10)
    initialize(net, mx.cpu())
    trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.01, "momentum": 0.9}, kvstore=None)
    data = mx.nd.zeros((2, 3, 32, 32), dtype="uint8")
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(data), mx.nd.array([0, 1]))
    loss.backward()
    trainer.step(2)
    saved = checkpoint.save(str(tmp_path), 1, net, trainer, checkpoint.Record())
    actual = sum(os.path.getsize(p) for p in (saved.params_path, saved.states_path, saved.json_path))
    estimate = doctor_storage.checkpoint_bytes("resnet18_v1b", 10)
    assert actual <= estimate <= actual + doctor_storage.CHECKPOINT_OVERHEAD_BYTES, (actual, estimate)


@pytest.mark.parametrize("ranks, threads, cores, status", [
    (1, 0, 16, "ok"), (8, 0, 64, "ok"), (8, 0, 8, "warning"), (2, 4, 4, "warning"), (1, 1, 2, "warning"),
])
def test_threads_per_rank(ranks, threads, cores, status):
    assert [r.status for r in doctor_cluster.check_threads(ranks, threads, cores)] == [status]


PIP = (set(doctor_gpus.PIP_WHEEL_ARCHS), set())


@pytest.mark.parametrize("name, capability, archs, runs", [
    ("V100", (7, 0), PIP, True),
    ("T4", (7, 5), PIP, True),  # sm_70 code runs on 7.5
    ("A100", (8, 0), PIP, True),
    ("L4", (8, 9), PIP, True),  # sm_86 code runs on 8.9
    ("H100", (9, 0), PIP, False),  # no sm_90 code and no PTX in pip's wheels
    ("H100", (9, 0), ({90}, set()), True),
    ("H100", (9, 0), ({80}, {80}), True),  # PTX is compiled for newer GPUs
    ("K80", (3, 7), PIP, False),
])
def test_compute_capability_against_build(name, capability, archs, runs):
    assert doctor_gpus.runs_on(doctor_gpus.GPU(0, name, capability), *archs) is runs


def test_hopper_with_a_pip_wheel_says_use_nvidias_container():
    gpus = [doctor_gpus.GPU(0, "NVIDIA H100 80GB HBM3", (9, 0)), doctor_gpus.GPU(1, "NVIDIA A100-SXM4-80GB", (8, 0))]
    results = {r.check: r for r in doctor_gpus.check_gpus(gpus, "test", (*PIP, "pip wheel mxnet-cu117==1.9.1"))}
    assert results["gpu 0"].status == "failure" and "NVIDIA's MXNet container" in results["gpu 0"].fix
    assert "sm_90" in results["gpu 0"].detail and "sm_86" in results["gpu 0"].detail
    assert results["gpu 1"].status == "ok"
    assert results["gpus"].status == "failure"  # and this MXNet (a CPU build) sees none of them


@pytest.mark.parametrize("visible, expected", [
    (None, [(0, "A"), (1, "B"), (2, "C")]), ("2,0", [(0, "C"), (1, "A")]), ("", []), ("1,7", [(0, "B")]),
])
def test_gpus_as_cuda_numbers_them(monkeypatch, visible, expected):
    """nvidia-smi lists every GPU; MXNet's gpu(i) is the i-th of CUDA_VISIBLE_DEVICES."""
    every = [doctor_gpus.GPU(i, name, (8, 0)) for i, name in enumerate("ABC")]
    monkeypatch.setattr(doctor_gpus, "_all_gpus", lambda: (every, "nvidia-smi"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [(g.index, g.name) for g in doctor_gpus.list_gpus()[0]] == expected


def test_no_gpu_is_a_plain_line():
    assert [(r.status, r.check) for r in doctor_gpus.check_gpus([], "no nvidia-smi", None)] == [("info", "gpus")]


def test_a_failing_device_step_is_reported_not_fatal():
    """The per-device step runs in its own process: a GPU step on this CPU-only MXNet fails there, and the doctor
    reports it with the error."""
    results = doctor_gpus.check_amp([doctor_gpus.GPU(0, "test GPU", (8, 0))], "resnet18_v1b", timeout=300)
    assert [(r.status, r.check) for r in results] == [("failure", "amp gpu 0")]
    assert "training step failed" in results[0].detail and "exit" in results[0].detail


# ------------------------------------------------------------------------------------------------ gpu_settings
def test_nothing_changes_on_a_cpu():
    env = {}
    assert gpu_settings.settings_for("cpu", env) == {}
    assert gpu_settings.apply("cpu", env) == {} and env == {}


def test_gpu_settings_fill_only_what_is_unset():
    env = {"HOROVOD_CYCLE_TIME": "3.5", "PATH": "/bin"}
    choices = gpu_settings.settings_for("gpu", env)
    assert choices["MXNET_CUDNN_AUTOTUNE_DEFAULT"] == ("0", choices["MXNET_CUDNN_AUTOTUNE_DEFAULT"].source, True, "")
    assert not choices["HOROVOD_CYCLE_TIME"].applied and "3.5" in choices["HOROVOD_CYCLE_TIME"].reason
    applied = gpu_settings.apply("gpu", env)
    assert env["HOROVOD_CYCLE_TIME"] == "3.5"  # the user's value stays
    assert "HOROVOD_CYCLE_TIME" not in applied
    assert applied == {name: env[name] for name in applied}
    assert applied["HOROVOD_FUSION_THRESHOLD"] == "67108864" and applied["MXNET_ENABLE_CUDA_GRAPHS"] == "1"
    assert gpu_settings.apply("gpu", env) == {}  # a second call changes nothing


def test_every_gpu_setting_cites_a_source():
    for s in gpu_settings.GPU_SETTINGS:
        assert "line" in s.source and ("/" in s.source), s


@pytest.mark.parametrize("autotune, tuned_by_horovod", [("1", True), ("0", False), ("yes", False)])
def test_horovod_autotune_keeps_fusion_and_cycle_free(autotune, tuned_by_horovod):
    choices = gpu_settings.settings_for("gpu", {"HOROVOD_AUTOTUNE": autotune})
    for name in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME"):
        assert choices[name].applied is not tuned_by_horovod
    assert choices["MXNET_CUDNN_AUTOTUNE_DEFAULT"].applied


def test_unknown_device_kind_is_refused():
    with pytest.raises(ValueError, match="'tpu' is not one of cpu, gpu"):
        gpu_settings.settings_for("tpu", {})


def test_device_kind_before_import(tmp_path):
    assert gpu_settings.device_kind_before_import(None, str(tmp_path)) == "cpu"
    (tmp_path / "nvidiactl").touch()
    assert gpu_settings.device_kind_before_import(None, str(tmp_path)) == "cpu"
    (tmp_path / "nvidia0").touch()
    assert gpu_settings.device_kind_before_import(None, str(tmp_path)) == "gpu"
    assert gpu_settings.device_kind_before_import("cpu", str(tmp_path)) == "cpu"
