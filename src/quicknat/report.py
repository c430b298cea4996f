"""Pictures: a scan with its segmentation in three orthogonal planes (FreeSurfer colours).

Panels are drawn from conformed (LIA) space so every scan looks the same way up: coronal and
axial panels are in radiological convention (the subject's right on the picture's left, marked
R and L), the sagittal panel has anterior on the right.
"""

from __future__ import annotations

import io as _io
import logging
from pathlib import Path

import numpy as np

from .conform import ConformSettings, plan_conform
from .io import Volume, atomic_write_bytes
from .labels import ASEG33, LabelScheme

log = logging.getLogger(__name__)


def _panels(image: np.ndarray, classes: np.ndarray | None, centre: tuple[int, int, int]):
    i, j, k = centre
    out = []
    for name, sl in (("coronal", np.s_[:, :, k]), ("axial", np.s_[:, j, :]), ("sagittal", np.s_[i, :, :])):
        img = image[sl]
        cls = None if classes is None else classes[sl]
        if name == "coronal":
            img, cls = img.T, (None if cls is None else cls.T)
        elif name == "axial":
            img, cls = np.flipud(img.T), (None if cls is None else np.flipud(cls.T))
        out.append((name, img, cls))
    return out


def _centre(image: np.ndarray, classes: np.ndarray | None) -> tuple[int, int, int]:
    mask = classes > 0 if classes is not None and (classes > 0).any() else image > 0.1
    if not mask.any():
        return tuple(s // 2 for s in image.shape)  # type: ignore[return-value]
    idx = np.argwhere(mask)
    centre = np.round(idx.mean(0)).astype(int)
    # the sagittal plane through the centre is the interhemispheric fissure: move it into a
    # hemisphere, a sixth of the brain's width off the midline
    width = idx[:, 0].max() - idx[:, 0].min()
    centre[0] = min(image.shape[0] - 1, centre[0] + width // 6)
    return tuple(int(v) for v in centre)  # type: ignore[return-value]


def _compact(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    ids, inv = np.unique(np.rint(labels).astype(np.int64), return_inverse=True)
    return inv.reshape(labels.shape).astype(np.int16), [int(v) for v in ids]


def render_overlay(
    image: np.ndarray,
    classes: np.ndarray | None,
    colors: np.ndarray,
    names: list[str],
    title: str = "",
) -> bytes:
    """PNG bytes of three planes of a conformed image with a class map over it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    centre = _centre(image, classes)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    for ax, (name, img, cls) in zip(axes, _panels(image, classes, centre)):
        ax.imshow(img, cmap="gray", vmin=0, vmax=max(float(np.percentile(image, 99.5)), 1e-6), interpolation="nearest")
        if cls is not None:
            rgba = np.zeros((*cls.shape, 4), dtype=np.float32)
            rgba[..., :3] = colors[cls] / 255.0
            rgba[..., 3] = np.where(cls > 0, 0.45, 0.0)
            ax.imshow(rgba, interpolation="nearest")
        ax.set_title(name, color="white")
        ax.axis("off")
        if name != "sagittal":
            ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=12)
            ax.text(0.95, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=12)
    if classes is not None:
        present = [int(c) for c in np.unique(classes) if c > 0]
        handles = [Patch(facecolor=colors[c] / 255.0, label=names[c]) for c in present]
        if handles:
            fig.legend(handles=handles, loc="center right", fontsize=7, ncol=1 if len(handles) <= 24 else 2,
                       facecolor="black", labelcolor="white", frameon=False)
    fig.suptitle(title, color="white")
    fig.subplots_adjust(left=0.01, right=0.80 if classes is not None else 0.99, top=0.9, bottom=0.02, wspace=0.02)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor="black")
    plt.close(fig)
    return buf.getvalue()


def save_overlay(
    image: Volume | None,
    seg: Volume | None,
    path: str | Path,
    scheme: LabelScheme | None = None,
    conformed: tuple[np.ndarray, np.ndarray] | None = None,
    title: str = "",
) -> Path:
    """Draw a scan (and a label map) in three planes through the brain's centre.

    Either ``conformed=(image, class map)`` already in conformed space with ``scheme``, or a
    native ``image`` and optional ``seg`` label map (any label IDs; FreeSurfer colours and names
    for aseg IDs) that are conformed here (labels through one-hot resampling, never interpolated).
    """
    if conformed is not None:
        img, classes = conformed
        scheme = scheme or ASEG33
        colors, names = scheme.colors, scheme.names
    else:
        assert image is not None
        plan = plan_conform(image, ConformSettings())
        img = plan.image(image.array)
        classes = None
        colors, names = ASEG33.colors, ASEG33.names
        if seg is not None:
            if seg.shape != image.shape or not np.allclose(seg.affine, image.affine, atol=1e-3):
                from .errors import QuicknatInputError

                raise QuicknatInputError(seg.path, "segmentation and image are on different grids")
            compact, ids = _compact(seg.array)
            classes = plan.classes(compact, len(ids))
            known = {c.label: c for c in ASEG33.classes}
            cmap = _fallback_colors(len(ids))
            colors = np.array([known[i].color if i in known else cmap[n] for n, i in enumerate(ids)], dtype=np.uint8)
            names = [known[i].name if i in known else f"label {i}" for i in ids]
    png = render_overlay(img, classes, colors, names, title)
    atomic_write_bytes(path, png)
    return Path(path)


def _fallback_colors(n: int) -> np.ndarray:
    import matplotlib

    cm = matplotlib.colormaps["tab20"]
    return (np.array([cm(i % 20)[:3] for i in range(n)]) * 255).astype(np.uint8)
