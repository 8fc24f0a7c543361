"""`python -m gluon_imagenet.train`, with each rank writing its EMA of the BatchNorm statistics as it stood before
the ranks averaged it for a checkpoint (to RUN_DIR/ema-before-rank<N>.npz): the test compares the saved file with
the mean of those.

    horovodrun -np 2 python tests/ema_ranks.py --recipe R --data-root D --run-dir DIR ...
"""
import os
import sys

import numpy as np

from gluon_imagenet import dist
from gluon_imagenet.train.cli import main

average_arrays = dist.Ranks.average_arrays


def recording_average_arrays(self, named_arrays, tag):
    named_arrays = list(named_arrays)
    if tag == "ema":
        run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
        np.savez(os.path.join(run_dir, f"ema-before-rank{self.rank}.npz"),
                 **{name: array.asnumpy() for name, array in named_arrays})
    return average_arrays(self, named_arrays, tag)


dist.Ranks.average_arrays = recording_average_arrays
sys.exit(main(sys.argv[1:]))
