"""Structure-wise quality control from Monte-Carlo dropout (Bayesian QuickNAT, Roy et al. 2019).

The chain runs N times with dropout active (batch norm in eval); the segmentation is the argmax
of the mean probability, and per structure:

* ``cv``: the coefficient of variation of its volume across the N passes;
* ``iou``: the intersection over union of the N passes' masks (voxels all passes give the
  structure, over voxels any pass gives it).

Volumes are counted on the conformed grid (``voxel_volume`` mm³ a voxel); the CV is unit-free.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .labels import LabelScheme


def mc_dropout_passes(aggregate: Callable[[], torch.Tensor], passes: int, scheme: LabelScheme,
                      voxel_volume: float, progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Run ``aggregate()`` (one stochastic pass: probabilities (C, ...)) ``passes`` times;
    returns the mean probability and one QC row per foreground structure."""
    c = scheme.num_classes
    mean = volumes = seen = first = agree = None
    volumes = torch.zeros((passes, c), dtype=torch.float64)
    for k in tqdm(range(passes), desc="MC passes", unit="pass", leave=False, disable=not progress):
        p = aggregate()
        if mean is None:
            mean = torch.zeros_like(p)
            seen = torch.zeros(p.shape[1:], dtype=torch.int64, device=p.device)  # bit c: some pass said c
        mean += p
        lab = p.argmax(0)
        volumes[k] = torch.bincount(lab.flatten(), minlength=c).double().cpu()
        seen |= torch.bitwise_left_shift(torch.ones_like(seen), lab)
        if first is None:
            first, agree = lab, torch.ones_like(lab, dtype=torch.bool)
        else:
            agree &= lab == first
    mean /= passes
    inter = torch.bincount(first[agree].flatten(), minlength=c).double().cpu()
    union = torch.stack([((seen >> k) & 1).sum() for k in range(c)]).double().cpu()
    rows = []
    for k, cl in enumerate(scheme.classes):
        if k == 0:
            continue
        v = volumes[:, k] * voxel_volume
        m = float(v.mean())
        sd = float(v.std(unbiased=True)) if passes > 1 else 0.0
        rows.append({
            "structure": cl.name,
            "label": cl.label,
            "mean_volume_mm3": round(m, 3),
            "std_volume_mm3": round(sd, 3),
            "cv": round(sd / m, 5) if m > 0 else float("nan"),
            "iou": round(float(inter[k] / union[k]), 5) if union[k] > 0 else float("nan"),
            "passes": passes,
        })
    return mean, rows
