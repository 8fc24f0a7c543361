"""Export's options: what its command line (export/cli.py) was given, one typed value per flag.

export/cli.py's parser owns every default and help text; export() reads this and hands choose.py and folder.py
the few plain values each needs, so no module below the command line reads an argparse namespace. Frozen:
nothing changes an option once the command line is read.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportOptions:
    run_dir: str
    checkpoint: str | None  # a name (ckpt-00000360) or a step (360); None: --best or the newest epoch
    best: bool
    by: str | None  # top1, top5; None: the metric the sweep ranked by
    out: str | None  # None: RUN_DIR/export/<checkpoint>
    data_root: str | None  # None: the run's, from run.json
    onnx: bool
