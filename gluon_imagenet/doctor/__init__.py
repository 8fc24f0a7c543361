"""The preflight: python -m gluon_imagenet.doctor (doctor/cli.py)."""
