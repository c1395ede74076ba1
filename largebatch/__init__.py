"""largebatch: large-batch data-parallel ImageNet training with PyTorch and Horovod."""

__version__ = "0.1.0"
