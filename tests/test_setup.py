"""tools/setup.sh decides its wheel cache before it installs anything, and refuses at once without one.

The venv given to setup.sh here is a stand-in in tmp_path: its `python` runs the shared .venv's interpreter for
setup.sh's "is it installed" import check only and fails anything else (a pip install included), so a setup.sh
that went on to install could never touch the shared environment. Its `.installed` stamp is the one setup.sh
computes, so a setup that is not refused finds it up to date and exits at once."""
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

REAL_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
STAMPED = ("setup.cfg", "pyproject.toml", "requirements/constraints.txt", "tools/setup.sh")


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
    proc = setup_sh(installed_venv, HOME=str(tmp_path / "home"))  # HOME/.cache made when missing
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.path.isdir(tmp_path / "home" / ".cache" / "gluon_imagenet" / "wheels")
