"""python -m gluon_imagenet.doctor: the command line"""
import sys

from gluon_imagenet.doctor.cli import main

sys.exit(main())
