"""The code runs on Python 3.10 (NVIDIA's MXNet containers ship it): a static minimum-version check over every
Python file of the project, with the real checker (vermin, pinned in setup.cfg's test extra)."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TARGET = "3.10"
FOLDERS = ("gluon_imagenet", "tools", "bench", "tests")
PYTHON310 = os.path.expanduser("~/.pyenv/versions/3.10.13/bin/python3.10")


def vermin(*args, cwd=ROOT):
    """The vermin command line, run by this interpreter (its console script may not be on PATH)."""
    try:
        import vermin as _  # noqa: F401
    except ImportError:
        pytest.fail("vermin is not installed: it is in setup.cfg's test extra (pip install vermin==1.9.2); "
                    "run `make setup`")
    # --eval-annotations: `str | None` in an annotation counts (3.10) although `from __future__ import
    # annotations` would hide it; --violations lists only what needs more than the target.
    cmd = [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())", f"-t={TARGET}-",
           "--no-tips", "--violations", "--eval-annotations", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_project_needs_at_most_python_310():
    proc = vermin(*FOLDERS)
    assert proc.returncode == 0, ("code that needs a newer Python than " + TARGET + " (fix it, the project must run "
                                  "on NVIDIA's Python 3.10 containers):\n" + proc.stdout + proc.stderr)
    # The checker really looked at the files: it reports how many it analysed.
    count = sum(len(glob.glob(os.path.join(ROOT, f, "**", "*.py"), recursive=True)) for f in FOLDERS)
    assert f"Analyzing {count} files" in proc.stdout, proc.stdout


@pytest.mark.parametrize("code, needs", [
    ("import tomllib\n", "'tomllib' module requires !2, 3.11"),
    pytest.param("try:\n    pass\nexcept* ValueError:\n    pass\n", "`except*` requires !2, 3.11",
                 marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="vermin parses with the running Python: "
                                          "on 3.10 it cannot read this syntax, the 3.10 parser test below catches it")),
    ("import datetime\nprint(datetime.UTC)\n", "'datetime.UTC' member requires !2, 3.11"),
    ("from typing import Self\n", "'typing.Self' member requires !2, 3.11"),
])
def test_check_fails_on_311_only_code(tmp_path, code, needs):
    (tmp_path / "new.py").write_text(code)
    proc = vermin(str(tmp_path), cwd=str(tmp_path))
    assert proc.returncode != 0
    assert needs in proc.stdout, proc.stdout


def parse_with_python310(files):
    code = "import ast, sys\nfor path in sys.argv[1:]:\n    ast.parse(open(path).read(), path)\n"
    return subprocess.run([PYTHON310, "-c", code, *files], capture_output=True, text=True, timeout=120)


needs_python310 = pytest.mark.skipif(not os.path.exists(PYTHON310), reason=f"no Python 3.10 at {PYTHON310}")


@needs_python310
def test_python310_parses_every_file():
    """What the static check cannot see in syntax (when it runs on 3.10 itself), the real 3.10 parser does."""
    files = sorted(f for folder in FOLDERS for f in glob.glob(os.path.join(ROOT, folder, "**", "*.py"),
                                                               recursive=True))
    proc = parse_with_python310(files)
    assert proc.returncode == 0, proc.stderr


@needs_python310
def test_python310_parser_refuses_311_syntax(tmp_path):
    (tmp_path / "new.py").write_text("try:\n    pass\nexcept* ValueError:\n    pass\n")
    proc = parse_with_python310([str(tmp_path / "new.py")])
    assert proc.returncode != 0 and "SyntaxError" in proc.stderr


# ------------------------------------------------------------------------------------------------ tools/setup.sh
def setup_sh(tmp_path, **env):
    """tools/setup.sh with its venv in tmp_path: .venv is never touched."""
    full = dict(os.environ, GLUON_IMAGENET_VENV=str(tmp_path / "venv"), **env)
    return subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=120)


def test_setup_refuses_an_unknown_device(tmp_path):
    proc = setup_sh(tmp_path, GLUON_IMAGENET_DEVICE="tpu")
    assert proc.returncode == 2 and "GLUON_IMAGENET_DEVICE=tpu: use cpu, gpu or system" in proc.stderr


@pytest.mark.skipif(not os.path.exists(PYTHON310), reason=f"no Python 3.10 at {PYTHON310}")
def test_system_setup_needs_an_interpreter_with_mxnet(tmp_path):
    proc = setup_sh(tmp_path, GLUON_IMAGENET_DEVICE="system", PYTHON=PYTHON310)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"needs a Python that imports mxnet, and {PYTHON310} does not" in proc.stderr
    assert "GLUON_IMAGENET_DEVICE=cpu or gpu" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_system_setup_refuses_a_venv_python(tmp_path):
    """A venv made from a venv's Python would not see that venv's packages (its MXNet): refused, nothing made."""
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    proc = setup_sh(tmp_path, GLUON_IMAGENET_DEVICE="system", PYTHON=venv_python)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is a virtual environment's Python" in proc.stderr
    assert not (tmp_path / "venv").exists()
