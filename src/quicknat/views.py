"""The three views of QuickNAT, in one table. Nothing else in quicknat branches on a view name.

Conformed volumes are LIA (see :mod:`quicknat.conform`): axis 0 runs right->left, axis 1
superior->inferior, axis 2 posterior->anterior. A view's slices are taken along its ``axis``:

=========  ====  ======  =========================================================
view       axis  weight  notes
=========  ====  ======  =========================================================
coronal    2     0.4     slices perpendicular to the anterior-posterior axis
axial      1     0.4     slices perpendicular to the superior-inferior axis
sagittal   0     0.2     left/right pairs merged (a sagittal slice has no side)
=========  ====  ======  =========================================================

The weights are QuickNAT's (Roy et al. 2019) aggregation weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .labels import LabelScheme

if TYPE_CHECKING:  # torch is not imported at run time: the CLI reads this table before any work
    import torch


@dataclass(frozen=True)
class ViewSpec:
    name: str
    axis: int
    weight: float
    merge_lr: bool = False
    transpose: bool = False  # for display: (rows, cols) of a slice are its (second, first) axes
    flip_rows: bool = False  # for display: then flipped top to bottom

    @property
    def lateral_in_plane(self) -> bool:
        """Whether this view's slices contain the left-right axis (conformed axis 0)."""
        return self.axis != 0

    def display(self, plane: np.ndarray) -> np.ndarray:
        """A slice (as :meth:`slice_of` gives it) in the usual display orientation: coronal and
        axial radiological (the subject's right on the left), superior or anterior at the top."""
        out = np.swapaxes(plane, 0, 1) if self.transpose else plane  # (H, W) or (H, W, colour)
        return np.flipud(out) if self.flip_rows else out

    def scheme(self, full: LabelScheme) -> LabelScheme:
        """The label scheme this view's network predicts."""
        return full.merged_lr() if self.merge_lr else full

    def merge_index(self, full: LabelScheme) -> np.ndarray:
        """For each class of ``full``, its class in this view's scheme (identity unless merged)."""
        return full.lr_merge_index() if self.merge_lr else np.arange(full.num_classes)

    def slice_of(self, volume: np.ndarray | torch.Tensor, index: int):
        """Slice ``index`` of a (..., X, Y, Z) volume along this view's axis (shares memory)."""
        return slices(volume, self)[index]

    def expand_index(self, full: LabelScheme) -> np.ndarray | None:
        """Index that expands this view's class probabilities to ``full`` (None: identity)."""
        return full.lr_merge_index() if self.merge_lr and full.has_lateral_pairs else None


VIEWS: dict[str, ViewSpec] = {
    "coronal": ViewSpec("coronal", axis=2, weight=0.4, transpose=True),
    "axial": ViewSpec("axial", axis=1, weight=0.4, transpose=True, flip_rows=True),
    "sagittal": ViewSpec("sagittal", axis=0, weight=0.2, merge_lr=True),
}
VIEW_NAMES = tuple(VIEWS)


def get_view(name: str) -> ViewSpec:
    try:
        return VIEWS[name]
    except KeyError:
        raise ValueError(f"unknown view {name!r}; choose from {', '.join(VIEWS)}") from None


def slices(volume: np.ndarray | torch.Tensor, view: str | ViewSpec):
    """View of a (..., X, Y, Z) array as a stack of 2D slices: (N, ..., H, W) along the view's axis."""
    spec = get_view(view) if isinstance(view, str) else view
    axis = volume.ndim - 3 + spec.axis
    if not isinstance(volume, np.ndarray):  # a torch tensor
        return volume.movedim(axis, 0)
    return np.moveaxis(volume, axis, 0)


def with_context(stack, index, context: int):
    """Slices ``index`` (a list of positions) of a (N, H, W) stack, each with its ``context``
    neighbours on either side as channels: (len(index), 2 * context + 1, H, W), channel ``k``
    holding slice ``i + k - context`` (clamped to the stack's ends). The input of a 2.5D
    network (FastSurfer's thick slices): every training set, validation and inference builds its
    input here."""
    offsets = range(-context, context + 1)
    n = stack.shape[0]
    rows = [[min(max(i + d, 0), n - 1) for d in offsets] for i in index]
    if isinstance(stack, np.ndarray):
        return stack[np.asarray(rows, dtype=np.int64).reshape(len(rows), len(offsets))]
    import torch

    return stack[torch.as_tensor(rows, dtype=torch.long).reshape(len(rows), len(offsets))]


def channel_view(accumulator: torch.Tensor, view: str | ViewSpec) -> torch.Tensor:
    """A (C, X, Y, Z) accumulator seen as (N, C, H, W) slices of ``view`` (shares memory)."""
    spec = get_view(view) if isinstance(view, str) else view
    return accumulator.movedim(1 + spec.axis, 0)


def slice_box(box: tuple[slice, slice, slice], view: str | ViewSpec) -> tuple[slice, tuple[slice, slice]]:
    """A 3D box (one slice per axis) as (the slices along the view's axis, the in-plane window
    (H, W) of each slice), matching :func:`slices` and :func:`channel_view`."""
    spec = get_view(view) if isinstance(view, str) else view
    h, w = (box[a] for a in range(3) if a != spec.axis)
    return box[spec.axis], (h, w)
