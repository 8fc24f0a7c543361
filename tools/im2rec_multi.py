"""Pack an ImageNet-style tree into RecordIO at several sizes: see gluon_imagenet/data/pack.py or --help.

    python tools/im2rec_multi.py /data/imagenet --root recordio --sizes 160 320
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from gluon_imagenet.data.pack import main

if __name__ == "__main__":
    sys.exit(main())
