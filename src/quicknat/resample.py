"""Resampling kernels: volumes and class probabilities from one voxel grid onto another.

Every mapping takes the 4x4 matrix from *output* voxel indices to *input* voxel indices.

* Signed permutations with integer offsets (axis-aligned grids at the same voxel size, in any
  orientation) are exact index operations: transpose, flip, crop/pad (:func:`map_array` with
  ``exact``).
* Axis-aligned mappings with other voxel sizes run as three 1D linear interpolations
  (:func:`resample` with ``separable``); anything else (rotations) through ``grid_sample``.
* Class maps travel as probabilities, never as interpolated label IDs: :func:`argmax_resample`
  and :func:`prob_argmax_resample` resample tile by tile and only the classes present in each
  tile's source box (a class below 1e-3 there cannot win the argmax, so this is exact).

:mod:`quicknat.conform` builds its plans on these; :func:`bounding_box` is quicknat's one box
helper.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F


def signed_permutation(m: np.ndarray, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """If m[:3,:3] is a signed permutation and m[:3,3] integral, return (perm, sign) else None."""
    rot = m[:3, :3]
    if not np.allclose(np.abs(rot).sum(axis=0), 1, atol=tol) or not np.allclose(np.abs(rot).max(axis=0), 1, atol=tol):
        return None
    perm = np.abs(rot).argmax(axis=0)
    if len(set(perm.tolist())) != 3:
        return None
    sign = np.sign(rot[perm, np.arange(3)])
    return perm, sign


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



# -- mapping kernels -------------------------------------------------------------------------
def map_array(array: np.ndarray, m: np.ndarray, out_shape, exact: bool, mode: str = "nearest") -> np.ndarray:
    """Map the last three axes of ``array`` onto ``out_shape`` through out-voxel -> in-voxel ``m``."""
    if exact:
        return _permute_crop(array, m, tuple(out_shape))
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return resample(t, m, tuple(out_shape), mode).numpy()


def _permute_crop(array: np.ndarray, m: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    sp = signed_permutation(m)
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


def foreground_box(m_out_to_in: np.ndarray, in_mask: np.ndarray, out_shape, margin: int = 2):
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


def sub_matrix(m: np.ndarray, start: np.ndarray) -> np.ndarray:
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
    if np.any(b <= a):
        return None
    # at least two voxels along each axis where the input has them (grid_sample's normalisation
    # divides by the box's size - 1; a box at the input's last voxel would otherwise hold one)
    b = np.minimum(np.maximum(b, a + 2), np.array(in_shape))
    return np.minimum(a, np.maximum(b - 2, 0)), b


def covering_box(m: np.ndarray, out_shape, in_shape) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of the input voxels that trilinear sampling of a whole ``out_shape`` grid
    through out->in matrix ``m`` touches, clipped to ``in_shape`` (the whole input if none)."""
    box = _source_box(m, np.zeros(3, dtype=int), np.asarray(out_shape), in_shape)
    return box if box is not None else (np.zeros(3, dtype=int), np.asarray(in_shape))


def axis_aligned(m: np.ndarray, tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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


def resample(
    t: torch.Tensor, m: np.ndarray, out_shape, mode: str, chunk: int = 16, separable: bool = True
) -> torch.Tensor:
    """Resample (X,Y,Z) or (C,X,Y,Z) tensor through out->in voxel matrix ``m``; zeros outside.

    Trilinear resampling along axis-aligned mappings (e.g. 2 mm -> 1 mm, any orientation) takes
    the separable route; rotations and nearest-neighbour go through ``grid_sample``
    (:func:`resample_grid`, the reference), ``chunk`` output rows at a time.
    """
    squeeze = t.ndim == 3
    src = (t[None] if squeeze else t).float()  # (C, X, Y, Z)
    aa = axis_aligned(m) if mode == "bilinear" and separable else None
    if aa is None:
        out = resample_grid(src, m, out_shape, mode, chunk)
    else:
        out = torch.empty((src.shape[0], *out_shape), dtype=torch.float32)
        for i0 in range(0, out_shape[0], chunk):
            i1 = min(out_shape[0], i0 + chunk)
            out[:, i0:i1] = _separable(src, aa, out_shape, i0, i1)
    return out[0] if squeeze else out


def resample_grid(src: torch.Tensor, m: np.ndarray, out_shape, mode: str, chunk: int = 16) -> torch.Tensor:
    """(C, X, Y, Z) resampled with ``grid_sample`` (align_corners=True, zeros outside)."""
    out = torch.empty((src.shape[0], *out_shape), dtype=torch.float32)
    for i0 in range(0, out_shape[0], chunk):
        i1 = min(out_shape[0], i0 + chunk)
        g = _grid(m, src.shape[1:], out_shape, i0, i1)
        out[:, i0:i1] = F.grid_sample(src[None], g, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out


def _tile_argmax(channels, m: np.ndarray, in_shape, out_shape, chunk: int = 16, separable: bool = True,
                 tile: int = 64) -> np.ndarray:
    """Argmax over trilinearly resampled class channels, tile by tile of the output grid.

    ``channels(start, stop)`` returns ``(class ids, (K, ...) float tensor)`` for the input box
    ``start:stop``: only the classes present there. For each tile of ``chunk`` x ``tile`` x
    ``tile`` output voxels, only the input box that trilinear sampling touches is read, and only
    the classes present in it are resampled (a tile holds a few of a brain's structures, a
    whole slab most of them); output voxels outside the input's footprint are class 0.
    """
    shape = tuple(int(s) for s in out_shape)
    out = torch.zeros(shape, dtype=torch.int16)
    inv = np.linalg.inv(m)
    lo, hi = _box_through(inv, np.zeros(3), np.asarray(in_shape))
    start = np.maximum(np.floor(lo).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(hi).astype(int) + 2, np.array(shape))
    if np.any(stop <= start):
        return out.numpy()
    corners = itertools.product(*(range(int(start[k]), int(stop[k]), chunk if k == 0 else tile) for k in range(3)))
    for corner in corners:
        s0 = np.array(corner)
        s1 = np.minimum(s0 + np.array([chunk, tile, tile]), stop)
        box = _source_box(m, s0, s1, in_shape)
        if box is None:
            continue
        ids, src = channels(*box)
        if len(ids) == 0:
            continue
        sub = sub_matrix(m, s0)  # tile index -> index in the input box
        sub[:3, 3] -= box[0]
        r = resample(src, sub, tuple(int(v) for v in s1 - s0), "bilinear", chunk=chunk, separable=separable)
        best, arg = r.max(0)
        cls = torch.as_tensor(ids, dtype=torch.int16)[arg]
        cls[best <= 0] = 0
        out[s0[0] : s1[0], s0[1] : s1[1], s0[2] : s1[2]] = cls
    return out.numpy()


def prob_argmax_resample(
    probs: torch.Tensor, m: np.ndarray, out_shape, threshold: float = 1e-3, fast: bool = True
) -> np.ndarray:
    """Argmax of trilinearly resampled class probabilities (C, X, Y, Z) on the output grid.

    Fast route: classes whose probability stays below ``threshold`` in a tile's input box are
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

    return _tile_argmax(channels, m, p.shape[1:], out_shape, separable=fast).astype(dtype)


def argmax_resample(class_map: np.ndarray, num_classes: int, m: np.ndarray, out_shape) -> np.ndarray:
    """Resample a class map through one-hot probabilities (the classes present, tile by tile)."""
    cm = torch.from_numpy(np.ascontiguousarray(class_map)).long()
    dtype = np.uint8 if num_classes <= 256 else np.int16

    def channels(a, b):
        region = cm[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        ids = torch.unique(region)
        return ids.tolist(), (region[None] == ids[:, None, None, None]).float()

    return _tile_argmax(channels, m, cm.shape, out_shape).astype(dtype)
