#!/usr/bin/env bash
# Creates .venv in the repository and installs everything gluon_imagenet needs, idempotently:
#   1. every pinned dependency in one pip command (setup.cfg + requirements/constraints.txt),
#   2. Horovod 0.28.1 with MXNet + Gloo, built once into a wheel cache outside the repository
#      (keyed on Python version, MXNet variant and version) and installed from that cache afterwards.
# A second run with nothing changed takes a few seconds.
#
#   bash tools/setup.sh                             # CPU (default)
#   GLUON_IMAGENET_DEVICE=gpu bash tools/setup.sh   # GPU: mxnet-cu117, Horovod with NCCL (needs CUDA 11.7, NCCL)
#
# Environment: PYTHON (default python3.11 or python3), GLUON_IMAGENET_WHEEL_CACHE (default
# ~/.cache/gluon_imagenet/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

device=${GLUON_IMAGENET_DEVICE:-cpu}
case "$device" in
  cpu|gpu) ;;
  *) echo "error: GLUON_IMAGENET_DEVICE=$device: use cpu or gpu" >&2; exit 2 ;;
esac
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); MXNet 1.9.1" \
       "and these pins need Python 3.11: set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

venv=.venv
horovod_version=0.28.1
mxnet_version=1.9.1
stamp="$device $(cat setup.cfg pyproject.toml requirements/constraints.txt tools/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$stamp" ] \
   && "$venv/bin/python" -c 'import horovod.mxnet, mxnet' 2>/dev/null; then
  echo "setup: $venv is up to date ($device)"
  exit 0
fi

echo "setup: creating $venv ($device) with $python"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# One command for every pin: installing gluoncv alone would upgrade numpy and break mxnet.
"${pip[@]}" install -q -c requirements/constraints.txt -e ".[$device,test]" wheel

py_tag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cache=${GLUON_IMAGENET_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gluon_imagenet/wheels}
cache="$cache/horovod-$horovod_version-$py_tag-mxnet-$mxnet_version-$device"
if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "setup: building Horovod $horovod_version against mxnet $mxnet_version ($device) into $cache (a few minutes, once)"
  mkdir -p "$cache.tmp"
  if [ "$device" = gpu ]; then ops=(HOROVOD_GPU_OPERATIONS=NCCL); else ops=(HOROVOD_CPU_OPERATIONS=gloo); fi
  # --no-build-isolation: the build must see the installed mxnet ("Could NOT find Mxnet" otherwise).
  env HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_MPI=1 "${ops[@]}" \
      "${pip[@]}" wheel -q --no-deps --no-build-isolation "horovod==$horovod_version" -w "$cache.tmp"
  rm -rf "$cache" && mv "$cache.tmp" "$cache"  # only a complete build becomes the cache
fi
"${pip[@]}" install -q --no-deps --force-reinstall "$cache"/horovod-*.whl
"$venv/bin/python" -c 'import horovod.mxnet as hvd, mxnet; print("setup: mxnet", mxnet.__version__, "horovod", hvd.__version__ if hasattr(hvd, "__version__") else "ok")'
echo "$stamp" > "$venv/.installed"
