"""Segmentation metrics per structure and per subject, with voxel spacing honoured.

For each structure of a scheme, comparing a predicted and a reference label map:

* ``dice`` = 2|P∩R| / (|P| + |R|) and ``iou`` = |P∩R| / |P∪R| (Jaccard), both in [0, 1];
* ``hd95``: 95th percentile of the symmetric surface distances (mm), and ``assd``: average
  symmetric surface distance (mm), through MONAI's ``compute_hausdorff_distance`` and
  ``compute_average_surface_distance`` on one-hot crops around the structure;
* ``volume_pred``, ``volume_ref`` (mm³), ``volume_diff`` = pred - ref (mm³) and
  ``volume_similarity`` = 1 - |Vp - Vr| / (Vp + Vr).

A structure absent from both maps has status ``absent``: it gets no numbers (NaN) and is left
out of every mean. Present in one map only gives Dice, IoU and volume similarity 0 and no
surface distances (status ``missing_in_pred`` / ``missing_in_ref``). Background is reported as
its own row (status ``background``) and never enters the foreground mean.

The public functions take *label maps* (integer arrays of the same shape). One-hot tensors are
only accepted by :func:`dice_onehot`, which checks that they are one-hot: feeding class indices
where one-hot is expected (the source tutorial's "mean Dice above 1") raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .labels import LabelScheme
from .resample import bounding_box

METRICS = ("dice", "iou", "hd95", "assd", "volume_pred", "volume_ref", "volume_diff", "volume_similarity")


def _check_label_maps(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    for name, a in (("prediction", pred), ("reference", ref)):
        if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.rint(a)):
            raise ValueError(f"{name} is not a label map (non-integer values)")
    return np.rint(pred).astype(np.int64), np.rint(ref).astype(np.int64)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of every class index (0..num_classes-1) of two class maps; NaN where a class is
    absent from both."""
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    r = np.asarray(ref).reshape(-1).astype(np.int64)
    inter = np.bincount(p[p == r], minlength=num_classes).astype(np.float64)
    sp = np.bincount(p, minlength=num_classes).astype(np.float64)
    sr = np.bincount(r, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sp + sr > 0, 2 * inter / (sp + sr), np.nan)


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one label between two label maps; NaN when absent from both."""
    p, r = _check_label_maps(pred, ref)
    a, b = p == label, r == label
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else math.nan


def iou(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = _check_label_maps(pred, ref)
    a, b = p == label, r == label
    u = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / u) if u else math.nan


def dice_onehot(y_pred: torch.Tensor, y: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """MONAI's DiceMetric on one-hot (B, C, ...) tensors, after checking they are one-hot.

    Returns (B, C') Dice with NaN for classes absent from both.
    """
    from monai.metrics import compute_dice

    for name, t in (("y_pred", y_pred), ("y", y)):
        if t.ndim < 3:
            raise ValueError(f"{name} must be one-hot (B, C, ...); got shape {tuple(t.shape)}")
        vals = torch.unique(t)
        if not bool(((vals == 0) | (vals == 1)).all()) or not torch.allclose(t.sum(1).float(), torch.ones(1)):
            raise ValueError(f"{name} is not one-hot (values must be 0/1 and sum to 1 over channels); "
                             "pass label maps to quicknat.metrics.evaluate_pair instead")
    return compute_dice(y_pred.float(), y.float(), include_background=include_background, ignore_empty=False)


def _box(mask: np.ndarray, margin: int = 2):
    start, stop = bounding_box(mask, margin)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASSD) in mm between two non-empty masks, through MONAI: the surface distances of
    both directions are computed once (MONAI's ``get_edge_surface_distance``) and give both
    numbers, as its ``compute_hausdorff_distance(percentile=95)`` and symmetric
    ``compute_average_surface_distance`` would, at half their cost."""
    from monai.metrics.utils import get_edge_surface_distance

    box = _box(a | b)
    pa = torch.from_numpy(np.ascontiguousarray(a[box]))
    pb = torch.from_numpy(np.ascontiguousarray(b[box]))
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI >= 1.5 warns about an argument its own code passes
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, dist, _ = get_edge_surface_distance(pa, pb, distance_metric="euclidean", spacing=sp, symmetric=True)
    dist = [d.double() for d in dist]
    hd95 = max(float(torch.quantile(d, 0.95)) if d.numel() else 0.0 for d in dist)
    both = torch.cat(dist)
    return hd95, float(both.mean()) if both.numel() else 0.0


@dataclass
class StructureScore:
    structure: str
    label: int
    status: str
    dice: float
    iou: float
    hd95: float
    assd: float
    volume_pred: float
    volume_ref: float
    volume_diff: float
    volume_similarity: float


def evaluate_pair(
    pred: np.ndarray,
    ref: np.ndarray,
    scheme: LabelScheme,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    surface: bool = True,
) -> list[StructureScore]:
    """Score every class of ``scheme`` (label maps of label IDs; IDs encoded by the scheme)."""
    p, r = _check_label_maps(pred, ref)
    pc, _ = scheme.encode(p)
    rc, _ = scheme.encode(r)
    n = scheme.num_classes
    flat_p, flat_r = pc.reshape(-1).astype(np.int64), rc.reshape(-1).astype(np.int64)
    inter = np.bincount(flat_p[flat_p == flat_r], minlength=n)
    cp = np.bincount(flat_p, minlength=n)
    cr = np.bincount(flat_r, minlength=n)
    vox = float(np.prod(spacing))
    out = []
    nan = math.nan
    for k, cl in enumerate(scheme.classes):
        vp, vr = cp[k] * vox, cr[k] * vox
        if cp[k] == 0 and cr[k] == 0:
            out.append(StructureScore(cl.name, cl.label, "absent", nan, nan, nan, nan, 0.0, 0.0, 0.0, nan))
            continue
        d = 2 * inter[k] / (cp[k] + cr[k])
        j = inter[k] / (cp[k] + cr[k] - inter[k])
        vs = 1 - abs(vp - vr) / (vp + vr)
        hd = asd = nan
        if k == 0:
            status = "background"
        elif cp[k] == 0:
            status = "missing_in_pred"
        elif cr[k] == 0:
            status = "missing_in_ref"
        else:
            status = "ok"
            if surface:
                hd, asd = surface_distances(pc == k, rc == k, spacing)
        out.append(StructureScore(cl.name, cl.label, status, float(d), float(j), hd, asd, vp, vr, vp - vr, float(vs)))
    return out


def foreground_mean(scores: list[StructureScore], metric: str = "dice") -> float:
    """Mean of a metric over foreground structures present in prediction or reference."""
    vals = [getattr(s, metric) for s in scores if s.status not in ("absent", "background")]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan
