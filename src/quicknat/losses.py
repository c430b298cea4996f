"""QuickNAT's loss: multi-class soft Dice plus cross-entropy weighted per pixel.

* Soft Dice: softmax applied once to the logits; for each class present in the batch's target,
  ``(2 * sum(p * g) + s) / (sum(p) + sum(g) + s)`` over the batch, smoothing ``s = 1``; the loss
  is one minus the mean over those classes (classes absent from the target are left out, so an
  empty class cannot reward predicting nothing).
* Cross-entropy: per-pixel negative log-likelihood times the weight map (median-frequency class
  weight plus the edge term, see :mod:`quicknat.data.slices`), averaged over pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickNATLoss(nn.Module):
    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
        """Returns (total loss, {"dice": soft-Dice loss, "ce": weighted cross-entropy})."""
        logits = logits.float()
        num_classes = logits.shape[1]
        logp = F.log_softmax(logits, dim=1)
        probs = logp.exp()
        soft = target.dim() == 4
        onehot = target.to(probs.dtype) if soft else F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        present = onehot.sum(dims) >= 0.5
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        dice_loss = 1.0 - dice[present].mean()
        nll = -(onehot * logp).sum(1) if soft else F.nll_loss(logp, target, reduction="none")
        ce = (nll * weight).mean() if weight is not None else nll.mean()
        total = self.dice_weight * dice_loss + self.ce_weight * ce
        return total, {"dice": dice_loss.detach(), "ce": ce.detach()}
