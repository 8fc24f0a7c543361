"""The trainer when things go wrong: divergence under horovodrun, a full disk, a second trainer, leftovers of a
killed run, retention of checkpoints, and which resumes reproduce the uninterrupted run exactly."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TWO_PHASES, metrics, run_tool, train_cmd, write_recipe
from gluon_imagenet import checkpoint, locks
from gluon_imagenet.recipe import load_recipe
from gluon_imagenet.schedule import lr_at, make_plan

HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def digest_of(stdout):
    found = re.findall(r"finished at step \d+, parameter digest (\w+)", stdout)
    assert found, stdout[-2000:]
    return found[0]


def diverging_recipe(tmp_path, reference_workers=1):
    recipe = json.loads(json.dumps(TWO_PHASES))
    recipe["reference_workers"] = reference_workers
    recipe["phases"][0]["lr"] = [0.05, 0.05]
    recipe["phases"][1].update(lr=[1.0e6, 1.0e6], lr_method="linear")
    return write_recipe(str(tmp_path), recipe)


@pytest.mark.slow
def test_divergence_under_horovod_stops_every_rank_with_exit_3(packed_root, tmp_path):
    run_dir = str(tmp_path / "run")
    start = time.time()
    proc = subprocess.run([HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
                           *train_cmd(diverging_recipe(tmp_path, 2), packed_root, run_dir, "--nan-patience", "3",
                                      "--log-every", "4")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Exit code: 3" in output, output[-3000:]  # horovodrun names the first rank to exit, with its code
    assert "error: the loss was not finite for 4 consecutive steps" in output  # rank 0
    assert "rank 1: stopping: the loss diverged" in output  # rank 1 decided with it, instead of waiting
    assert re.findall(r"Process \d exit with status code (-?\d+)", output) in (["3"], ["3", "3"])
    # 240 images, 2 ranks of 16: 8 steps per epoch; phase 1 ends at step 24, its checkpoints stay.
    assert [c.step for c in checkpoint.scan(run_dir)[0]] == [8, 16, 24]
    assert time.time() - start < 300


def test_a_second_trainer_on_a_run_dir_in_use_is_refused(packed_root, tmp_path):
    run_dir = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, *train_cmd(write_recipe(str(tmp_path)), packed_root, run_dir)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(run_dir, "run.json")):
            time.sleep(0.1)
        second = run_tool(train_cmd(write_recipe(str(tmp_path)), packed_root, run_dir, "--resume"))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run dir {run_dir!r} is in use by pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_leftovers_of_a_run_killed_before_its_first_checkpoint_are_dropped(packed_root, tmp_path):
    one_epoch = dict(TWO_PHASES, eval_data_dir="72", phases=[dict(TWO_PHASES["phases"][0], epochs=[0, 1])])
    recipe = write_recipe(str(tmp_path), one_epoch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What a run of another recipe, killed at step 5, leaves: log lines and no checkpoint; the last line torn.
    lines = [json.dumps({"time": 1.0, "step": s, "epoch": 0, "phase": 0, "lr": 9.0, "loss": 1.0}) for s in range(6)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"time": 1.0, "st')
    proc = run_tool(train_cmd(recipe, packed_root, str(run_dir), "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 1 damaged line" in proc.stderr
    plan = make_plan(load_recipe(recipe), train_images=240, workers=1)  # 15 steps, none of them left over
    assert [(m["step"], m["lr"]) for m in metrics(run_dir)] == [(s, lr_at(plan, s)) for s in range(15)]


def test_full_disk_while_saving_stops_cleanly(packed_root, tmp_path):
    # RLIMIT_FSIZE makes every write past 1 MB fail like a full disk (EFBIG; Python ignores SIGXFSZ).
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run_dir = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, *train_cmd(write_recipe(str(tmp_path)), packed_root, run_dir)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "error: could not write checkpoint step 15" in proc.stderr and "Traceback" not in proc.stderr
    assert "free space or fix the folder, then --resume" in proc.stderr
    assert not [n for n in os.listdir(run_dir) if n.startswith("ckpt-") and not n.endswith(".partial")]


def test_the_trainer_does_not_need_validation_data(single_run, packed_root, tmp_path):
    recipe, _, _ = single_run
    root = str(tmp_path / "rec")
    shutil.copytree(packed_root, root)
    for size in ("40", "72"):
        os.remove(os.path.join(root, size, "val.rec"))
    proc = run_tool(train_cmd(recipe, root, str(tmp_path / "run"), "--io-only", "--bench-steps", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def checkpointed_run(single_run, packed_root, tmp_path_factory):
    """The single run again, checkpointing every 4 steps and keeping the newest 3 of those."""
    recipe, _, reference_out = single_run
    run_dir = str(tmp_path_factory.mktemp("every4") / "run")
    proc = run_tool(train_cmd(recipe, packed_root, run_dir, "--save-every-steps", "4", "--keep-mid-epoch", "3"),
                    timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert digest_of(proc.stdout) == digest_of(reference_out)  # checkpointing more often changes nothing
    return run_dir


@pytest.mark.slow
def test_mid_epoch_checkpoints_are_pruned_epoch_ones_kept(checkpointed_run):
    # Epochs end at 15, 30, 45, 75, 105 (all kept, for the sweep); of the mid-epoch ones (multiples of 4) only the
    # newest 3 stay.
    assert [c.step for c in checkpoint.scan(checkpointed_run)[0]] == [15, 30, 45, 75, 96, 100, 104, 105]


@pytest.mark.slow
@pytest.mark.parametrize("resume_at, exact", [(45, True), (75, False), (100, False)],
                         ids=["phase boundary", "epoch boundary", "mid-epoch"])
def test_which_resumes_reproduce_the_uninterrupted_run(single_run, checkpointed_run, packed_root, tmp_path,
                                                       resume_at, exact):
    """What docs/run-folder.md says: a resume at a phase boundary replays the uninterrupted run exactly; one inside a
    phase continues the schedule exactly (steps, lr, epochs, phases) with a new order of images."""
    recipe, reference_dir, reference_out = single_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(checkpointed_run, run_dir)
    for name in os.listdir(run_dir):
        if name.startswith("ckpt-") and int(name[5:13]) > resume_at:
            os.remove(os.path.join(run_dir, name))
    resumed = run_tool(train_cmd(recipe, packed_root, run_dir, "--resume"), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from ckpt-{resume_at:08d}" in resumed.stdout
    assert [(m["step"], m["lr"], m["epoch"], m["phase"]) for m in metrics(run_dir)] == \
        [(m["step"], m["lr"], m["epoch"], m["phase"]) for m in metrics(reference_dir)]
    assert (digest_of(resumed.stdout) == digest_of(reference_out)) == exact


def test_damaged_packed_data_is_refused_before_training(packed_root, tmp_path):
    root = str(tmp_path / "rec")
    shutil.copytree(packed_root, root)
    rec = os.path.join(root, "72", "train.rec")
    with open(rec, "r+b") as f:  # what a copy cut short leaves; MXNet's reader would abort on it mid-training
        f.truncate(os.path.getsize(rec) - 500)
    proc = run_tool(train_cmd(write_recipe(str(tmp_path)), root, str(tmp_path / "run")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "packed data '72' is damaged" in proc.stderr and "pack it again" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


MXNET_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # MXNet's own info lines (the iterator's decode threads)


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "train: stopped (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "train: stopped by SIGTERM")])
def test_a_stopped_trainer_ends_at_once_with_one_line(packed_root, tmp_path, signum, code, line):
    run_dir = str(tmp_path / "run")
    # Checkpoints every 2 steps: the stop often comes while one is being written.
    proc = subprocess.Popen([sys.executable, *train_cmd(write_recipe(str(tmp_path)), packed_root, run_dir,
                                                        "--save-every-steps", "2", "--keep-mid-epoch", "0")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(metrics(run_dir)) >= 5):
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - start < 10
    assert proc.returncode == code, err[-3000:]
    assert [text for text in err.splitlines() if not MXNET_LOG_LINE.match(text)] == [line]
    assert locks.holder(os.path.join(run_dir, "train.lock")) is None
    assert not [name for name in os.listdir(run_dir) if name.endswith(".partial")]
    good, damaged = checkpoint.scan(run_dir)
    assert damaged == [] and good, os.listdir(run_dir)  # a checkpoint being written is complete or gone


def test_an_interrupted_checkpoint_save_leaves_nothing(tmp_path):
    import mxnet as mx

    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.1, "momentum": 0.9}, kvstore=None)
    with mx.autograd.record():
        loss = net(mx.nd.ones((4, 3))).sum()
    loss.backward()
    trainer.step(4)
    saved = checkpoint.save(str(tmp_path), 1, net, trainer, checkpoint.Record(epoch=1.0))
    assert checkpoint.problem(saved.json_path)[1] == ""
    with pytest.raises(TypeError):  # the record fails to write after .params and .states were renamed in place
        checkpoint.save(str(tmp_path), 2, net, trainer, checkpoint.Record(epoch=object()))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.json", "ckpt-00000001.params", "ckpt-00000001.states"]
    assert [c.step for c in checkpoint.scan(str(tmp_path))[0]] == [1]


@pytest.mark.slow
def test_ctrl_c_to_horovodrun_ends_every_rank_cleanly(packed_root, tmp_path):
    run_dir = str(tmp_path / "run")
    recipe = write_recipe(str(tmp_path), dict(TWO_PHASES, reference_workers=2))
    # A terminal's Ctrl-C reaches horovodrun alone (each rank runs in a session of its own); horovodrun then
    # sends SIGTERM to the ranks.
    proc = subprocess.Popen([HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
                             *train_cmd(recipe, packed_root, run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (
                os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and len(metrics(run_dir)) >= 3):
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 20
    ranks = [text for text in output.splitlines() if re.match(r"\[\d\]<std(err|out)>:", text)]
    assert sorted(t for t in ranks if "stopped" in t) == ["[0]<stderr>:train: stopped by SIGTERM",
                                                          "[1]<stderr>:train: stopped by SIGTERM"], output[-3000:]
    # Neither MXNet's exit hook ("Horovod has been shut down") nor Horovod's background loop (a reset connection)
    # adds a traceback or error after the one line.
    assert not [t for t in ranks if "Traceback" in t or "exception" in t.lower() or "Error" in t], output[-3000:]
    assert locks.holder(os.path.join(run_dir, "train.lock")) is None
