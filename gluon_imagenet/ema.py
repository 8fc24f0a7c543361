"""An exponential moving average (EMA) of the network's weights and BatchNorm running statistics.

Recipe field `ema: {half_life_epochs: H, every_steps: K}`. The unit is the half-life in epochs of the phase being
trained: with S steps per epoch in that phase, the per-step decay is d = 0.5 ** (1 / (H * S)) and an update every
K steps uses d ** K, so after H epochs the starting weights weigh one half whatever K is. S is the current phase's:
a phase with smaller batches (more steps per epoch) decays more slowly per step, and the half-life stays H epochs of
images across phases.

The averages live on the network's device as NDArrays and are updated in place, every K steps, by MXNet's SGD
kernels: with lr = -(1 - d) and wd = -1, SGD's update w' = (1 - lr*wd) w - lr*g is exactly
ema' = d*ema + (1 - d)*weight in one operator per array, reading two arrays and writing one (the least memory
traffic an average can take), and no value is read back to the host. On GPUs the multi-tensor kernel
(multi_sgd_update) does up to 60 arrays per launch (ResNet-50 has 269 parameters and statistics); on the CPU it
was 4x slower than one sgd_update per array (31 vs 124 ms for ResNet-50 here), so CPUs take the latter.

Saved beside each checkpoint as `<prefix>.ema.params`, with the names and format of Gluon's save_parameters, so
`net.load_parameters(path)` loads it into the same architecture like `.params`.
"""
from __future__ import annotations

import mxnet as mx

from gluon_imagenet.model import is_running_stat

# MXNet's multi-tensor SGD takes at most 60 arrays per call (MultiSGDKernelParam in optimizer_op-inl.h); more
# crash the process.
MAX_ARRAYS_PER_UPDATE = 60


def per_step_decay(half_life_epochs: float, steps_per_epoch: int) -> float:
    return 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch))


class WeightEMA:
    def __init__(self, net, half_life_epochs: float, every_steps: int = 1, aggregate: bool | None = None):
        self.half_life_epochs, self.every_steps = half_life_epochs, every_steps
        named = sorted(net._collect_params_with_prefix().items())
        if aggregate is None:
            aggregate = named[0][1].data().context.device_type == "gpu"
        self.aggregate = aggregate
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.running_stat_names = [name for name, param in named if is_running_stat(name, param)]
        self.averages = {name: param.data().copy() for name, param in named}  # starts at the current weights
        self.steps_done = 0
        self.decay = None  # per update, set for each phase

    def start_phase(self, steps_per_epoch: int, global_step: int) -> None:
        """Decay for this phase's steps per epoch; the update count follows the global step, so a resumed run
        updates at the same steps as an uninterrupted one."""
        self.decay = per_step_decay(self.half_life_epochs, steps_per_epoch) ** self.every_steps
        self.steps_done = global_step

    def after_step(self) -> None:
        self.steps_done += 1
        if self.steps_done % self.every_steps == 0:
            self.update()

    def update(self) -> None:
        if self.decay is None:
            raise RuntimeError("WeightEMA.start_phase must set the decay before the first update")
        averages = [self.averages[name] for name in self.names]
        weights = [param.data() for param in self.params]
        if not self.aggregate:
            for average, weight in zip(averages, weights):
                mx.nd.sgd_update(average, weight, lr=self.decay - 1.0, wd=-1.0, rescale_grad=1.0,
                                 clip_gradient=-1.0, out=average)
            return
        for start in range(0, len(averages), MAX_ARRAYS_PER_UPDATE):
            chunk = averages[start:start + MAX_ARRAYS_PER_UPDATE]
            pairs = [a for pair in zip(chunk, weights[start:start + MAX_ARRAYS_PER_UPDATE]) for a in pair]
            mx.nd.multi_sgd_update(*pairs, out=chunk, num_weights=len(chunk), lrs=(self.decay - 1.0,) * len(chunk),
                                   wds=(-1.0,) * len(chunk), rescale_grad=1.0, clip_gradient=-1.0)

    def arrays_that_differ_across_ranks(self) -> list[tuple[str, mx.nd.NDArray]]:
        """The averages of the BatchNorm statistics (those of the weights are equal on every rank, as the weights
        are)."""
        return [(name, self.averages[name]) for name in self.running_stat_names]

    def save(self, path: str) -> None:
        """In save_parameters' format: the same names, each array copied to the CPU."""
        mx.nd.save(path, {name: self.averages[name].copyto(mx.cpu()) for name in self.names})

    def load(self, path: str) -> None:
        loaded = mx.nd.load(path)
        if sorted(loaded) != self.names:
            missing, extra = sorted(set(self.names) - set(loaded)), sorted(set(loaded) - set(self.names))
            raise ValueError(f"{path} holds other arrays than this network (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        for name, array in loaded.items():
            array.copyto(self.averages[name])
