"""model.onnx beside MXNet's files in a model folder, checked by onnxruntime before the folder is installed (through
onnx_runtime.py, the side of onnxruntime that predict runs too).

The graph is MXNet 1.9.1's own exporter's (mx.onnx.export_model), with:
  - opset OPSET (19), input "data": uint8 RGB NCHW with a dynamic batch dimension ("batch") and the crop size fixed;
    the cast to float and the normalisation (x - mean) / std are inside the graph, as in the MXNet graph;
  - every parameter an initializer only: the exporter also lists each one (BatchNorm's running statistics
    included) as a graph input, which makes them overridable inputs rather than constants, so onnxruntime
    cannot fold them (and warns once per parameter). Here they are removed from the inputs.
The check runs the same fixed uint8 batches through MXNet and onnxruntime (two batch sizes: the batch dimension
is really dynamic) and requires every score to agree within TOLERANCE x max(1, largest |score|).
"""
from __future__ import annotations

import os

from gluon_imagenet.onnx_runtime import INSTALL, PINS, OnnxUnavailable, import_runtime, session

# mx.onnx.export_model takes no opset: it writes the installed onnx's newest, 19 for onnx 1.14.1 (onnxruntime
# >= 1.14 runs it). Checked after the export, so another onnx cannot change it silently.
OPSET = 19
TOLERANCE = 1e-4  # relative to the scores' scale: float32 kernels of two libraries, summed in another order
ONNX_FILE = "model.onnx"


def check_available() -> None:
    """Before any work: both packages import."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise OnnxUnavailable(f"onnx is not installed ({e}); install it with: {INSTALL}") from None
    import_runtime()


def constants_only(model) -> int:
    """Drop the graph inputs that are initializers (parameters, BatchNorm statistics): they become constants.
    Returns how many were dropped."""
    names = {init.name for init in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    dropped = len(model.graph.input) - len(keep)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return dropped


def write(folder: str, prefix: str, image_size: int, net, probes) -> dict:
    """Export folder/<prefix>-symbol.json + params to folder/model.onnx and check it against `net` (the MXNet
    network the folder was exported from) on each uint8 batch in `probes`. Returns model.json's "onnx" entry."""
    import mxnet as mx
    import numpy as np
    import onnx

    path = os.path.join(folder, ONNX_FILE)
    first = probes[0]
    mx.onnx.export_model(os.path.join(folder, f"{prefix}-symbol.json"), os.path.join(folder, f"{prefix}-0000.params"),
                         [first.shape], [np.uint8], path, dynamic=True,
                         dynamic_input_shapes=[("batch", 3, image_size, image_size)], verbose=False)
    model = onnx.load(path)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets != {"": OPSET}:
        raise RuntimeError(f"the exporter wrote opsets {opsets}, not {OPSET}: install {PINS}")
    constants_only(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    runtime = session(path)
    name = runtime.get_inputs()[0].name
    worst, scale = 0.0, 1.0
    for probe in probes:
        expected = net(mx.nd.array(probe, dtype="uint8")).asnumpy()
        got = runtime.run(None, {name: probe})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"onnxruntime gave scores of shape {got.shape} for a batch of {len(probe)}, MXNet "
                               f"{expected.shape}")
        worst, scale = max(worst, float(np.abs(got - expected).max())), max(scale, float(np.abs(expected).max()))
    if worst > TOLERANCE * scale:
        raise RuntimeError(f"model.onnx disagrees with MXNet: largest score difference {worst:.3g} > "
                           f"{TOLERANCE:g} x {scale:.3g}")
    return {"file": ONNX_FILE, "opset": OPSET, "input": name, "batch": "dynamic",
            "checked": {"batches": [len(p) for p in probes], "max_difference": worst,
                        "tolerance": f"{TOLERANCE:g} x max(1, largest |score|) = {TOLERANCE * scale:.3g}",
                        "onnx": onnx.__version__, "onnxruntime": import_runtime().__version__}}

