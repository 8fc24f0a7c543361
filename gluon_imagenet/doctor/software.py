"""Python, MXNet, GluonCV, Horovod versions and MXNet's build features."""
from __future__ import annotations

import os
import platform
import re
import sys

from gluon_imagenet.doctor.gpus import GPU
from gluon_imagenet.names import MODELS  # importable without MXNet: the doctor must start when MXNet does not
from gluon_imagenet.train.probes import Result

SUPPORTED_PYTHONS = ((3, 10), (3, 11))


# ------------------------------------------------------------------------------------------------ versions
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
    except Exception as e:  # a broken install raises anything at import: report it, do not crash the doctor
        return f"broken ({type(e).__name__}: {e})"


def check_versions(ranks: int) -> list[Result]:
    out = []
    py = sys.version_info[:2]
    if py in SUPPORTED_PYTHONS:
        out.append(Result("ok", "python", platform.python_version()))
    else:
        out.append(Result("warning", "python", f"{platform.python_version()} is not one the toolkit is tested on",
                          "use Python 3.10 (NVIDIA's MXNet container) or 3.11 (tools/setup.sh)"))
    numpy = _version("numpy")
    try:
        import mxnet as mx

        out.append(Result("ok", "mxnet", f"{mx.__version__} ({os.path.dirname(mx.__file__)})"))
    except Exception as e:
        fix = "bash tools/setup.sh (CPU), GLUON_IMAGENET_DEVICE=gpu (V100/A100) or =system (NVIDIA's container)"
        if numpy and re.match(r"1\.(2[4-9]|[3-9]\d)|[2-9]\.", numpy):
            fix = f"numpy {numpy} breaks mxnet 1.9.1 (np.bool is gone): pip install numpy==1.23.5"
        out.append(Result("failure", "mxnet", f"import mxnet failed: {type(e).__name__}: {e}", fix))
    out.append(Result("ok" if numpy else "failure", "numpy", numpy or "not installed",
                      "" if numpy else "bash tools/setup.sh"))
    out.extend(_check_gluoncv())
    horovod = _version("horovod")
    if horovod:
        out.append(Result("ok", "horovod", horovod))
    else:
        status = "failure" if ranks > 1 else "warning"
        out.append(Result(status, "horovod", f"not installed ({ranks} rank(s) asked)",
                          "bash tools/setup.sh builds it against this mxnet; one process trains without it"))
    return out


def _check_gluoncv() -> list[Result]:
    """The calls model.py makes: get_model(name, classes=..., last_gamma=True) for each of its networks; for the
    bottleneck networks last_gamma must set the last BatchNorm's gamma initializer to zeros."""
    version = _version("gluoncv")
    fix = ("pip install --no-deps gluoncv==0.10.5.post0 (the pinned one; --no-deps keeps this mxnet and numpy), or "
           "GLUON_IMAGENET_DEVICE=system bash tools/setup.sh")
    if version is None or version.startswith("broken"):
        return [Result("failure", "gluoncv", version or "not installed", fix)]
    try:
        from gluoncv.model_zoo import get_model

        for name in MODELS:
            net = get_model(name, classes=10, last_gamma=True)
            if "50" in name and str(net.layer1[0].bn3.gamma.init) != "zeros":
                return [Result("failure", "gluoncv", f"{version}: {name}(last_gamma=True) does not start the last "
                                                     "BatchNorm of its blocks at gamma = 0", fix)]
    except Exception as e:
        return [Result("failure", "gluoncv", f"{version}: building the toolkit's networks failed: "
                                             f"{type(e).__name__}: {e}", fix)]
    return [Result("ok", "gluoncv", f"{version}; builds {', '.join(MODELS)}")]


# ------------------------------------------------------------------------------------------------ MXNet features
IMPORTANT_FEATURES = ("CUDA", "CUDNN", "NCCL", "TENSORRT", "MKLDNN", "OPENCV", "BLAS_MKL", "BLAS_OPEN", "DIST_KVSTORE",
                      "INT64_TENSOR_SIZE", "SIGNAL_HANDLER")


def mxnet_features() -> dict[str, bool] | None:
    try:
        import mxnet as mx

        return {f.name: f.enabled for f in mx.runtime.Features().values()}
    except Exception:
        return None


def check_features(features: dict[str, bool] | None, gpus: list[GPU]) -> list[Result]:
    if features is None:
        return [Result("failure", "features", "mxnet does not import", "see the mxnet line above")]
    shown = ", ".join(f"{'+' if features.get(n) else '-'}{n}" for n in IMPORTANT_FEATURES if n in features)
    out = [Result("info", "features", shown)]
    if not features.get("OPENCV"):
        out.append(Result("failure", "opencv", "this MXNet has no OpenCV: ImageRecordIter cannot decode images",
                          "use an MXNet build with OpenCV (pip's wheels and NVIDIA's container have it)"))
    if gpus and not features.get("CUDA"):
        out.append(Result("failure", "cuda", f"{len(gpus)} GPU(s) here but this MXNet is a CPU build",
                          "GLUON_IMAGENET_DEVICE=gpu bash tools/setup.sh (V100/A100), or NVIDIA's MXNet container "
                          "with GLUON_IMAGENET_DEVICE=system (H100/H200)"))
    if features.get("CUDA") and not features.get("CUDNN"):
        out.append(Result("warning", "cudnn", "CUDA without cuDNN: convolutions will be slow",
                          "use an MXNet build with cuDNN (pip's mxnet-cu117, NVIDIA's container)"))
    if not gpus and not features.get("MKLDNN"):
        out.append(Result("warning", "mkldnn", "no oneDNN (MKLDNN): CPU convolutions are slow and bfloat16 AMP "
                                               "is unavailable", "use pip's mxnet==1.9.1 (built with oneDNN)"))
    return out
