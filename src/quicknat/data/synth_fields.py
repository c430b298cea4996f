"""Smooth random fields and filters of the synthetic generator (:mod:`quicknat.data.synth`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_coarse(vol: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of a coarse (1, C, d, d, d) field at normalised points (P, 3) -> (C, P)."""
    gg = norm[:, [2, 1, 0]].float().view(1, -1, 1, 1, 3)
    return F.grid_sample(vol, gg, mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0, 0]


def blur2d(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 2D image (replicated edges); ``sigma`` < 0.3 pixels: unchanged."""
    if sigma < 0.3:
        return img
    r = int(math.ceil(2.5 * sigma))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    t = img[None, None]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return t[0, 0]
