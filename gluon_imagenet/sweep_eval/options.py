"""The sweep's options: what its command line (sweep_eval/cli.py) was given, checked, one typed value per flag.

sweep_eval/cli.py's parser owns every default and help text and its check_args builds this once; plan.py and
report.py read it, so no module below the command line reads an argparse namespace. Frozen: nothing changes an
option once the command line is read.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SweepOptions:
    run_dir: str
    data_root: str | None  # None: the run's, from run.json
    gpus: str | None  # "0,1,...": one worker per GPU; None: --workers CPU workers
    workers: int
    size_policy: str  # "phase" or "fixed"
    image_size: int | None  # --size-policy fixed; None: the recipe's
    # --eval-scales, or --eval-scale X as its one-element case, or (1.0,): given once, parsed and checked once.
    scales: tuple[float, ...]
    flip: bool
    weights: str | None  # raw, ema, both; None: both when a checkpoint has EMA weights
    crop_fraction: float
    batch_size: int
    every: int
    from_epoch: float
    last: int | None
    target_top5: float | None
    target_top1: float | None
    watch: bool
    poll_seconds: float

    @property
    def eval_scale(self) -> float:
        """The first scale: plan.eval_size's default and the one the sweep's TensorBoard curve shows."""
        return self.scales[0]
