"""python -m gluon_imagenet.train: the command line"""
import sys

from gluon_imagenet.train.cli import main

sys.exit(main())
