"""Clean-ups of a segmentation's class map: labels off the brain's largest connected component
and CSF far from the brain become background (:class:`quicknat.segment.Segmenter` runs both by
default; ``bench/csf_reach.py`` measures them)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .labels import LabelScheme


def keep_brain_component(probs: torch.Tensor, voxel_size: float, bridge_mm: float = 3.0) -> int:
    """Set to background (in place) the labelled voxels of ``probs`` (C, X, Y, Z) that are not
    part of the brain: the labelled mask (argmax > 0) is opened with a ball of radius ``bridge_mm``
    (cutting bridges thinner than about twice that, such as scalp touching the brain's surface
    in a few voxels), its largest connected component is kept, dilated back by the same ball and
    intersected with the mask (the brain's own boundary comes back). Returns the voxels removed."""
    return to_background(probs, off_brain(probs.argmax(0).numpy(), voxel_size, bridge_mm))


def limit_csf(probs: torch.Tensor, scheme: LabelScheme, voxel_size: float, reach_mm: float) -> int:
    """Set to background (in place) the voxels of ``probs`` (C, X, Y, Z) whose most likely class
    is the scheme's ``CSF`` and that lie farther than ``reach_mm`` from every voxel of another
    labelled class. Returns the voxels changed (0 for a scheme without a class named CSF)."""
    return to_background(probs, far_csf(probs.argmax(0).numpy(), scheme, voxel_size, reach_mm))


def off_brain(classes: np.ndarray, voxel_size: float, bridge_mm: float = 3.0) -> np.ndarray:
    """The labelled voxels of a class map off its largest connected component (see
    :func:`keep_brain_component`)."""
    mask = classes > 0
    if not mask.any():
        return np.zeros_like(mask)
    r = max(1, int(round(bridge_mm / voxel_size)))
    zz, yy, xx = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    ball = zz**2 + yy**2 + xx**2 <= r * r
    opened = ndimage.binary_opening(mask, ball)
    lab, n = ndimage.label(opened if opened.any() else mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.reshape(-1))
    sizes[0] = 0
    core = lab == int(sizes.argmax())
    return mask & ~(ndimage.binary_dilation(core, ball) & mask)


def far_csf(classes: np.ndarray, scheme: LabelScheme, voxel_size: float, reach_mm: float) -> np.ndarray:
    """The CSF voxels of a class map farther than ``reach_mm`` from every other labelled class
    (see :func:`limit_csf`); none for ``reach_mm`` <= 0 or a scheme without a class named CSF."""
    names = [n.casefold() for n in scheme.names]
    tissue = (classes > 0) & (classes != names.index("csf")) if "csf" in names else None
    if reach_mm <= 0 or tissue is None or not tissue.any():
        return np.zeros(classes.shape, dtype=bool)
    far = ndimage.distance_transform_edt(~tissue, sampling=voxel_size) > reach_mm
    return (classes == names.index("csf")) & far


def to_background(probs: torch.Tensor, mask: np.ndarray) -> int:
    """Set the voxels of ``mask`` to background (probability 1) in ``probs`` (C, X, Y, Z), in place."""
    drop = torch.from_numpy(mask)
    probs[:, drop] = 0.0
    probs[0, drop] = 1.0
    return int(mask.sum())
