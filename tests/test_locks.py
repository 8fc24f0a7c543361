"""locks.py: one holder at a time, the second told who holds it, released however the holder ends."""
import os
import signal
import subprocess
import sys
import time

import pytest

from gluon_imagenet import locks

HOLDER = "import sys, time; from gluon_imagenet import locks\nwith locks.hold(sys.argv[1], 'the thing'):\n" \
         "    print('held', flush=True); time.sleep(60)"


def test_second_holder_is_told_who_holds_it_and_a_killed_holder_releases(tmp_path):
    path = str(tmp_path / "x.lock")
    assert locks.holder(path) is None
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert locks.holder(path)["pid"] == proc.pid
        with pytest.raises(locks.Busy, match=rf"the thing is in use by pid {proc.pid} on "):
            with locks.hold(path, "the thing"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while locks.holder(path) is not None and time.time() < deadline:
        time.sleep(0.05)
    with locks.hold(path, "the thing") as info:  # nothing stale is left behind
        assert info["pid"] == os.getpid() and locks.holder(path)["pid"] == os.getpid()


def test_readers_share_a_lock_and_keep_the_writer_out(tmp_path):
    path = str(tmp_path / "x.lock")
    with locks.share(path, "the data") as first, locks.share(path, "the data") as second:
        assert first == second == ""  # any number of readers at once
        with pytest.raises(locks.Busy, match=rf"the data is in use by pid {os.getpid()} "):
            with locks.hold(path, "the data"):
                pass
    with locks.hold(path, "the data"):  # released with the last reader
        proc = subprocess.run([sys.executable, "-c", "import sys; from gluon_imagenet import locks\n"
                               "with locks.share(sys.argv[1], 'the data') as problem: print(problem)", path],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith(f"the data is being written by pid {os.getpid()} ")


def test_the_packer_refuses_a_data_root_a_trainer_reads(shapes_tree, tmp_path):
    from conftest import ROOT, run_tool, train_cmd, write_recipe, TWO_PHASES

    root = str(tmp_path / "recordio")
    pack = ["tools/im2rec_multi.py", shapes_tree, "--root", root, "--sizes", "40", "--workers", "1"]
    assert run_tool(pack).returncode == 0
    recipe = dict(TWO_PHASES, eval_image_size=32, phases=[dict(TWO_PHASES["phases"][0], epochs=[0, 50])])
    run_dir = str(tmp_path / "run")
    trainer = subprocess.Popen([sys.executable, *train_cmd(write_recipe(str(tmp_path), recipe), root, run_dir)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and time.time() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()
            time.sleep(0.2)
        refused = run_tool(pack + ["--force"])
        assert refused.returncode == 2, refused.stderr
        assert f"in use by pid {trainer.pid} " in refused.stderr
        assert "python -m gluon_imagenet.train --recipe" in refused.stderr  # the holder's command, as typed
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=60)
    assert run_tool(pack + ["--force"]).returncode == 0  # the trainer's end released it
