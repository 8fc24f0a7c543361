"""The network: a gluoncv ResNet behind an input block that casts uint8 batches and normalises them on the device.

Shared by the trainer and the sweep evaluator, so a checkpoint always loads into the network that wrote it.
"""
from __future__ import annotations

import mxnet as mx
from gluoncv.model_zoo import get_model
from mxnet.gluon import HybridBlock

from gluon_imagenet.data.iterators import MEAN_RGB, STD_RGB
from gluon_imagenet.names import MODELS


class Classifier(HybridBlock):
    """uint8 NCHW RGB images in, class scores out."""

    def __init__(self, net: HybridBlock, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.net = net
            self.mean = self.params.get_constant("mean", mx.nd.array(MEAN_RGB).reshape((1, 3, 1, 1)))
            self.std = self.params.get_constant("std", mx.nd.array(STD_RGB).reshape((1, 3, 1, 1)))

    def hybrid_forward(self, F, x, mean, std):
        return self.net(F.broadcast_div(F.broadcast_sub(F.cast(x, "float32"), mean), std))


def build_model(name: str, classes: int) -> Classifier:
    """Uninitialised network. In the bottleneck networks (ResNet-50) the last BatchNorm of every residual block
    starts at gamma = 0, so each block starts as the identity (Goyal et al. 2017); gluoncv's BasicBlockV1b
    (ResNet-18/34) ignores `last_gamma` (gluoncv/model_zoo/resnetv1b.py, in 0.7 and 0.10 alike)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {', '.join(MODELS)}")
    return Classifier(get_model(name, classes=classes, last_gamma=True))


def initialize(net: Classifier, ctx: mx.Context) -> None:
    net.initialize(mx.init.MSRAPrelu(), ctx=ctx)


def no_weight_decay(net: Classifier) -> None:
    """Turn weight decay off for BatchNorm (gamma, beta) and biases."""
    for param in net.collect_params(".*gamma|.*beta|.*bias").values():
        param.wd_mult = 0.0


def is_running_stat(name: str, param) -> bool:
    """BatchNorm's running means and variances (not trained: no gradient), by their name under the network:
    updated by each rank from its own data and never allreduced, so averaged before a checkpoint (dist.py), and
    averaged by the weight EMA (ema.py)."""
    return param.grad_req == "null" and "running" in name
