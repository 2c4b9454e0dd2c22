"""Input backbones: ResNets with the reference's narrow stem, the parity embedding, shallow-wide, none.

The ResNets differ from torchvision's in two ways, as in the reference: the stem convolution is
3x3 with stride 1 (a small receptive field makes the CTM look around), and ``resnetXX-k`` keeps
only the first ``k`` stages. There is no pooling head; the output is a feature map. Module names
follow torchvision so weights line up with the reference's.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 4, 36, 3)),  # as the reference (torchvision has 8 blocks in stage 2)
}
STAGE_PLANES = (64, 128, 256, 512)


class ResNetFeatures(nn.Module):
    """The first ``stages`` stages of a ResNet, narrow stem, feature map out."""

    def __init__(self, depth: int, stages: int, in_channels: int = 3):
        super().__init__()
        block, blocks_per_stage = RESNET_LAYOUTS[depth]
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stages = stages
        c_in = 64
        for index in range(stages):
            planes = STAGE_PLANES[index]
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or c_in != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(c_in, planes * block.expansion, stride),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            layers = [block(c_in, planes, stride, downsample)]
            c_in = planes * block.expansion
            layers += [block(c_in, planes) for _ in range(1, blocks_per_stage[index])]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return x


class ParityBackbone(nn.Module):
    """Embeds a sequence of +-1 values: [B, L] -> [B, d, L]."""

    def __init__(self, d_embedding: int):
        super().__init__()
        self.embedding = nn.Embedding(2, d_embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding((x == 1).long()).transpose(1, 2)


class ShallowWide(nn.Module):
    """Two wide GLU convolutions (the second grouped); 2048 channels out at half resolution."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, 4096, kernel_size=3, stride=2, padding=1),
            nn.GLU(dim=1),
            nn.BatchNorm2d(2048),
            nn.Conv2d(2048, 4096, kernel_size=3, stride=1, padding=1, groups=32),
            nn.GLU(dim=1),
            nn.BatchNorm2d(2048),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def parse_resnet(backbone_type: str) -> tuple[int, int]:
    """'resnet34-2' -> (34, 2)."""
    depth, stages = backbone_type.removeprefix("resnet").split("-")
    return int(depth), int(stages)


def backbone_channels(backbone_type: str, d_input: int, in_channels: int) -> int:
    """Channels of the features the backbone hands to the key/value projection."""
    if backbone_type.startswith("resnet"):
        depth, stages = parse_resnet(backbone_type)
        block, _ = RESNET_LAYOUTS[depth]
        return STAGE_PLANES[stages - 1] * block.expansion
    if backbone_type == "shallow-wide":
        return 2048
    if backbone_type == "parity_backbone":
        return d_input
    if backbone_type == "none":
        return in_channels
    raise ValueError(f"unknown backbone_type {backbone_type!r}")


def build_backbone(backbone_type: str, d_input: int, in_channels: int) -> nn.Module:
    if backbone_type.startswith("resnet"):
        depth, stages = parse_resnet(backbone_type)
        return ResNetFeatures(
            depth, stages, in_channels=3
        )  # the 1x1 'initial_rgb' conv maps inputs to 3 channels
    if backbone_type == "shallow-wide":
        return ShallowWide(in_channels)
    if backbone_type == "parity_backbone":
        return ParityBackbone(d_input)
    if backbone_type == "none":
        return nn.Identity()
    raise ValueError(f"unknown backbone_type {backbone_type!r}")
