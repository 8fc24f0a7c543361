"""The model folder: python -m gluon_imagenet.export (export/cli.py)."""
