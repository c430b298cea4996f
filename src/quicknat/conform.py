"""Conform a scan for the network, and map results back onto the scan's own grid exactly.

Conformed space (defaults, see :class:`ConformSettings`): orientation LIA (FreeSurfer's
conformed space: first axis right->left, second superior->inferior, third posterior->anterior),
1 mm isotropic voxels, 256³ voxels centred on the head.

* **Geometry.** :func:`plan_conform` computes the target grid and the matrix from conformed
  voxel indices to native voxel indices. When that matrix is a signed permutation with integer
  offsets (any axis-aligned scan already at the target voxel size, in any orientation), the
  target grid is snapped onto the native voxels and all mappings are exact index operations
  (transpose, flip, crop/pad): no interpolation at all. Otherwise images are resampled
  trilinearly and class maps through one-hot probabilities (never by interpolating label IDs).
* **Intensity.** ``lo`` is the 0.5th percentile of all voxels, ``hi`` the 99.5th percentile of
  the voxels above ``lo`` (both configurable); intensities become ``clip((x - lo) / (hi - lo),
  0, 1)``. Percentiles are taken on native voxels (a strided subsample of at most ~2 M voxels),
  so the padding of the conformed field of view does not shift them.
* **Centre.** The head's bounding box (voxels above 5 % of the scaled range) is centred in the
  conformed field of view, so a field of view larger than 256 mm is cropped around the head.
* **Back.** :meth:`ConformPlan.probs_to_native` / :meth:`ConformPlan.classes_to_native` return
  arrays with exactly the native shape; the caller keeps the native affine and header, so the
  output geometry equals the input geometry by construction.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .errors import QuicknatInputError
from .io import Volume
from .resample import (
    argmax_resample,
    bounding_box,
    foreground_box,
    map_array,
    prob_argmax_resample,
    resample,
    signed_permutation,
    sub_matrix,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConformSettings:
    """How scans are conformed; stored in every checkpoint so training and use agree."""

    voxel_size: float = 1.0
    shape: tuple[int, int, int] = (256, 256, 256)
    orientation: str = "LIA"
    percentiles: tuple[float, float] = (0.5, 99.5)
    center: str = "head"  # "head" (bounding box of the head) or "volume" (native FOV centre)

    def __post_init__(self) -> None:
        if self.voxel_size <= 0:
            raise ValueError("voxel_size must be positive")
        if len(self.shape) != 3 or min(self.shape) < 2:
            raise ValueError("shape must be three sizes >= 2")
        if self.center not in ("head", "volume"):
            raise ValueError("center must be 'head' or 'volume'")
        nib.orientations.axcodes2ornt(tuple(self.orientation))  # validates

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformSettings:
        return cls(
            voxel_size=float(d["voxel_size"]),
            shape=tuple(int(s) for s in d["shape"]),  # type: ignore[arg-type]
            orientation=str(d["orientation"]),
            percentiles=tuple(float(p) for p in d["percentiles"]),  # type: ignore[arg-type]
            center=str(d.get("center", "head")),
        )


def target_rotation(settings: ConformSettings) -> np.ndarray:
    """3x3 matrix whose columns are the conformed axes' world steps (mm)."""
    ornt = nib.orientations.axcodes2ornt(tuple(settings.orientation))
    rot = np.zeros((3, 3))
    for axis, (world_axis, sign) in enumerate(ornt):
        rot[int(world_axis), axis] = sign * settings.voxel_size
    return rot


def intensity_window(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust (lo, hi) intensity window, as documented in the module docstring."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, int(np.ceil(flat.size / 2_000_000)))
    sample = flat[::step].astype(np.float32, copy=False)
    lo = float(np.percentile(sample, percentiles[0]))
    above = sample[sample > lo]
    hi = float(np.percentile(above, percentiles[1])) if above.size else lo
    if not hi > lo:
        hi = float(sample.max()) if sample.max() > lo else lo + 1.0
    return lo, hi


def scale_intensity(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass
class ConformPlan:
    """The geometry and intensity window of one scan's conform, and its inverse."""

    settings: ConformSettings
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    affine: np.ndarray  # conformed voxel -> world
    to_native: np.ndarray  # conformed voxel -> native voxel (4x4)
    exact: bool
    window: tuple[float, float]
    grid_shape: tuple[int, int, int] | None = None  # None: settings.shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid_shape or self.settings.shape

    def crop(self, start, stop) -> ConformPlan:
        """The same plan on the sub-grid ``start:stop`` of the conformed grid."""
        start = np.asarray(start, dtype=int)
        shift = np.eye(4)
        shift[:3, 3] = start
        return ConformPlan(
            self.settings, self.native_shape, self.native_affine, self.affine @ shift,
            self.to_native @ shift, self.exact, self.window,
            tuple(int(b - a) for a, b in zip(start, stop)),  # type: ignore[arg-type]
        )

    @property
    def from_native(self) -> np.ndarray:
        return np.linalg.inv(self.to_native)

    # -- forward -----------------------------------------------------------------------------
    def image(self, array: np.ndarray) -> np.ndarray:
        """Native image -> conformed, intensity-scaled float32 array."""
        scaled = scale_intensity(array, self.window)
        out = map_array(scaled, self.to_native, self.shape, self.exact, mode="bilinear")
        return np.clip(out, 0.0, 1.0, out=out)

    def classes(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """Native class map -> conformed class map (exact, or through one-hot probabilities)."""
        if self.exact:
            return map_array(class_map, self.to_native, self.shape, True).astype(class_map.dtype)
        return argmax_resample(class_map, num_classes, self.to_native, self.shape).astype(class_map.dtype)

    def onehot(self, class_map: np.ndarray, num_classes: int) -> torch.Tensor:
        """Native class map -> conformed one-hot probabilities (C, X, Y, Z), float32.

        Each class is resampled trilinearly inside its own bounding box; background is one
        minus the rest. This is the soft route a network's output takes, in reverse.
        """
        probs = torch.zeros((num_classes, *self.shape))
        cm = torch.from_numpy(np.ascontiguousarray(class_map))
        for c in np.unique(class_map):
            if c == 0:
                continue
            onehot = cm == int(c)
            if self.exact:
                probs[int(c)] = torch.from_numpy(map_array(onehot.numpy(), self.to_native, self.shape, True)).float()
                continue
            box = foreground_box(self.to_native, onehot.numpy(), self.shape)
            if box is None:
                continue
            start, stop = box
            region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            sub = tuple(int(v) for v in stop - start)
            probs[(int(c), *region)] = resample(onehot.float(), sub_matrix(self.to_native, start), sub, "bilinear")
        probs[0] = (1.0 - probs[1:].sum(0)).clamp_(0.0, 1.0)
        return probs

    # -- back --------------------------------------------------------------------------------
    def classes_to_native(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """Conformed class map -> native grid (exact, or through one-hot probabilities)."""
        if self.exact:
            return map_array(class_map, self.from_native, self.native_shape, True).astype(class_map.dtype)
        return argmax_resample(class_map, num_classes, self.from_native, self.native_shape).astype(
            class_map.dtype
        )

    def scalar_to_native(self, values: np.ndarray | torch.Tensor, fast: bool = True) -> np.ndarray:
        """A conformed scalar map (X, Y, Z), e.g. uncertainty -> native grid, float32 (linear)."""
        v = torch.as_tensor(values).float()
        if self.exact:
            return map_array(v.numpy(), self.from_native, self.native_shape, True)
        return resample(v, self.from_native, self.native_shape, "bilinear", separable=fast).numpy()

    def probs_to_native(
        self, probs: np.ndarray | torch.Tensor, argmax_only: bool = True, fast: bool = True
    ) -> np.ndarray:
        """Conformed class probabilities (C, X, Y, Z) -> native class map (argmax_only) or probs.

        Voxels of the native grid outside the conformed field of view get class 0 (probability
        1 for background). ``fast=False`` takes the reference route (every class through
        ``grid_sample``), against which the fast one is tested.
        """
        p = torch.as_tensor(probs)
        if self.exact:
            cls = p.argmax(0).to(torch.uint8 if p.shape[0] <= 256 else torch.int16).numpy()
            if argmax_only:
                return map_array(cls, self.from_native, self.native_shape, True)
            out = map_array(p.numpy(), self.from_native, self.native_shape, True)
            out[0][out.sum(0) == 0] = 1.0
            return out
        if argmax_only:
            return prob_argmax_resample(p, self.from_native, self.native_shape, fast=fast)
        out = resample(p.float(), self.from_native, self.native_shape, "bilinear", separable=fast).numpy()
        out[0] += np.clip(1.0 - out.sum(0), 0, 1)
        return out


def check_intensities(volume: Volume) -> None:
    """Refuse an image with nothing to segment: constant (all zero, say), or with intensities
    so large (beyond 1e30) that they cannot be scaled in float32 without overflowing."""
    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        raise QuicknatInputError(volume.path, f"is a constant image (every voxel is {lo:g}); nothing to segment")
    if max(abs(lo), abs(hi)) > 1e30:
        raise QuicknatInputError(volume.path, f"has intensities up to {max(abs(lo), abs(hi)):.3g}, beyond what "
                                              "float32 can scale (rescale the image)")


def plan_conform(volume: Volume, settings: ConformSettings = ConformSettings()) -> ConformPlan:
    """Compute how ``volume`` maps onto the conformed grid (no resampling yet); an image with no
    usable intensity range is refused (:func:`check_intensities`)."""
    check_intensities(volume)
    window = intensity_window(volume.array, settings.percentiles)
    native_affine = np.asarray(volume.affine, dtype=np.float64)
    shape = np.array(settings.shape)
    rot = target_rotation(settings)

    if settings.center == "head":
        centre_vox = _head_centre(volume.array, window)
    else:
        centre_vox = (np.array(volume.shape) - 1) / 2.0
    centre_world = native_affine[:3, :3] @ centre_vox + native_affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre_world - rot @ ((shape - 1) / 2.0)

    to_native = np.linalg.inv(native_affine) @ affine
    sp = signed_permutation(to_native)
    exact = False
    if sp is not None:
        # Snap the conformed grid onto native voxels: shift by < 1 voxel, then exact.
        snapped = to_native.copy()
        snapped[:3, :3] = np.round(snapped[:3, :3])
        snapped[:3, 3] = np.round(snapped[:3, 3])
        to_native = snapped
        affine = native_affine @ to_native
        exact = True
    log.debug("conform plan: exact=%s window=%s", exact, window)
    return ConformPlan(settings, volume.shape, native_affine, affine, to_native, exact, window)


def conform(volume: Volume, settings: ConformSettings = ConformSettings()) -> tuple[np.ndarray, ConformPlan]:
    """Conform a scan: returns the conformed float32 image in [0, 1] and its plan."""
    plan = plan_conform(volume, settings)
    return plan.image(volume.array), plan


def _head_centre(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    box = bounding_box(np.asarray(array) > lo + 0.05 * (hi - lo))
    if box is None:
        return (np.array(array.shape) - 1) / 2.0
    return (box[0] + box[1] - 1) / 2.0
