"""Network, optimizer and loss on one device: what a training step needs, and nothing about phases or files.

Mixed precision is MXNet's AMP (float16 on GPUs, bfloat16 on CPUs, devices.py): `amp.init` before the network is
built, `amp.init_trainer` on the (Horovod) trainer, `amp.scale_loss` around backward. Weights and optimizer state
stay float32 (AMP casts per operator), so `multi_precision` would change nothing and is not set. The dynamic loss
scaler runs on the gradients Horovod has already averaged, so every rank skips an overflowing step together.
Its overflow check reads one value back from the device at every step (has_overflow, loss_scaler.py), so with
it the host waits for each step's gradients; a static scale (recipe `loss_scale: 256`, as the seed ran) does not.
"""
from __future__ import annotations

import os

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.contrib import amp
from mxnet.contrib.amp.loss_scaler import LossScaler

from gluon_imagenet.devices import Device
from gluon_imagenet.ema import WeightEMA
from gluon_imagenet.model import build_model, initialize, no_weight_decay

# Parameters per multi-tensor update for `sgd` on GPUs where MXNET_OPTIMIZER_AGGREGATION_SIZE is unset: NVIDIA's
# MXNet ResNet-50 uses 60, so ResNet-50's 161 parameters take 3 kernel launches instead of MXNet's default 41 (4
# per update). CPUs keep MXNet's 4: there 60 cut the host time of Trainer.step but doubled the update's own time
# (bench/optimizer_step.py, BENCHMARKS.md).
SGD_AGGREGATION_GPU = 60


class StaticLossScaler(LossScaler):
    """AMP's loss scaler with a fixed scale: no overflow check, so no value is read back from the device. A step
    that overflows is not skipped: its non-finite loss stops the run through the trainer's divergence check."""

    def __init__(self, scale: float):
        super().__init__()
        self._loss_scale = self._next_loss_scale = float(scale)

    def has_overflow(self, params):
        return False


class Learner:
    """One rank's network and optimizer. `ranks` is the dist.Ranks object (Horovod or a single process)."""

    def __init__(self, *, model: str, classes: int, device: Device, ranks, seed: int, lr: float, momentum: float,
                 weight_decay: float, label_smoothing: float, first_image_size: int, amp_dtype: str | None = None,
                 params_path: str | None = None, optimizer: str = "nag", loss_scale: float | str = "dynamic",
                 ema=None):
        self.ctx, self.classes, self.smoothing, self.amp_dtype = device.context, classes, label_smoothing, amp_dtype
        if amp_dtype:
            amp.init(target_dtype=amp_dtype)  # must run before the network is built
        mx.random.seed(seed)
        self.net = build_model(model, classes)
        initialize(self.net, self.ctx)
        no_weight_decay(self.net)
        if params_path:
            self.net.load_parameters(params_path, ctx=self.ctx)
        else:
            # Give every parameter its shape now, imperatively and in training mode, so the broadcast below
            # sends real arrays: broadcasting deferred parameters from inside the first hybridized forward pass
            # crashed rank 0 here now and then (segfault), and an inference-mode pass kills it with MKLDNN.
            with autograd.train_mode():
                self.net(mx.nd.zeros((2, 3, first_image_size, first_image_size), dtype="uint8", ctx=self.ctx))
            mx.nd.waitall()
        # Rank 0's parameters (and BatchNorm statistics) to every rank before training starts.
        ranks.broadcast_parameters(self.net.collect_params())
        mx.nd.waitall()  # the broadcast writes the parameters asynchronously: finish before the graph is built
        self.net.hybridize(static_alloc=True, static_shape=True)
        # From rank 0's weights, so the averages of the weights agree on every rank (recipe.EmaSettings or None).
        self.ema = WeightEMA(self.net, ema.half_life_epochs, ema.every_steps) if ema else None
        self.trainer = ranks.make_trainer(self.net.collect_params(), optimizer, {
            "learning_rate": lr, "momentum": momentum, "wd": weight_decay})
        if optimizer == "sgd" and device.kind == "gpu" and "MXNET_OPTIMIZER_AGGREGATION_SIZE" not in os.environ:
            self.trainer.optimizer.aggregate_num = SGD_AGGREGATION_GPU  # read at each update by MXNet's Updater
        if amp_dtype:
            amp.init_trainer(self.trainer)
            if loss_scale != "dynamic":
                self.trainer._amp_loss_scaler = StaticLossScaler(loss_scale)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=label_smoothing == 0)

    def step(self, data: mx.nd.NDArray, label: mx.nd.NDArray, lr: float) -> mx.nd.NDArray:
        """One update; returns the batch's mean loss as a 1-element array on the device, not read back: reading
        it would wait for the step to finish (one host-device synchronisation per step on a GPU)."""
        # Batches come on the iterator's context (pinned memory for the GPU): copy them to the network's, on a CPU
        # too. Read in place, the iterator's buffer stays busy for the whole step and its prefetching waits
        # (measured: 20% fewer img/s on the demo recipe).
        data, label = data.copyto(self.ctx), label.copyto(self.ctx)
        if self.smoothing:
            eps = self.smoothing
            label = label.one_hot(self.classes, on_value=1 - eps + eps / self.classes, off_value=eps / self.classes)
        self.trainer.set_learning_rate(lr)
        with autograd.record():
            loss = self.loss_fn(self.net(data), label)
            if self.amp_dtype:
                with amp.scale_loss(loss, self.trainer) as scaled:
                    autograd.backward(scaled)
            else:
                loss.backward()
        self.trainer.step(data.shape[0])
        if self.ema:
            self.ema.after_step()
        return loss.mean()

    # The AMP loss scaler's whole state: `loss_scale` is a read-only property, and has_overflow() replaces
    # _loss_scale with _next_loss_scale at every step (python/mxnet/contrib/amp/loss_scaler.py), so restoring
    # a run means setting all three.
    _SCALER_STATE = ("_loss_scale", "_next_loss_scale", "_unskipped")

    def loss_scaler_state(self) -> dict | None:
        if not self.amp_dtype:
            return None
        scaler = self.trainer._amp_loss_scaler
        return {name.lstrip("_"): getattr(scaler, name) for name in self._SCALER_STATE}

    def load_states(self, states_path: str, loss_scaler: dict | None) -> None:
        """Optimizer state (momentum, update counts) and the AMP loss scaler, from a checkpoint."""
        self.trainer.load_states(states_path)
        if self.amp_dtype and loss_scaler:
            scaler = self.trainer._amp_loss_scaler
            for name in self._SCALER_STATE:
                setattr(scaler, name, type(getattr(scaler, name))(loss_scaler[name.lstrip("_")]))
