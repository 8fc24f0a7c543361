"""GLUON_IMAGENET_DEVICE=system set-up, run by tools/setup.sh with .venv's Python (a venv with
--system-site-packages of the interpreter that has MXNet): what the interpreter has is decided by importing it.

    python tools/setup_system.py VENV GEN            # writes GEN/constraints.txt, GEN/requirements.txt
    python tools/setup_system.py VENV GEN --check REPORT   # after pip's dry run: refuse replacing a kept module

Each module the toolkit imports at run time (RUNTIME) is imported in a fresh interpreter; one that imports is
kept, whichever distribution it came from (a container's OpenCV may be opencv-python-headless, or built from
source with no pip metadata at all), and nothing that provides it is installed. Only what is missing is added,
pinned: the interpreter's own distributions at their installed versions, ours at the toolkit's pins. GluonCV,
when it imports, is kept with whatever it has (its 0.10 requirements scipy, pandas, ... are not added: the
toolkit uses only its model zoo); when it does not, it is installed without its requirement on opencv-python
(with --no-deps, its other requirements listed here) when cv2 already imports. Then pip's dry run is checked:
an addition that would install a distribution providing a kept module (numpy, cv2, PIL, mxnet, horovod) would
change what imports now, and is refused (exit 2) with the fix.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from importlib import metadata

# (module the toolkit imports, the requirement that provides it when it does not import). mxnet is checked by
# setup.sh before (the reason for this mode), horovod.mxnet is built by setup.sh when it does not import.
RUNTIME = [("numpy", "numpy"), ("cv2", "opencv-python"), ("PIL", "pillow"), ("yaml", "PyYAML"), ("tqdm", "tqdm"),
           ("psutil", "psutil"), ("matplotlib", "matplotlib"), ("gluoncv.model_zoo", "gluoncv")]
# Distributions that install each kept module: pip adding one of them would put another copy in front of it.
PROVIDERS = {
    "numpy": {"numpy"},
    "cv2": {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"},
    "PIL": {"pillow", "pillow-simd"},
    "mxnet": {"mxnet"},  # and every mxnet-cuXXX variant, see provides()
    "horovod.mxnet": {"horovod"},
}
# GluonCV 0.10's requirements (its metadata), by the module that shows each is there. Installed with --no-deps
# so that its opencv-python requirement does not replace a cv2 that imports.
GLUONCV_NEEDS = [("numpy", "numpy"), ("tqdm", "tqdm"), ("requests", "requests"), ("matplotlib", "matplotlib"),
                 ("portalocker", "portalocker"), ("PIL", "pillow"), ("scipy", "scipy"), ("yacs", "yacs"),
                 ("pandas", "pandas"), ("yaml", "PyYAML"), ("autocfg", "autocfg"), ("cv2", "opencv-python")]
TEST_TOOLS = ["pytest", "pytest-timeout", "vermin"]  # pure Python: `make test` needs them, nothing imports them
BUILD_TOOLS = ["wheel", "cloudpickle", "psutil", "packaging"]  # building Horovod, and its run-time requirements


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def provides(dist: str, module: str) -> bool:
    return key(dist) in PROVIDERS.get(module, set()) or (module == "mxnet" and key(dist).startswith("mxnet"))


_PROBE = """import importlib, json, sys
found = {}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
        found[module] = [True, ""]
    except BaseException as e:  # an import may fail any way (ImportError, OSError of a missing libGL, SystemExit)
        found[module] = [False, (type(e).__name__ + ": " + str(e)).splitlines()[0]]
print(json.dumps(found))
"""


def probe(modules: list[str]) -> dict[str, tuple[bool, str]]:
    """module -> (whether it imports in a fresh interpreter, why not). One interpreter for all (MXNet is imported
    once, not by each of gluoncv, horovod.mxnet, ...); one each if that one dies (an import that crashes)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True)
    if proc.returncode == 0:
        return {m: tuple(v) for m, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    found = {}
    for module in modules:
        one = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True)
        last = (one.stderr.strip().splitlines() or [f"the interpreter died (exit code {one.returncode})"])[-1]
        found[module] = tuple(json.loads(one.stdout)[module]) if one.returncode == 0 else (False, last)
    return found


def interpreter_dists(venv: str) -> dict[str, tuple[str, str]]:
    """normalised name -> (name, version) of the interpreter's own distributions (not those in venv)."""
    installed = {}
    for dist in metadata.distributions():
        name, where = dist.metadata["Name"], os.path.realpath(str(dist.locate_file("")))
        if name and not where.startswith(venv + os.sep) and key(name) not in installed:
            installed[key(name)] = (name, dist.version)
    return installed


def origin(module: str) -> str:
    """Where an importable module comes from, e.g. "cv2 from opencv-python-headless 4.11.0.86"."""
    top = module.split(".")[0]
    owners = metadata.packages_distributions().get(top, [])
    if not owners:
        return f"{top} (no pip distribution)"
    return f"{top} from " + ", ".join(f"{name} {metadata.version(name)}" for name in owners)


def our_pins() -> dict[str, str]:
    """normalised name -> requirement line: setup.cfg's pins and requirements/constraints.txt's (markers kept)."""
    cfg = configparser.ConfigParser()
    cfg.read("setup.cfg")
    lines = (cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines())
    with open("requirements/constraints.txt") as f:
        lines += list(f)
    pins: dict[str, list[str]] = {}
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        name = key(re.split(r"[=<>!~ ;\[]", line, 1)[0])
        pins.setdefault(name, []).append(line)
    # A name pinned per Python version (markers, in constraints.txt) is decided there: only those lines, as they are.
    return {name: "\n".join([l for l in found if ";" in l] or found[-1:]) for name, found in pins.items()}


def plan(importable: dict[str, bool], installed: dict, horovod_missing: bool) -> tuple[list[str], list[str]]:
    """(requirements to install normally, requirements to install with --no-deps), by normalised name."""
    add, no_deps = [], []

    def need(requirement: str, module: str | None = None) -> None:
        there = importable.get(module, False) if module else key(requirement) in installed
        if not there and key(requirement) not in add and key(requirement) not in no_deps:
            add.append(key(requirement))

    for module, requirement in RUNTIME:
        if module == "gluoncv.model_zoo":
            continue
        need(requirement, module)
    if not importable.get("gluoncv.model_zoo", False):
        no_deps.append("gluoncv")
        for module, requirement in GLUONCV_NEEDS:
            need(requirement, module if module in importable else None)
    for requirement in TEST_TOOLS + (BUILD_TOOLS if horovod_missing else []):
        need(requirement, "psutil" if requirement == "psutil" else None)
    return add, no_deps


def replaced(would_install: list[tuple[str, str]], kept: dict[str, str]) -> list[str]:
    """What pip would install that provides a module that imports now: one line each."""
    return [f"{name} {version} would replace the {kept[module]} that imports now"
            for name, version in would_install for module in kept if provides(name, module)]


def write_plan(venv: str, gen: str) -> int:
    installed = interpreter_dists(venv)
    modules = [m for m, _ in RUNTIME] + ["mxnet", "horovod.mxnet", "scipy", "pandas", "requests", "portalocker",
                                         "yacs", "autocfg"]
    found = probe(modules)
    importable, why = {m: ok for m, (ok, _) in found.items()}, {m: reason for m, (_, reason) in found.items()}
    add, no_deps = plan(importable, installed, horovod_missing=not importable["horovod.mxnet"])
    pins = our_pins()
    # The interpreter's own distributions pinned as installed (versions that are not PEP 440, rare local builds,
    # pinned literally with ===), then ours for the rest.
    lines = [f"{n}=={v}" if re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", v) else f"{n}==={v}"
             for n, v in sorted(installed.values(), key=lambda nv: key(nv[0]))]
    lines += [line for name, line in sorted(pins.items()) if name not in installed]
    with open(os.path.join(gen, "constraints.txt"), "w") as f:
        f.write("# generated by tools/setup.sh (system): the interpreter's packages as installed, then our pins\n")
        f.write("\n".join(lines) + "\n")
    for name, requirements in (("requirements.txt", add), ("requirements-no-deps.txt", no_deps)):
        with open(os.path.join(gen, name), "w") as f:
            f.write("".join(f"{r}\n" for r in requirements))
    kept = {m: origin(m) for m in ("mxnet", "horovod.mxnet") + tuple(m for m, _ in RUNTIME) if importable[m]}
    with open(os.path.join(gen, "kept.json"), "w") as f:
        json.dump(kept, f, indent=1)
    print("setup: keeping the interpreter's " + ", ".join(kept.values()))
    for module, _ in RUNTIME:
        if not importable[module]:
            print(f"setup: {module} does not import ({why[module] or 'no message'}): adding it")
    added = add + [f"{r} (--no-deps)" for r in no_deps]
    print("setup: adding " + (", ".join(added) if added else "nothing: every run-time module imports"))
    return 0


def check(gen: str, report_path: str) -> int:
    """After `pip install --dry-run --report`: refuse an addition that would replace a kept module."""
    with open(os.path.join(gen, "kept.json")) as f:
        kept = json.load(f)
    with open(report_path) as f:
        report = json.load(f)
    would = [(item["metadata"]["name"], item["metadata"]["version"]) for item in report.get("install", [])]
    problems = replaced(would, kept)
    if problems:
        print(f"error: {'; '.join(problems)} (pip would install it for the packages being added). Nothing was "
              "installed. Fix: install the missing packages yourself in that interpreter so that they use what it "
              "has (e.g. `pip install --no-deps gluoncv==0.10.5.post0`), or use GLUON_IMAGENET_DEVICE=cpu or gpu",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    venv, gen = (os.path.realpath(p) for p in argv[:2])
    if len(argv) > 3 and argv[2] == "--check":
        return check(gen, argv[3])
    return write_plan(venv, gen)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
