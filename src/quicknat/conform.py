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
import math
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .io import Volume

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


def _signed_permutation(m: np.ndarray, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """If m[:3,:3] is a signed permutation and m[:3,3] integral, return (perm, sign) else None."""
    rot = m[:3, :3]
    if not np.allclose(np.abs(rot).sum(axis=0), 1, atol=tol) or not np.allclose(np.abs(rot).max(axis=0), 1, atol=tol):
        return None
    perm = np.abs(rot).argmax(axis=0)
    if len(set(perm.tolist())) != 3:
        return None
    sign = np.sign(rot[perm, np.arange(3)])
    return perm, sign


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
        out = _map(scaled, self.to_native, self.shape, self.exact, mode="bilinear")
        return np.clip(out, 0.0, 1.0, out=out)

    def classes(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """Native class map -> conformed class map (exact, or through one-hot probabilities)."""
        if self.exact:
            return _map(class_map, self.to_native, self.shape, True).astype(class_map.dtype)
        return _argmax_resample(class_map, num_classes, self.to_native, self.shape).astype(class_map.dtype)

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
                probs[int(c)] = torch.from_numpy(_map(onehot.numpy(), self.to_native, self.shape, True)).float()
                continue
            box = _foreground_box(self.to_native, onehot.numpy(), self.shape)
            if box is None:
                continue
            start, stop = box
            region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            sub = tuple(int(v) for v in stop - start)
            probs[(int(c), *region)] = _resample(onehot.float(), _sub_matrix(self.to_native, start), sub, "bilinear")
        probs[0] = (1.0 - probs[1:].sum(0)).clamp_(0.0, 1.0)
        return probs

    # -- back --------------------------------------------------------------------------------
    def classes_to_native(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """Conformed class map -> native grid (exact, or through one-hot probabilities)."""
        if self.exact:
            return _map(class_map, self.from_native, self.native_shape, True).astype(class_map.dtype)
        return _argmax_resample(class_map, num_classes, self.from_native, self.native_shape).astype(
            class_map.dtype
        )

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
                return _map(cls, self.from_native, self.native_shape, True)
            out = _map(p.numpy(), self.from_native, self.native_shape, True)
            out[0][out.sum(0) == 0] = 1.0
            return out
        if argmax_only:
            return _prob_argmax_resample(p, self.from_native, self.native_shape, fast=fast)
        out = _resample(p.float(), self.from_native, self.native_shape, "bilinear", separable=fast).numpy()
        out[0] += np.clip(1.0 - out.sum(0), 0, 1)
        return out


def plan_conform(volume: Volume, settings: ConformSettings = ConformSettings()) -> ConformPlan:
    """Compute how ``volume`` maps onto the conformed grid (no resampling yet)."""
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
    sp = _signed_permutation(to_native)
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


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, stop) voxel indices of a 3D mask's bounding box grown by ``margin`` and clipped
    to the array (stop exclusive), or None for an empty mask. The one box helper of quicknat."""
    mask = np.asarray(mask)
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    start = np.maximum(np.array(lo) - margin, 0)
    stop = np.minimum(np.array(hi) + margin, np.array(mask.shape))
    return start, stop


def _head_centre(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    box = bounding_box(np.asarray(array) > lo + 0.05 * (hi - lo))
    if box is None:
        return (np.array(array.shape) - 1) / 2.0
    return (box[0] + box[1] - 1) / 2.0


# -- mapping kernels -------------------------------------------------------------------------
def _map(array: np.ndarray, m: np.ndarray, out_shape, exact: bool, mode: str = "nearest") -> np.ndarray:
    """Map the last three axes of ``array`` onto ``out_shape`` through out-voxel -> in-voxel ``m``."""
    if exact:
        return _permute_crop(array, m, tuple(out_shape))
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return _resample(t, m, tuple(out_shape), mode).numpy()


def _permute_crop(array: np.ndarray, m: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    sp = _signed_permutation(m)
    assert sp is not None, "exact mapping needs a signed permutation"
    perm, sign = sp
    lead = array.ndim - 3
    arr = np.transpose(array, (*range(lead), *(lead + p for p in perm)))
    offset = np.round(m[perm, 3]).astype(int)
    for k in range(3):
        if sign[k] < 0:
            arr = np.flip(arr, axis=lead + k)
            offset[k] = arr.shape[lead + k] - 1 - offset[k]
    out = np.zeros(array.shape[:lead] + tuple(out_shape), dtype=array.dtype)
    src, dst = [], []
    for k in range(3):
        n_in, n_out, o = arr.shape[lead + k], out_shape[k], offset[k]
        start_out = max(0, -o)
        stop_out = min(n_out, n_in - o)
        if stop_out <= start_out:
            return out
        dst.append(slice(start_out, stop_out))
        src.append(slice(start_out + o, stop_out + o))
    out[(..., *dst)] = arr[(..., *src)]
    return out


def _grid(m: np.ndarray, in_shape, out_shape, i0: int, i1: int) -> torch.Tensor:
    """Sampling grid for output rows i0:i1, normalised for align_corners=True."""
    i = torch.arange(i0, i1, dtype=torch.float64)
    j = torch.arange(out_shape[1], dtype=torch.float64)
    k = torch.arange(out_shape[2], dtype=torch.float64)
    mt = torch.from_numpy(m)
    coords = []
    for a in range(3):
        c = (mt[a, 0] * i)[:, None, None] + (mt[a, 1] * j)[None, :, None] + (mt[a, 2] * k)[None, None, :] + mt[a, 3]
        coords.append(c * (2.0 / (in_shape[a] - 1)) - 1.0)
    # grid_sample's last dim is (x=W, y=H, z=D) = (in axis 2, in axis 1, in axis 0)
    return torch.stack([coords[2], coords[1], coords[0]], dim=-1).to(torch.float32)[None]


def _foreground_box(m_out_to_in: np.ndarray, in_mask: np.ndarray, out_shape, margin: int = 2):
    """Bounding box in the output grid that covers the input's mask (plus margin), or None."""
    box = bounding_box(in_mask)
    if box is None:
        return None
    lo, hi = _box_through(np.linalg.inv(m_out_to_in), *box)
    start = np.maximum(np.floor(lo).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(hi).astype(int) + margin + 1, np.array(out_shape))
    if np.any(stop <= start):
        return None
    return start, stop


def _sub_matrix(m: np.ndarray, start: np.ndarray) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = start
    return m @ shift



def _box_through(m: np.ndarray, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """Real-valued (min, max) corners of the box ``start:stop`` (stop exclusive) mapped through ``m``."""
    lo, hi = np.asarray(start, dtype=float), np.asarray(stop, dtype=float) - 1
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    pts = (m @ corners.T).T[:, :3]
    return pts.min(0), pts.max(0)


def _source_box(m: np.ndarray, start, stop, in_shape) -> tuple[np.ndarray, np.ndarray] | None:
    """The input voxels that trilinear sampling of output box ``start:stop`` can touch, or None."""
    lo, hi = _box_through(m, start, stop)
    a = np.maximum(np.floor(lo).astype(int), 0)
    b = np.minimum(np.floor(hi).astype(int) + 2, np.array(in_shape))
    return None if np.any(b <= a) else (a, b)


def _axis_aligned(m: np.ndarray, tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(perm, scale, offset) when every output axis of out->in matrix ``m`` moves along one input
    axis (any voxel sizes, flips and shifts, no rotation): input axis ``perm[k]`` is at
    ``scale[k] * i + offset[k]`` for output index ``i`` on axis ``k``. Else None."""
    nz = np.abs(m[:3, :3]) > tol
    if not ((nz.sum(0) == 1).all() and (nz.sum(1) == 1).all()):
        return None
    perm = nz.argmax(0)
    return perm, m[perm, np.arange(3)], m[perm, 3]


def _lerp_axis(x: torch.Tensor, dim: int, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at float64 source ``coords``; zero outside
    (each out-of-range tap contributes zero, as grid_sample's zero padding does)."""
    n = x.shape[dim]
    f = torch.floor(coords)
    w = coords - f
    i0 = f.long()
    i1 = i0 + 1
    w0 = ((1.0 - w) * ((i0 >= 0) & (i0 < n))).float()
    w1 = (w * ((i1 >= 0) & (i1 < n))).float()
    shape = [1] * x.ndim
    shape[dim] = -1
    out = x.index_select(dim, i0.clamp(0, n - 1)).mul_(w0.view(shape))
    return out.add_(x.index_select(dim, i1.clamp(0, n - 1)).mul_(w1.view(shape)))


def _separable(src: torch.Tensor, aa, out_shape, i0: int, i1: int) -> torch.Tensor:
    """Trilinear resampling of (C, X, Y, Z) ``src`` for output rows ``i0:i1`` when the mapping is
    axis-aligned: three 1D interpolations, each on the input voxels it needs. Same values as
    grid_sample (bilinear, zeros, align_corners=True) up to float rounding; several times faster."""
    perm, scale, offset = aa
    x = src.permute(0, *(1 + int(p) for p in perm))  # input axes in output order
    ranges = ((i0, i1), (0, out_shape[1]), (0, out_shape[2]))
    coords = []
    for k, (a, b) in enumerate(ranges):  # first cut the input to the voxels each axis needs
        c = float(scale[k]) * torch.arange(a, b, dtype=torch.float64) + float(offset[k])
        n = x.shape[1 + k]
        lo = max(0, int(math.floor(float(c.min()))))
        hi = min(n, int(math.floor(float(c.max()))) + 2)
        if hi <= lo:
            return torch.zeros((src.shape[0], i1 - i0, out_shape[1], out_shape[2]))
        x = x.narrow(1 + k, lo, hi - lo)
        coords.append(c - lo)
    # Innermost axis first, while the data are smallest: gathers along it are the dearest.
    for k in (2, 1, 0):
        x = _lerp_axis(x, 1 + k, coords[k])
    return x


def _resample(
    t: torch.Tensor, m: np.ndarray, out_shape, mode: str, chunk: int = 16, separable: bool = True
) -> torch.Tensor:
    """Resample (X,Y,Z) or (C,X,Y,Z) tensor through out->in voxel matrix ``m``; zeros outside.

    Trilinear resampling along axis-aligned mappings (e.g. 2 mm -> 1 mm, any orientation) takes
    the separable route; rotations and nearest-neighbour go through ``grid_sample``
    (:func:`_resample_grid`, the reference), ``chunk`` output rows at a time.
    """
    squeeze = t.ndim == 3
    src = (t[None] if squeeze else t).float()  # (C, X, Y, Z)
    aa = _axis_aligned(m) if mode == "bilinear" and separable else None
    if aa is None:
        out = _resample_grid(src, m, out_shape, mode, chunk)
    else:
        out = torch.empty((src.shape[0], *out_shape), dtype=torch.float32)
        for i0 in range(0, out_shape[0], chunk):
            i1 = min(out_shape[0], i0 + chunk)
            out[:, i0:i1] = _separable(src, aa, out_shape, i0, i1)
    return out[0] if squeeze else out


def _resample_grid(src: torch.Tensor, m: np.ndarray, out_shape, mode: str, chunk: int = 16) -> torch.Tensor:
    """(C, X, Y, Z) resampled with ``grid_sample`` (align_corners=True, zeros outside)."""
    out = torch.empty((src.shape[0], *out_shape), dtype=torch.float32)
    for i0 in range(0, out_shape[0], chunk):
        i1 = min(out_shape[0], i0 + chunk)
        g = _grid(m, src.shape[1:], out_shape, i0, i1)
        out[:, i0:i1] = F.grid_sample(src[None], g, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out


def _slab_argmax(channels, m: np.ndarray, in_shape, out_shape, chunk: int = 16, separable: bool = True) -> np.ndarray:
    """Argmax over trilinearly resampled class channels, slab by slab of the output grid.

    ``channels(start, stop)`` returns ``(class ids, (K, ...) float tensor)`` for the input box
    ``start:stop``: only the classes present there. For each slab of ``chunk`` output rows,
    only the input box that trilinear sampling touches is read, and only the classes present
    in it are resampled; output voxels outside the input's footprint are class 0.
    """
    shape = tuple(int(s) for s in out_shape)
    out = torch.zeros(shape, dtype=torch.int16)
    inv = np.linalg.inv(m)
    lo, hi = _box_through(inv, np.zeros(3), np.asarray(in_shape))
    start = np.maximum(np.floor(lo).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(hi).astype(int) + 2, np.array(shape))
    if np.any(stop <= start):
        return out.numpy()
    for a in range(int(start[0]), int(stop[0]), chunk):
        s0 = np.array([a, start[1], start[2]])
        s1 = np.array([min(a + chunk, int(stop[0])), stop[1], stop[2]])
        box = _source_box(m, s0, s1, in_shape)
        if box is None:
            continue
        ids, src = channels(*box)
        if len(ids) == 0:
            continue
        sub = _sub_matrix(m, s0)  # slab index -> index in the input box
        sub[:3, 3] -= box[0]
        r = _resample(src, sub, tuple(int(v) for v in s1 - s0), "bilinear", chunk=chunk, separable=separable)
        best, arg = r.max(0)
        cls = torch.as_tensor(ids, dtype=torch.int16)[arg]
        cls[best <= 0] = 0
        out[a : s1[0], s0[1] : s1[1], s0[2] : s1[2]] = cls
    return out.numpy()


def _prob_argmax_resample(
    probs: torch.Tensor, m: np.ndarray, out_shape, threshold: float = 1e-3, fast: bool = True
) -> np.ndarray:
    """Argmax of trilinearly resampled class probabilities (C, X, Y, Z) on the output grid.

    Fast route: classes whose probability stays below ``threshold`` in a slab's input box are
    skipped (when the probabilities sum to one over at most a few hundred classes, such a class
    cannot be the argmax there), and axis-aligned mappings are resampled separably. Reference
    route (``fast=False``): every class through ``grid_sample``.
    """
    p = probs.float()
    dtype = np.uint8 if p.shape[0] <= 256 else np.int16

    def channels(a, b):
        region = p[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        if not fast:
            return list(range(p.shape[0])), region
        ids = (region.amax(dim=(1, 2, 3)) > threshold).nonzero().flatten()
        return ids.tolist(), region.index_select(0, ids)

    return _slab_argmax(channels, m, p.shape[1:], out_shape, separable=fast).astype(dtype)


def _argmax_resample(class_map: np.ndarray, num_classes: int, m: np.ndarray, out_shape) -> np.ndarray:
    """Resample a class map through one-hot probabilities (the classes present, slab by slab)."""
    cm = torch.from_numpy(np.ascontiguousarray(class_map)).long()
    dtype = np.uint8 if num_classes <= 256 else np.int16

    def channels(a, b):
        region = cm[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        ids = torch.unique(region)
        return ids.tolist(), (region[None] == ids[:, None, None, None]).float()

    return _slab_argmax(channels, m, cm.shape, out_shape).astype(dtype)
