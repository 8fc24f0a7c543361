"""tools/setup.sh decides its wheel cache before it installs anything, and refuses at once without one.

The venv given to setup.sh here is a stand-in in tmp_path: its `python` runs the shared .venv's interpreter for
setup.sh's "is it installed" import check only and fails anything else (a pip install included), so a setup.sh
that went on to install could never touch the shared environment. Its `.installed` stamp is the one setup.sh
computes, so a setup that is not refused finds it up to date and exits at once."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

REAL_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
STAMPED = ("setup.cfg", "pyproject.toml", "requirements/constraints.txt", "tools/setup.sh", "tools/setup_system.py")


@pytest.fixture
def installed_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n"
                      f'[ "$1" = -c ] && [ "$2" = "import horovod.mxnet, mxnet" ] && exec "{REAL_PYTHON}" "$@"\n'
                      'echo "stand-in venv: refusing $*" >&2\nexit 99\n')
    python.chmod(0o755)
    digest = hashlib.sha256(b"".join(open(os.path.join(ROOT, f), "rb").read() for f in STAMPED)).hexdigest()
    (venv / ".installed").write_text(f"cpu {digest[:16]}\n")
    return str(venv)


def setup_sh(venv, **env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("HOME", "XDG_CACHE_HOME", "GLUON_IMAGENET_WHEEL_CACHE", "GLUON_IMAGENET_DEVICE")}
    full.update(GLUON_IMAGENET_VENV=venv, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("home, says", [(None, "HOME is unset"), ("file", "is not writable"),
                                        ("/proc/no-home", "is not writable")])
def test_no_writable_wheel_cache_is_refused_before_any_install(installed_venv, tmp_path, home, says):
    env = {}
    if home == "file":
        (tmp_path / "home").write_text("a file, not a folder\n")
        env["HOME"] = str(tmp_path / "home")
    elif home:
        env["HOME"] = home
    proc = setup_sh(installed_venv, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr and "GLUON_IMAGENET_WHEEL_CACHE=" in proc.stderr
    assert "unbound variable" not in proc.stderr and proc.stdout == ""


def test_an_unwritable_wheel_cache_setting_is_refused_naming_it(installed_venv):
    proc = setup_sh(installed_venv, HOME="/proc/no-home", GLUON_IMAGENET_WHEEL_CACHE="/proc/no-cache")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "GLUON_IMAGENET_WHEEL_CACHE=/proc/no-cache is not a writable folder" in proc.stderr


def test_a_writable_wheel_cache_without_home_sets_up(installed_venv, tmp_path):
    proc = setup_sh(installed_venv, GLUON_IMAGENET_WHEEL_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is up to date" in proc.stdout
    assert os.path.isdir(tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ system mode
SYSTEM_SETUP = os.path.join(ROOT, "tools", "setup_system.py")


def system_setup(*args):
    return subprocess.run([REAL_PYTHON, SYSTEM_SETUP, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_system_setup_keeps_every_module_that_imports_whatever_its_distribution(tmp_path):
    """The shared .venv given as the venv being made: none of its distributions count as the interpreter's own
    (as for a container's OpenCV built from source, or numpy without pip metadata), yet every run-time module
    imports. Decided by importing, nothing of them is added (by distribution name, all would be)."""
    proc = system_setup(os.path.join(ROOT, ".venv"), str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    adding = [name for file in ("requirements.txt", "requirements-no-deps.txt")
              for name in (tmp_path / file).read_text().split()]
    for name in ("numpy", "opencv-python", "gluoncv", "scipy", "pandas", "pillow", "mxnet", "horovod"):
        assert name not in adding, proc.stdout
    keeping = next(line for line in proc.stdout.splitlines() if line.startswith("setup: keeping"))
    for module in ("mxnet", "numpy", "cv2", "horovod", "gluoncv"):
        assert f"{module} from " in keeping
    with open(tmp_path / "kept.json") as f:
        assert {"cv2", "numpy", "mxnet", "horovod.mxnet", "gluoncv.model_zoo"} <= set(json.load(f))


def test_system_plan_adds_gluoncv_without_an_opencv_over_the_kept_cv2():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import setup_system
    finally:
        sys.path.pop(0)
    importable = {m: True for m, _ in setup_system.RUNTIME}
    importable.update({"gluoncv.model_zoo": False, "scipy": False, "pandas": True, "requests": True,
                       "portalocker": False, "yacs": False, "autocfg": False, "horovod.mxnet": True})
    add, no_deps = setup_system.plan(importable, installed={"pytest": ("pytest", "8"), "vermin": ("vermin", "1"),
                                                            "pytest-timeout": ("pytest-timeout", "2")},
                                     horovod_missing=False)
    assert no_deps == ["gluoncv"]
    assert sorted(add) == ["autocfg", "portalocker", "scipy", "yacs"]  # not opencv-python, pandas, numpy, wheel


@pytest.mark.parametrize("would_install, code", [([("opencv-python", "4.11.0.86"), ("scipy", "1.15.3")], 2),
                                                 ([("numpy", "1.26.4")], 2), ([("scipy", "1.15.3")], 0)])
def test_system_setup_refuses_an_addition_that_replaces_a_kept_module(tmp_path, would_install, code):
    (tmp_path / "kept.json").write_text(json.dumps({"cv2": "cv2 from opencv-python-headless 4.11.0.86",
                                                    "numpy": "numpy (no pip distribution)"}))
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in would_install]}  # pip's --report
    (tmp_path / "report.json").write_text(json.dumps(report))
    proc = system_setup(str(tmp_path / "venv"), str(tmp_path), "--check", str(tmp_path / "report.json"))
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code:
        name, version = would_install[0]
        assert proc.stderr.startswith(f"error: {name} {version} would replace the ")
        assert "GLUON_IMAGENET_DEVICE=cpu or gpu" in proc.stderr and "Traceback" not in proc.stderr
