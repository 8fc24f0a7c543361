"""python -m gluon_imagenet.sweep_eval: the command line"""
import sys

from gluon_imagenet.sweep_eval.cli import main

sys.exit(main())
