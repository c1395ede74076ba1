"""The ResNets of He et al. for small images (CIFAR, section 4.2 of "Deep Residual Learning
for Image Recognition"): ``cifar_resnet{6n+2}`` (8, 14, 20, 32, 44, 56, 110).

A 3x3 stem at full resolution, then three stages of n basic blocks with 16, 32 and 64 channels
(stride 2 between stages), global average pooling and ``fc``. ResNet-20 has 0.27M parameters,
ResNet-8 0.08M. torchvision's ResNets are built for 224-pixel images (a stride-4 stem, 512
channels at the end): on 16-pixel images they are 20x the cost for no accuracy, so studies that
need hundreds of runs on a CPU (bench/convergence.py) use these. Built from torchvision's own
BasicBlock, with its initialisation (He normal for convolutions, BN weights 1 and biases 0).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

DEPTHS = {f"cifar_resnet{d}": d for d in (8, 14, 20, 32, 44, 56, 110)}
NAMES = tuple(DEPTHS)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], width
        for stage in range(3):
            out = width * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                down = None
                if stride != 1 or channels != out:
                    down = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                stages.append(BasicBlock(channels, out, stride, down))
                channels = out
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def is_small_resnet(name: str) -> bool:
    return name in NAMES


def build(name: str, num_classes: int) -> CifarResNet:
    return CifarResNet(DEPTHS[name], num_classes)
