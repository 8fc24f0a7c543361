#!/usr/bin/env bash
# Creates .venv in the repository and installs everything gluon_imagenet needs, idempotently:
#   1. every pinned dependency in one pip command (setup.cfg + requirements/constraints.txt),
#   2. Horovod 0.28.1 with MXNet + Gloo, built once into a wheel cache outside the repository
#      (keyed on Python version, MXNet variant and version) and installed from that cache afterwards.
# A second run with nothing changed takes a few seconds.
#
#   bash tools/setup.sh                                # CPU (default)
#   GLUON_IMAGENET_DEVICE=gpu bash tools/setup.sh      # GPU: mxnet-cu117, Horovod with NCCL (needs CUDA 11.7, NCCL)
#   GLUON_IMAGENET_DEVICE=system bash tools/setup.sh   # an interpreter that already has MXNet (NVIDIA's container)
#
# system: keeps every run-time module that imports in that interpreter (mxnet, numpy, cv2, horovod.mxnet, gluoncv,
# ...: decided by importing them, not by distribution name; see tools/setup_system.py) and installs only what is
# missing, pinned; an addition that would replace a kept module is refused (exit 2). .venv is a venv made with
# --system-site-packages from that interpreter, so:
#   - the interpreter's site-packages are only read, never written: `rm -rf .venv` undoes the set-up entirely,
#     and the container's MXNet build (the one with Hopper code) is what runs;
#   - pip installs into .venv under a generated constraints file that pins every package the interpreter has at
#     its installed version: nothing is upgraded or downgraded; a pin that cannot fit fails the set-up instead;
#   - every command stays `.venv/bin/python ...` (or `source .venv/bin/activate`), as in the other modes.
# Horovod is built (as in the other modes) only when the interpreter has none.
#
# Environment: PYTHON (cpu/gpu: default python3.11 or python3; system: default the first of python3, python that
# imports mxnet), GLUON_IMAGENET_VENV (default .venv), GLUON_IMAGENET_WHEEL_CACHE (default
# $XDG_CACHE_HOME/gluon_imagenet/wheels, else ~/.cache/gluon_imagenet/wheels: it must be writable, which is
# checked before anything is installed).
set -euo pipefail
cd "$(dirname "$0")/.."

device=${GLUON_IMAGENET_DEVICE:-cpu}
case "$device" in
  cpu|gpu|system) ;;
  *) echo "error: GLUON_IMAGENET_DEVICE=$device: use cpu, gpu or system" >&2; exit 2 ;;
esac
venv=${GLUON_IMAGENET_VENV:-.venv}
horovod_version=0.28.1
mxnet_version=1.9.1

if [ "$device" = system ]; then
  python=${PYTHON:-}
  if [ -z "$python" ]; then
    for candidate in python3 python; do
      if command -v "$candidate" >/dev/null && "$candidate" -c 'import mxnet' 2>/dev/null; then
        python=$(command -v "$candidate"); break
      fi
    done
  fi
  if [ -z "$python" ] || ! "$python" -c 'import mxnet' 2>/dev/null; then
    echo "error: GLUON_IMAGENET_DEVICE=system needs a Python that imports mxnet, and ${python:-neither python3 nor" \
         "python} does not: set PYTHON=/path/to/python, or use GLUON_IMAGENET_DEVICE=cpu or gpu to install pip's MXNet" >&2
    exit 2
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
    echo "error: $python is a virtual environment's Python: a venv made from it would not see its packages; set" \
         "PYTHON to the interpreter that environment was made from, or install into it with GLUON_IMAGENET_DEVICE=cpu" >&2
    exit 2
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 11)))'; then
    echo "error: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); the" \
         "toolkit runs on Python 3.10 or 3.11: set PYTHON=/path/to/python3.10" >&2
    exit 2
  fi
  # A new container release (another MXNet, numpy or Horovod) must redo the set-up.
  system_versions=$("$python" -c 'import importlib, sys
def v(m):
    try:
        return importlib.import_module(m).__version__
    except Exception:
        return "none"
print(sys.executable, *(m + "=" + v(m) for m in ("mxnet", "numpy", "horovod")))')
else
  python=${PYTHON:-$(command -v python3.11 || command -v python3)}
  if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); MXNet 1.9.1" \
         "and these pins need Python 3.11: set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  system_versions=""
fi

# The wheel cache is decided before anything else (before the up-to-date check too, so that the answer does not
# depend on the state of .venv): a build of Horovod must be able to land in it, and finding out after the whole
# install (an unset HOME, `HOME: unbound variable`) wastes it. GLUON_IMAGENET_WHEEL_CACHE, when set, is used as
# given; else the first writable of $XDG_CACHE_HOME/gluon_imagenet/wheels and $HOME/.cache/gluon_imagenet/wheels.
# An interpreter with its own Horovod (system mode) builds nothing and needs none.
writable_dir() { mkdir -p "$1" 2>/dev/null && : > "$1/.probe.$$" 2>/dev/null && rm -f "$1/.probe.$$"; }
wheel_cache=""
if [ "$device" = system ] && "$python" -c 'import horovod.mxnet' 2>/dev/null; then
  :
elif [ -n "${GLUON_IMAGENET_WHEEL_CACHE:-}" ]; then
  if ! writable_dir "$GLUON_IMAGENET_WHEEL_CACHE"; then
    echo "error: GLUON_IMAGENET_WHEEL_CACHE=$GLUON_IMAGENET_WHEEL_CACHE is not a writable folder (Horovod's wheel is" \
         "built into it): set GLUON_IMAGENET_WHEEL_CACHE to a folder you can write" >&2
    exit 2
  fi
  wheel_cache=$GLUON_IMAGENET_WHEEL_CACHE
else
  for candidate in ${XDG_CACHE_HOME:+"$XDG_CACHE_HOME/gluon_imagenet/wheels"} \
                   ${HOME:+"$HOME/.cache/gluon_imagenet/wheels"}; do
    if writable_dir "$candidate"; then wheel_cache=$candidate; break; fi
  done
  if [ -z "$wheel_cache" ]; then
    if [ -n "${HOME:-}" ]; then tried="HOME=$HOME is not writable"; else tried="HOME is unset"; fi
    [ -z "${XDG_CACHE_HOME:-}" ] || tried="$tried and XDG_CACHE_HOME=$XDG_CACHE_HOME is not writable either"
    echo "error: no writable folder for the wheel cache (Horovod is built into it once): $tried; set" \
         "GLUON_IMAGENET_WHEEL_CACHE=/a/writable/folder" >&2
    exit 2
  fi
fi

stamp="$device $(cat setup.cfg pyproject.toml requirements/constraints.txt tools/setup.sh tools/setup_system.py \
                  | sha256sum | cut -c1-16)"
[ -z "$system_versions" ] || stamp="$stamp $system_versions"
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$stamp" ] \
   && "$venv/bin/python" -c 'import horovod.mxnet, mxnet' 2>/dev/null; then
  echo "setup: $venv is up to date ($device)"
  exit 0
fi

echo "setup: creating $venv ($device) with $python"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [ "$device" = system ]; then
  if [ -f "$venv/pyvenv.cfg" ] && ! grep -q '^include-system-site-packages = true' "$venv/pyvenv.cfg"; then
    echo "error: $venv exists and does not see $python's packages (made by GLUON_IMAGENET_DEVICE=cpu or gpu?):" \
         "remove it (rm -rf $venv) or set GLUON_IMAGENET_VENV to another folder" >&2
    exit 2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    # Without python3-venv's ensurepip (Debian/Ubuntu images), the venv uses the interpreter's own pip.
    "$python" -m venv --system-site-packages "$venv" 2>/dev/null \
      || { rm -rf "$venv"; "$python" -m venv --system-site-packages --without-pip "$venv"; }
  fi
  gen="$venv/.setup"
  mkdir -p "$gen"
  # What imports in the interpreter is kept, whatever distribution it came from; what is missing is added, its
  # interpreter's own distributions pinned as installed (tools/setup_system.py says which and why).
  rm -f "$gen"/requirements*.txt "$gen/report.json"
  "$venv/bin/python" tools/setup_system.py "$venv" "$gen"
  if [ -s "$gen/requirements.txt" ]; then
    # pip's dry run first: an addition that would replace a module that imports now (a numpy, or an OpenCV that
    # came as another distribution) is refused before anything is installed.
    pip_help=$("${pip[@]}" install --help)  # not piped into grep -q: pipefail would see pip's SIGPIPE
    if [[ $pip_help == *--report* ]]; then
      if ! "${pip[@]}" install -q --dry-run --report "$gen/report.json" -c "$gen/constraints.txt" \
           -r "$gen/requirements.txt"; then
        echo "error: the packages to add do not fit with $python's own (pinned as installed in $gen/constraints.txt;" \
             "nothing was installed): see pip's message above; install them yourself in that interpreter at versions" \
             "that fit, or use GLUON_IMAGENET_DEVICE=cpu or gpu" >&2
        exit 2
      fi
      "$venv/bin/python" tools/setup_system.py "$venv" "$gen" --check "$gen/report.json" || exit 2
    else
      echo "setup: this pip has no --dry-run --report: additions are not checked against the kept modules" >&2
    fi
    if ! "${pip[@]}" install -q -c "$gen/constraints.txt" -r "$gen/requirements.txt"; then
      echo "error: the missing packages above do not fit with $python's own (pinned as installed in" \
           "$gen/constraints.txt; nothing was changed there): see pip's message above" >&2
      exit 1
    fi
  fi
  if [ -s "$gen/requirements-no-deps.txt" ]; then
    "${pip[@]}" install -q --no-deps -c "$gen/constraints.txt" -r "$gen/requirements-no-deps.txt"
  fi
  # The toolkit itself, alone: its numpy pin is for pip's MXNet, not for the interpreter's.
  "${pip[@]}" install -q --no-deps -e .
  mxnet_version=$("$venv/bin/python" -c 'import mxnet; print(mxnet.__version__)')
  if ! "$venv/bin/python" -c 'import horovod.mxnet' 2>/dev/null; then
    # No Horovod with MXNet in the interpreter: build one like the other modes, for this MXNet's variant.
    device=system-$("$venv/bin/python" -c 'import mxnet as mx; f = mx.runtime.Features()
print("cuda" if f.is_enabled("CUDA") and f.is_enabled("NCCL") else "cpu")')
  fi
else
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  # One command for every pin: installing gluoncv alone would upgrade numpy and break mxnet.
  "${pip[@]}" install -q -c requirements/constraints.txt -e ".[$device,test]" wheel
fi

# onnxruntime asks for numpy >= 1.24.2 (which breaks mxnet) but runs on numpy 1.23.5: installed without its
# dependencies, which setup.cfg pins. An interpreter's own onnxruntime (system) is kept.
"$venv/bin/python" -c 'import onnxruntime' 2>/dev/null || "${pip[@]}" install -q --no-deps onnxruntime==1.16.3

if [ "$device" != system ]; then
  py_tag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  cache="$wheel_cache/horovod-$horovod_version-$py_tag-mxnet-$mxnet_version-$device"
  if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
    echo "setup: building Horovod $horovod_version against mxnet $mxnet_version ($device) into $cache (a few minutes, once)"
    mkdir -p "$cache.tmp"
    case "$device" in
      gpu|system-cuda) ops=(HOROVOD_GPU_OPERATIONS=NCCL) ;;
      *) ops=(HOROVOD_CPU_OPERATIONS=gloo) ;;
    esac
    # --no-build-isolation: the build must see the installed mxnet ("Could NOT find Mxnet" otherwise).
    env HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 "${ops[@]}" \
        "${pip[@]}" wheel -q --no-deps --no-build-isolation "horovod==$horovod_version" -w "$cache.tmp"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"  # only a complete build becomes the cache
  fi
  "${pip[@]}" install -q --no-deps --force-reinstall "$cache"/horovod-*.whl
fi
"$venv/bin/python" -c 'import horovod.mxnet as hvd, mxnet; print("setup: mxnet", mxnet.__version__, "horovod", hvd.__version__ if hasattr(hvd, "__version__") else "ok")'
echo "$stamp" > "$venv/.installed"
