"""onnxruntime for model.onnx, shared by export (its check of the exported graph) and predict (--runtime onnx):
imported only when asked for, with one error that names the install command."""
from __future__ import annotations

PINS = "onnx==1.14.1 protobuf==6.33.6"
# onnxruntime 1.16.3 asks for numpy >= 1.24.2 (which breaks mxnet 1.9.1) but runs on 1.23.5: installed without
# its dependencies, which setup.cfg pins.
INSTALL = (f".venv/bin/python -m pip install -c requirements/constraints.txt {PINS} coloredlogs==15.0.1 "
           "flatbuffers==25.12.19 sympy==1.14.0 && .venv/bin/python -m pip install --no-deps onnxruntime==1.16.3 "
           "(bash tools/setup.sh does both)")


class OnnxUnavailable(Exception):
    """onnx or onnxruntime cannot be imported; the message names the install command."""


def import_runtime():
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxUnavailable(f"onnxruntime is not installed ({e}); install it with: {INSTALL}") from None
    return onnxruntime


def session(path: str):
    ort = import_runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a checked model has nothing to warn about
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """model.onnx through onnxruntime: a uint8 NCHW numpy batch in, scores out (predict's other runtime)."""

    def __init__(self, path: str):
        self.session = session(path)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch):
        return self.session.run(None, {self.input: batch})[0]
