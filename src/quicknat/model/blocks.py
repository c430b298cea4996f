"""QuickNAT's building blocks: dense block, squeeze-and-excitation, encoder and decoder blocks.

Every block owns its SE module and its dropout (MONAI's ``Quicknat`` shares one of each across
blocks and uses instance norm; QuickNAT uses batch norm).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelSE(nn.Module):
    """cSE: squeeze spatially (average pool), excite channels (Hu et al.; Roy et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class SpatialSE(nn.Module):
    """sSE: squeeze channels (1x1 conv), excite locations."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class ChannelSpatialSE(nn.Module):
    """csSE (QuickNAT v2): element-wise max of cSE and sSE, as in the original code."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        self.cse = ChannelSE(channels, reduction)
        self.sse = SpatialSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.cse(x), self.sse(x))


SE_TYPES = ("none", "cse", "sse", "csse")


def make_se(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "cse":
        return ChannelSE(channels)
    if kind == "sse":
        return SpatialSE(channels)
    if kind == "csse":
        return ChannelSpatialSE(channels)
    raise ValueError(f"unknown SE type {kind!r}; choose from {', '.join(SE_TYPES)}")


class DenseBlock(nn.Module):
    """BN-PReLU-conv(k) -> concat -> BN-PReLU-conv(k) -> concat -> BN-PReLU-conv(1x1).

    One PReLU per block, shared by its three stages, as in the original QuickNAT code.
    """

    def __init__(self, in_channels: int, filters: int, kernel: int = 5):
        super().__init__()
        pad = kernel // 2
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, filters, kernel, padding=pad)
        self.bn2 = nn.BatchNorm2d(in_channels + filters)
        self.conv2 = nn.Conv2d(in_channels + filters, filters, kernel, padding=pad)
        self.bn3 = nn.BatchNorm2d(in_channels + 2 * filters)
        self.conv3 = nn.Conv2d(in_channels + 2 * filters, filters, kernel_size=1)
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(self.prelu(self.bn1(x)))
        c1 = torch.cat((x, o1), dim=1)
        o2 = self.conv2(self.prelu(self.bn2(c1)))
        c2 = torch.cat((x, o1, o2), dim=1)
        return self.conv3(self.prelu(self.bn3(c2)))


class EncoderBlock(nn.Module):
    """Dense block, SE, dropout, then 2x2 max-pool keeping indices for the decoder."""

    def __init__(self, in_channels: int, filters: int, kernel: int, se: str, dropout: float):
        super().__init__()
        self.dense = DenseBlock(in_channels, filters, kernel)
        self.se = make_se(se, filters)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: torch.Tensor):
        skip = self.dropout(self.se(self.dense(x)))
        pooled, indices = self.pool(skip)
        return pooled, skip, indices


class DecoderBlock(nn.Module):
    """Max-unpool with the encoder's indices, concat the skip, dense block, SE, dropout."""

    def __init__(self, filters: int, kernel: int, se: str, dropout: float):
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.dense = DenseBlock(2 * filters, filters, kernel)
        self.se = make_se(se, filters)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        up = self.unpool(x, indices, output_size=skip.shape[-2:])
        return self.dropout(self.se(self.dense(torch.cat((skip, up), dim=1))))
