"""Distributed or not, decided once at start: one small object that every other module asks.

Under `horovodrun`, Horovod is initialised and each rank uses GPU `local_rank` (never GPU 0 for everyone,
horovod/horovod#2625); as a plain process, nothing distributed is imported. Only rank 0 prints and saves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mxnet as mx


@dataclass
class Ranks:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    horovod: object = None  # the horovod.mxnet module when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # What each launcher horovodrun can use sets in a rank's environment: its Gloo launcher (HOROVOD_RANK), and
    # mpirun (Open MPI, MPICH/Intel MPI, PMIx), which horovodrun uses when Horovod was built with MPI, as in
    # NVIDIA's containers (horovod/runner/common/util/env.py).
    LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

    @classmethod
    def start(cls) -> "Ranks":
        """Horovod when launched by horovodrun (or mpirun), a single process otherwise."""
        if not any(name in os.environ for name in cls.LAUNCHER_RANK_VARIABLES):
            return cls()
        import horovod.mxnet as hvd

        hvd.init()
        return cls(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd)

    def broadcast_parameters(self, params) -> None:
        """Rank 0's initial (or resumed) parameters to every rank, before any forward pass."""
        if self.horovod is not None:
            self.horovod.broadcast_parameters(params, root_rank=0)

    def make_trainer(self, params, optimizer: str, optimizer_params: dict) -> mx.gluon.Trainer:
        if self.horovod is not None:
            # Averages gradients over ranks with allreduce before each update.
            return self.horovod.DistributedTrainer(params, optimizer, optimizer_params)
        return mx.gluon.Trainer(params, optimizer, optimizer_params, kvstore=None)

    def average_running_stats(self, net) -> None:
        """BatchNorm running means and variances are updated by each rank from its own data and never
        allreduced: average them (before a checkpoint) so every rank and the saved network hold the same ones."""
        if self.horovod is None:
            return
        from gluon_imagenet.model import is_running_stat

        for name, param in sorted(net._collect_params_with_prefix().items()):
            if is_running_stat(name, param):
                self.horovod.allreduce_(param.data(), op=self.horovod.Average, name=f"running_stats.{name}")

    def average_arrays(self, named_arrays, tag: str) -> None:
        """Average each (name, NDArray) over the ranks in place; every rank passes the same names in the same
        order."""
        if self.horovod is None:
            return
        for name, array in named_arrays:
            self.horovod.allreduce_(array, op=self.horovod.Average, name=f"{tag}.{name}")

    def allreduce_sum(self, value: float, name: str) -> float:
        return float(self.allreduce_sums([value], name)[0])

    def allreduce_sums(self, values, name: str) -> list[float]:
        """Element-wise sums over every rank (each rank must call it with the same length and name)."""
        if self.horovod is None:
            return [float(v) for v in values]
        total = self.horovod.allreduce(mx.nd.array(values, dtype="float64"), op=self.horovod.Sum, name=name)
        return total.asnumpy().tolist()

    def finish(self) -> None:
        """Wait for this rank's pending work, then for every rank: a rank that exits while another still
        finishes its last allreduce shuts Horovod down under it."""
        mx.nd.waitall()
        self.allreduce_sum(0.0, "finish")

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, flush=True, **kwargs)
