"""The trainer's options: what its command line (train/cli.py) was given, checked, one typed value per flag.

train/cli.py's parser owns every default and help text; this is the shape the rest of the trainer reads
(setup.py, memory_probe.py), so no module below the command line reads an argparse namespace. Frozen: nothing
changes an option once the command line is read. run.json keeps it as `args` (as_dict).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainOptions:
    recipe: str
    data_root: str
    run_dir: str | None  # None only with --synthetic or --io-only (checked by cli.check_args)
    resume: bool
    ctx: str | None  # "cpu", "gpu" or None: the device MXNet sees
    model: str
    amp: bool | None  # None: on for GPUs, off for CPUs
    threads: int  # 0: usable CPUs per rank
    lr_scaling: str | None  # None: the recipe's rule
    save_every_steps: int
    keep_mid_epoch: int
    log_every: int
    nan_patience: int
    seed: int
    tensorboard: str | None
    no_tensorboard: bool
    synthetic: bool
    io_only: bool
    memory_check: bool | None  # None: on for GPUs
    bench_steps: int

    def as_dict(self) -> dict:
        """The options by flag name (dashes as underscores), as run.json's `args` has always held them."""
        return dataclasses.asdict(self)
