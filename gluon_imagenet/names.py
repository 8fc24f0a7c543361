"""Names the command lines accept, importable without MXNet (the trainer sets MXNet's environment before MXNet
loads, so its command line cannot import model.py to learn them)."""

# resnet50_v1b/v1d are the toolkit's networks (gluoncv model zoo); the small ones make CPU tests and demos fast.
MODELS = ("resnet50_v1b", "resnet50_v1d", "resnet18_v1b", "resnet34_v1b")
