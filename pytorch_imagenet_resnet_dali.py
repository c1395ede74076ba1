"""The same training job, fed by NVIDIA DALI from TFRecord shards or an image folder.

mpirun -np 4 python pytorch_imagenet_resnet_dali.py --data-dir D --dali-device gpu
"""

import sys

from largebatch.cli import main

if __name__ == "__main__":
    sys.exit(main("dali"))
