"""The training stage: python -m gluon_imagenet.train (train/cli.py)."""
