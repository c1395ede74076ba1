"""Train a ResNet (or any torchvision classifier) on an ImageFolder tree with Horovod.

mpirun -np 4 python pytorch_imagenet_resnet.py --train-dir T --val-dir V --base-op lars
"""

import sys

from largebatch.cli import main

if __name__ == "__main__":
    sys.exit(main("folder"))
