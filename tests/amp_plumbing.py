"""`python -m gluon_imagenet.train` with MXNet's AMP in its bfloat16 mode, but with no operator cast to bfloat16.

Everything AMP adds to training runs for real (amp.init, init_trainer, the dynamic loss scaler and its overflow
check on Horovod-averaged gradients, scale_loss, saving and restoring the scaler's state); only the arithmetic
stays float32, so it runs on CPUs without bfloat16 instructions, where MXNet's bfloat16 kernels fail. amp.init
is once per process: the trainer's own call then finds AMP initialised and keeps these lists.

    python tests/amp_plumbing.py --recipe R --data-root D --run-dir DIR --amp ...
"""
import sys

from mxnet.contrib import amp

amp.init(target_dtype="bfloat16", target_precision_ops=[], conditional_fp32_ops=[], fp32_ops=[])

from gluon_imagenet import devices  # noqa: E402

devices.cpu_supports_bfloat16 = lambda cpuinfo=None: True  # nothing runs in bfloat16 in this process
from gluon_imagenet.train.cli import main

sys.exit(main(sys.argv[1:]))
