"""Intensity models of synthetic training images: SynthSeg's T1 priors, built-in T1 ranges and
random contrast (see :mod:`quicknat.data.synth` for how a sample draws them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from ..errors import QuicknatInputError
from ..resample import bounding_box

if TYPE_CHECKING:
    from .synth_config import SynthConfig

# Built-in T1 ranges (mean intensity on a 0-255 scale) when no priors folder is given: our own
# coarse ordering of real T1 contrast (WM brightest, then deep grey, cortex-like grey, CSF).
_T1_RANGES = (
    ((2, 41, 7, 46, 16, 28, 60, 77, 85), (130.0, 170.0)),
    ((10, 49, 13, 52), (115.0, 150.0)),  # thalamus, pallidum
    ((11, 50, 12, 51, 26, 58), (95.0, 130.0)),  # caudate, putamen, accumbens
    ((3, 42, 8, 47, 17, 53, 18, 54, 80, 136, 137, 163, 164), (75.0, 105.0)),
    ((4, 43, 5, 44, 14, 15, 24, 72, 31, 63, 30, 62, 25, 57), (25.0, 60.0)),
)
#: aseg cortex label -> its hemisphere's cerebral white matter (the cortex depth gradient's ends)
CORTEX_WM = {3: 2, 42: 41}
DEPTH_UNIT_MM = 0.25  # cortex depth is stored in uint8 steps of this size (up to ~64 mm)
PRIOR_FILES = ("generation_labels.npy", "generation_classes_contrast_specific.npy", "prior_means_t1.npy",
               "prior_stds_t1.npy")


@dataclass(frozen=True)
class T1Priors:
    """SynthSeg's T1 priors: label ID -> intensity class, and per class (mean, spread) of the
    class mean and of the class std."""

    labels: np.ndarray
    classes: np.ndarray
    means: np.ndarray  # (2, n_classes)
    stds: np.ndarray  # (2, n_classes)

    @classmethod
    def load(cls, folder: str | Path) -> T1Priors:
        folder = Path(folder)
        arrays = []
        for name in PRIOR_FILES:
            try:
                arrays.append(np.load(folder / name, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise QuicknatInputError(folder / name, f"cannot read SynthSeg prior ({exc})") from None
        labels, classes, means, stds = arrays
        if labels.shape != classes.shape or means.shape[0] != 2 or stds.shape != means.shape \
                or int(classes.max()) >= means.shape[1]:
            raise QuicknatInputError(folder, "SynthSeg priors have inconsistent shapes")
        return cls(labels.astype(np.int64), classes.astype(np.int64), means.astype(np.float64),
                   stds.astype(np.float64))


def sample_intensities(label_ids: np.ndarray, brain: torch.Tensor, groups: dict[int, int], c: SynthConfig,
                       priors: T1Priors | None, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (0-255 scale) of every label of a map for one sample (see
    :mod:`quicknat.data.synth` for the modes): T1-like from ``priors`` or the built-in ranges,
    or random contrast with one draw per ``groups`` entry (a left/right pair shares one)."""
    ids = label_ids.tolist()
    t1 = float(torch.rand(1, generator=g)) >= c.random_share
    means = torch.empty(len(ids), dtype=torch.float64)
    stds = torch.empty(len(ids), dtype=torch.float64)
    if t1 and priors is not None:
        p = priors
        n = p.means.shape[1]
        cm = torch.normal(torch.from_numpy(p.means[0]), torch.from_numpy(p.means[1]), generator=g).clamp_min(0)
        cs = torch.normal(torch.from_numpy(p.stds[0]), torch.from_numpy(p.stds[1]), generator=g).clamp_min(1)
        # labels absent from the priors: their own random class
        extra_m = torch.empty(len(ids), dtype=torch.float64).uniform_(*c.mean_range, generator=g)
        extra_s = torch.empty(len(ids), dtype=torch.float64).uniform_(*c.std_range, generator=g)
        lookup = dict(zip(p.labels.tolist(), p.classes.tolist()))
        for k, lab in enumerate(ids):
            cls = lookup.get(lab)
            means[k], stds[k] = (cm[cls], cs[cls]) if cls is not None and cls < n else (extra_m[k], extra_s[k])
    else:
        rm = torch.empty(len(ids) + 64, dtype=torch.float64).uniform_(*c.mean_range, generator=g)
        rs = torch.empty(len(ids) + 64, dtype=torch.float64).uniform_(*c.std_range, generator=g)
        for k, lab in enumerate(ids):
            grp = groups.get(lab)
            means[k], stds[k] = (rm[grp], rs[grp]) if grp is not None else (rm[64 + k], rs[64 + k])
        if t1:  # built-in T1 ranges, each structure drawn on its own
            u = torch.rand(len(ids), generator=g, dtype=torch.float64)
            for k, lab in enumerate(ids):
                for group, (lo, hi) in _T1_RANGES:
                    if lab in group:
                        means[k] = lo + (hi - lo) * u[k]
                        stds[k] = 3 + 7 * u[k]
        if ids and ids[0] == 0:
            means[0] = 0.0 if float(torch.rand(1, generator=g)) < 0.8 else means[0] * 0.2
    if float(torch.rand(1, generator=g)) < c.strip_prob:
        nonbrain = ~brain
        if float(torch.rand(1, generator=g)) < 0.5 or not ids or ids[0] != 0:
            means[nonbrain], stds[nonbrain] = 0.0, 0.0
        else:
            means[nonbrain], stds[nonbrain] = means[0], stds[0]
    return means.float(), stds.float()


def cortex_depth(ids: np.ndarray, zooms) -> np.ndarray:
    """Per voxel of a label map, the distance (mm) of a cortex voxel to its nearest cerebral
    white-matter voxel in ``DEPTH_UNIT_MM`` steps (uint8, 255 at most); 0 elsewhere. A cortex
    voxel touching white matter is 1 mm deep on a 1 mm map.

    The distance transform runs on the bounding box of cortex and white matter only (about a
    sixth of a 256³ whole-head map): every cortex voxel and every white-matter voxel lie inside
    it, so each depth is the same as on the whole map."""
    wm = np.isin(ids, list(CORTEX_WM.values()), kind="table")
    cortex = np.isin(ids, list(CORTEX_WM), kind="table")
    out = np.zeros(ids.shape, np.uint8)
    if wm.any() and cortex.any():
        start, stop = bounding_box(wm | cortex)
        box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        d = ndimage.distance_transform_edt(~wm[box], sampling=zooms)
        inside = cortex[box]
        out[box][inside] = np.minimum(np.rint(d[inside] / DEPTH_UNIT_MM), 255).astype(np.uint8)
    return out


def cortex_shift(label_ids: np.ndarray, means: torch.Tensor, amount: float) -> torch.Tensor:
    """Per label of a map, what the cortex depth gradient adds at the white surface: ``amount``
    of its hemisphere's WM mean minus its own (0 for every other label, or when the map has no
    WM for it)."""
    ids = label_ids.tolist()
    pos = {lab: k for k, lab in enumerate(ids)}
    shift = torch.zeros_like(means)
    for ctx, wm in CORTEX_WM.items():
        if ctx in pos and wm in pos:
            shift[pos[ctx]] = amount * (means[pos[wm]] - means[pos[ctx]])
    return shift


def depth_decay(depth: torch.Tensor, length_mm: float) -> torch.Tensor:
    """exp(-(depth - 1 mm) / length) at most 1, ``depth`` in ``DEPTH_UNIT_MM`` steps."""
    return torch.exp(-(depth.float() * DEPTH_UNIT_MM - 1.0) / length_mm).clamp(max=1.0)
