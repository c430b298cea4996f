"""Validation of one view's network during training: 3D Dice per class on whole volumes."""

from __future__ import annotations

import numpy as np
import torch

from .data.slices import ValidationVolumes, volume_slices
from .metrics import dice_per_class
from .views import get_view, with_context


@torch.inference_mode()
def validate_view(net: torch.nn.Module, volumes: ValidationVolumes, view: str, device: torch.device,
                  batch_size: int = 16, amp: bool = False) -> np.ndarray:
    """Mean over validation volumes of 3D Dice per class (the view's scheme)."""
    spec = get_view(view)
    merge = spec.merge_index(volumes.scheme)
    num_classes = spec.scheme(volumes.scheme).num_classes
    net.eval()
    context = net.config.context
    scores = []
    for image, classes in zip(volumes.images, volumes.classes):
        stack = torch.from_numpy(volume_slices(image, view))
        pred = torch.zeros(stack.shape, dtype=torch.uint8)
        for i in range(0, len(stack), batch_size):
            x = with_context(stack, range(i, min(i + batch_size, len(stack))), context).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                pred[i : i + batch_size] = net(x).argmax(1).to(torch.uint8).cpu()
        ref = np.moveaxis(merge[np.asarray(classes)], spec.axis, 0)
        scores.append(dice_per_class(pred.numpy(), ref, num_classes))
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(scores), axis=0) if scores else np.full(num_classes, np.nan)
