"""The evaluation stage: python -m gluon_imagenet.sweep_eval (sweep_eval/cli.py)."""
