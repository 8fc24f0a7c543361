"""python -m gluon_imagenet.export: the command line"""
import sys

from gluon_imagenet.export.cli import main

sys.exit(main())
