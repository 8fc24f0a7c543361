"""gluon_imagenet: train ResNet-50 on ImageNet fast with MXNet Gluon and Horovod, phase by phase."""
__version__ = "0.1.0"
