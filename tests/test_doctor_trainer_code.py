"""The doctor runs the trainer's own code (issues 16 and 17): one decode-thread rule, one packed-data check, the
trainer's Learner and checkpoint code, engine variables checked before MXNet starts, a real collective under
horovodrun, and a per-phase memory probe (its CPU reading; the GPU reading cannot run here)."""
import copy
import os
import shutil
import subprocess
import sys
import time

import pytest

import test_pack  # the damage table the packer's tests keep
from conftest import ROOT, TWO_PHASES, run_tool, train_cmd, write_recipe
from gluon_imagenet import devices, engine_env, gpu_settings
from gluon_imagenet.data import packed
from gluon_imagenet.doctor import cli as doctor_cli
from gluon_imagenet.doctor import cluster as doctor_cluster
from gluon_imagenet.doctor import gpus as doctor_gpus
from gluon_imagenet.doctor import storage as doctor_storage
from gluon_imagenet.recipe import load_recipe
from gluon_imagenet.train import memory_probe, probes

SMALL = ["--model", "resnet18_v1b"]
DAMAGES = [test_pack._cut_500, test_pack._cut_to_half, test_pack._append_bytes, test_pack._drop_idx_line,
           test_pack._garble_idx, test_pack._break_middle_magic, test_pack._forget_in_pack_json]


def doctor_cmd(*args, env=None, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "gluon_imagenet.doctor", *SMALL, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def lines_of(stdout, check):
    return [line for line in stdout.splitlines() if line.split()[1:2] == [check]]


# ------------------------------------------------------------------------------------------------ decode threads
def test_trainer_and_doctor_agree_on_decode_threads_under_taskset(packed_root, tmp_path):
    """`taskset -c 0`: one CPU. The trainer sized threads from os.cpu_count() (2 here), the doctor from the mask."""
    script = ("import sys; from gluon_imagenet.train import cli, setup; from gluon_imagenet.dist import Ranks; "
              "args = cli.parse_args(sys.argv[1:]); print('threads', setup.prepare(args, Ranks()).threads)")
    recipe = write_recipe(str(tmp_path))
    trainer = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script, "--recipe", recipe, "--data-root",
                              packed_root, "--io-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert trainer.returncode == 0, trainer.stderr[-2000:]
    assert "threads 1" in trainer.stdout.splitlines(), trainer.stdout
    doc = doctor_cmd("--checks", "threads", prefix=("taskset", "-c", "0"))
    assert lines_of(doc.stdout, "threads")[0].split()[2:4] == ["1", "decode"], doc.stdout
    assert "1 CPU(s) in the affinity mask" in doc.stdout


def _cgroup(tmp_path, v2=None, v1=None):
    root = tmp_path / "cgroup"
    if v2 is not None:
        (root / "kube" / "pod").mkdir(parents=True)
        (root / "kube" / "pod" / "cpu.max").write_text(v2)
    if v1 is not None:
        (root / "cpu").mkdir(parents=True)
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kube/pod\n" if v2 is not None else "4:cpu,cpuacct:/\n")
    return {"cgroup_root": str(root), "proc_cgroup": str(proc)}


@pytest.mark.parametrize("v2, v1, ranks, threads, cpus", [
    ("150000 100000\n", None, 1, 1, 1),  # 1.5 CPUs of quota on a 16-CPU mask: one thread, not 8
    ("max 100000\n", None, 1, 8, 16),  # no quota: the mask (16), capped by ImageRecordIter at 8
    (None, ("400000", "100000"), 2, 2, 4),  # cgroup v1: 4 CPUs for 2 ranks
    (None, ("-1", "100000"), 4, 4, 16),  # v1 without a quota
])
def test_the_cgroup_quota_bounds_decode_threads(tmp_path, v2, v1, ranks, threads, cpus):
    decode = devices.decode_threads(ranks, affinity=16, **_cgroup(tmp_path, v2, v1))
    assert (decode.threads, decode.cpus) == (threads, cpus), decode


def test_image_record_iters_cap_binds_and_is_said(tmp_path):
    where = _cgroup(tmp_path, "max 100000\n")
    decode = devices.decode_threads(1, affinity=8, **where)
    assert decode.threads == 4 and decode.capped and "ImageRecordIter starts at most 4" in str(decode)
    asked = devices.decode_threads(1, requested=6, affinity=8, **where)
    assert asked.threads == 4 and asked.capped
    assert not devices.decode_threads(2, affinity=8, **where).capped
    warning = doctor_cluster.check_threads(1, 6, 8)[0]
    assert warning.status == "warning" and warning.fix.startswith("--threads 4")


# ------------------------------------------------------------------------------------------------ engine variables
@pytest.mark.parametrize("name, value, says", [
    ("MXNET_CPU_WORKER_NTHREADS", "0", "needs at least 1"),  # hung the trainer holding train.lock
    ("MXNET_CPU_WORKER_NTHREADS", "abc", "not a whole number"),  # aborted the doctor, exit 134
    ("MXNET_ENGINE_TYPE", "Bogus", "not an MXNet engine"),  # a traceback
])
@pytest.mark.parametrize("tool", ["train", "doctor"])
def test_engine_variables_are_refused_before_mxnet_starts(packed_root, tmp_path, name, value, says, tool):
    env = dict(os.environ, **{name: value})
    if tool == "train":
        args = [sys.executable, *train_cmd(write_recipe(str(tmp_path)), packed_root, str(tmp_path / "run"))]
    else:
        args = [sys.executable, "-m", "gluon_imagenet.doctor", *SMALL, "--checks", "amp"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {name}={value!r}") and says in proc.stderr
    assert not os.path.exists(tmp_path / "run")  # nothing written, no lock taken


def test_engine_values_mxnet_accepts_pass():
    assert engine_env.problems({"MXNET_CPU_WORKER_NTHREADS": " 2", "MXNET_ENGINE_TYPE": "NaiveEngine",
                                "MXNET_GPU_COPY_NTHREADS": "", "MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_FWD": "0"}) == []
    assert len(engine_env.problems({"MXNET_GPU_COPY_NTHREADS": "-1", "MXNET_ENGINE_TYPE": ""})) == 2


def test_a_probe_that_reports_an_error_and_hangs_is_reported_at_once(monkeypatch):
    """MXNET_CPU_WORKER_NTHREADS=0 (past the command line's check): MXNet prints `Check failed` and waits forever.
    The doctor used to wait out the whole timeout and then blame a hung GPU on a machine without one."""
    monkeypatch.setenv("MXNET_CPU_WORKER_NTHREADS", "0")
    monkeypatch.setattr(probes, "STUCK_AFTER_ERROR_SECONDS", 2.0)
    start = time.monotonic()
    results = doctor_gpus.check_amp([], "resnet18_v1b", timeout=120)
    failure = [r for r in results if r.status == "failure"]
    assert time.monotonic() - start < 60
    assert len(failure) == 1 and "Check failed" in failure[0].detail, results
    assert "GPU" not in failure[0].fix


# ------------------------------------------------------------------------------------------------ trainer's code
def test_the_step_probe_is_learner_step_and_checkpoints_round_trip():
    result = probes.training_step_probe("cpu", "resnet18_v1b", amp=False)
    assert result["finite"] and result["checkpoint"] == "", result
    assert result["compared"]["parameters"] > 0 and result["compared"]["optimizer_states"] > 0
    # The comparison can fail: a fresh Learner that loaded nothing differs from one that trained.
    trained = probes.make_learner("resnet18_v1b", 10, devices.Device("cpu"), None, 32)
    trained.step(*probes.random_batch(4, 32, 10), 0.01).asscalar()
    untouched = probes.make_learner("resnet18_v1b", 10, devices.Device("cpu"), None, 32)
    assert probes.compare_learners(trained, untouched) != ""


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_doctor_and_trainer_agree_on_damaged_packed_data(packed_root, tmp_path, damage):
    root = tmp_path / "rec"
    shutil.copytree(packed_root, root)
    damage(str(root / "40"))
    recipe_path = write_recipe(str(tmp_path))
    trainer_problems = packed.check_for(load_recipe(recipe_path), str(root))
    results, _ = doctor_storage.check_data(recipe_path, str(root))
    doctor_failed = any(r.status == "failure" for r in results)
    assert doctor_failed == bool(trainer_problems), (trainer_problems, results)
    if damage is test_pack._cut_500:
        assert trainer_problems and doctor_failed and "cut short" in results[0].detail


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__.strip("_"))
def test_recipe_show_and_trainer_agree_on_damaged_packed_data(packed_root, tmp_path, damage):
    """`recipe show --data-root` makes the trainer's check: it refuses what the trainer refuses, with the same
    words, and passes what the trainer passes (the damage is to a train split: the val split it adds is intact)."""
    root = tmp_path / "rec"
    shutil.copytree(packed_root, root)
    damage(str(root / "40"))
    recipe_path = write_recipe(str(tmp_path))
    trainer_problems = packed.check_for(load_recipe(recipe_path), str(root))
    proc = run_tool(["-m", "gluon_imagenet.recipe", "show", recipe_path, "--workers", "1", "--data-root", str(root)],
                    timeout=120)
    if trainer_problems:
        assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == "error: " + "; ".join(map(str, trainer_problems))
    else:
        assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)
    if damage is test_pack._cut_500:
        assert proc.returncode == 2 and "packed data '40' is damaged" in proc.stderr and "cut short" in proc.stderr


def test_a_rec_cut_by_500_bytes_fails_the_doctor(packed_root, tmp_path):
    """It passed `doctor --checks data` (only the first record was read) while the trainer refused it."""
    root = tmp_path / "rec"
    shutil.copytree(packed_root, root)
    test_pack.cut_tail(root / "72" / "train.rec")
    proc = doctor_cmd("--checks", "data", "--recipe", write_recipe(str(tmp_path)), "--data-root", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "packed data '72' is damaged" in proc.stdout and "cut short" in proc.stdout


# ------------------------------------------------------------------------------------------------ run dir, messages
@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_unwritable_run_dir_fails(tmp_path, where):
    (tmp_path / "plain").write_text("not a folder")
    run_dir = tmp_path / "plain" if where == "file" else tmp_path / "plain" / "run"
    proc = doctor_cmd("--checks", "disk", "--recipe", write_recipe(str(tmp_path)), "--run-dir", str(run_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines_of(proc.stdout, "run")[0].startswith("FAILURE"), proc.stdout


def test_a_run_dir_on_a_read_only_file_system_fails(tmp_path):
    """A read-only tmpfs mounted in a private mount namespace (needs root and unshare; skipped where refused)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs "
                                                      f"{mount}"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    doctor_line = " ".join([sys.executable, "-m", "gluon_imagenet.doctor", *SMALL, "--checks", "disk", "--recipe",
                            write_recipe(str(tmp_path)), "--run-dir", str(mount / "run")])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {mount} && {doctor_line}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failure = lines_of(proc.stdout, "run")[0]
    assert failure.startswith("FAILURE") and "Read-only file system" in failure, proc.stdout


def test_a_writable_run_dir_gets_a_probe_file_and_keeps_nothing(tmp_path):
    (tmp_path / "runs").mkdir()
    assert [r.status for r in doctor_storage.check_run_dir(str(tmp_path / "runs" / "new"))] == ["ok"]
    assert os.listdir(tmp_path / "runs") == []


@pytest.mark.parametrize("case", ["unknown field", "missing file"])
def test_a_bad_recipe_is_one_failure_with_the_right_fix(packed_root, tmp_path, case):
    if case == "unknown field":
        recipe = write_recipe(str(tmp_path), dict(copy.deepcopy(TWO_PHASES), batch_sise=3))
    else:
        recipe = str(tmp_path / "no-such.yaml")
    proc = doctor_cmd("--checks", "data,disk", "--recipe", recipe, "--data-root", packed_root, "--run-dir",
                      str(tmp_path / "run"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAILURE")]
    assert len(failures) == 1 and failures[0].split()[1] == "recipe", proc.stdout
    assert "pack the data" not in proc.stdout and "give --recipe and --run-dir" not in proc.stdout
    assert "fix: give the path of a recipe file" in proc.stdout if case == "missing file" else \
        "fix: fix that field of the recipe" in proc.stdout
    assert "not checked: the recipe did not load" in proc.stdout


# ------------------------------------------------------------------------------------------------ memory probe
def test_the_largest_fitting_batch_is_found_by_trying_smaller_ones():
    """The search alone, over a peak that grows with the batch (the real probes: test_doctor's whole run reads
    each phase's peak, and the trainer's refusal below)."""
    tried = []

    def peak_of(probe):
        tried.append(probe.batch_size)
        return 1000 + 100 * probe.batch_size, ""

    probe = memory_probe.Probe("resnet18_v1b", 10, "cpu", None, 64, 32, 0.9, 1e-4, 0.0)
    fit = memory_probe.fit_phase(3, probe, budget=1000 + 100 * 37, budget_source="test", peak_of=peak_of,
                                 bisection_probes=8)
    assert not fit.fits and fit.largest_fitting == 37 and tried[:2] == [64, 1]
    assert "phase 3 (batch_size 64" in fit.message() and "batch_size 37 does" in fit.message()
    none = memory_probe.fit_phase(1, probe, budget=500, budget_source="test", peak_of=peak_of)
    assert none.largest_fitting is None and "not even batch_size 1" in none.message()


def test_a_resumed_run_probes_only_the_phases_still_to_train():
    from gluon_imagenet.recipe import recipe_from_dict
    from gluon_imagenet.schedule import make_plan

    plan = make_plan(recipe_from_dict(copy.deepcopy(TWO_PHASES)), 240, 1)
    first_end = plan.phases[0].end_step
    numbers = lambda done: [n for n, _ in memory_probe.untrained_phases(plan, done)]  # noqa: E731
    assert numbers(0) == [1, 2] and numbers(first_end - 1) == [1, 2]
    assert numbers(first_end) == [2] and numbers(plan.total_steps) == []


def test_the_trainer_refuses_a_phase_that_will_not_fit_before_training(packed_root, tmp_path):
    """The real probe against a budget below what MXNet itself needs: nothing fits, refused at start."""
    env = dict(os.environ, **{memory_probe.BUDGET_VARIABLE: "64M"})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, *train_cmd(write_recipe(str(tmp_path)), packed_root, str(run_dir),
                                                      "--memory-check")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: phase 1 (batch_size 16 at 32 px) needs" in proc.stderr and "not even batch_size 1" in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("ckpt-*"))


# ------------------------------------------------------------------------------------------------ horovod
@pytest.mark.slow  # two ranks under horovodrun
def test_collectives_run_under_horovodrun(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-m",
                           "gluon_imagenet.doctor", *SMALL, "--checks", "horovod"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if " collectives " in line]
    assert len(line) == 1 and "ok       collectives" in line[0] and "across 2 ranks" in line[0] and "Gloo" in line[0]


def test_without_horovodrun_the_collectives_are_not_claimed():
    results = doctor_cli.run_checks(doctor_cli.parse_args([*SMALL, "--checks", "horovod"]))
    assert [r.status for r in results if r.check == "collectives"] == ["info"]


def test_horovods_async_gpu_engine_variable_is_set_on_gpus():
    """Horovod 0.28.1 reads MXNET_ASYNC_GPU_ENGINE (horovod/mxnet/mpi_ops.cc); the module said nothing did."""
    choice = gpu_settings.settings_for("gpu", {})["MXNET_ASYNC_GPU_ENGINE"]
    assert choice.applied and choice.value == "1" and "mpi_ops.cc" in choice.source
    assert "MXNET_ASYNC_GPU_ENGINE, MXNET_HOROVOD_NUM_GROUPS" not in gpu_settings.__doc__
