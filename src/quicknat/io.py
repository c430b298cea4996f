"""Volume input/output: NIfTI, FreeSurfer MGZ/MGH and Analyze 7.5, with affine and header kept.

Every reader returns a :class:`Volume`; every problem with a file raises
:class:`~quicknat.errors.QuicknatInputError` naming the file. Writers are atomic: they write to a
temporary name beside the target and rename, so a failed run leaves nothing half-written.

Analyze 7.5 (``.img``/``.hdr``, as OASIS-1 ships) has no reliable orientation field. quicknat
reads it in the radiological convention that OASIS-1 uses and that nibabel and SPM assume: the
first voxel axis runs from the subject's right to left, the second posterior to anterior, the
third inferior to superior (LAS), voxel sizes from the header, and the world origin at the
centre of the volume::

    affine = [[-dx, 0, 0,  dx * (nx - 1) / 2],
              [0,  dy, 0, -dy * (ny - 1) / 2],
              [0,  0, dz, -dz * (nz - 1) / 2],
              [0,  0,  0,  1]]

So voxels at low first index (the subject's right hemisphere in radiological storage) land at
positive RAS x, on the right of the world.

Memory is bounded by the file, not by what a header claims: before any voxel is read, the voxel
count in the header is checked against :func:`max_voxels` (``MAX_VOXELS``, 2^28 = 268 M voxels,
e.g. 645^3; the environment variable ``QUICKNAT_MAX_VOXELS`` or ``segment --max-voxels`` raises
it), and for uncompressed files (``.nii``, ``.img``, ``.mgh``) against the file's size. A header
claiming 1600^3 voxels in a 79-byte file, or a gzip bomb, is refused at once. Voxels are read in
their stored type; scaled data (``scl_slope``) and float64 become float32, not float64 (a
float64 image with values float32 cannot hold is kept, for :mod:`quicknat.conform` to refuse).

When a NIfTI file's qform and sform disagree (beyond 1 mm or 1 %), the affine nibabel chooses
(the sform when its code is set) is used and a warning says so, once per file.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import (  # noqa: F401  (re-exported: quicknat.io stays the place to import writers from)
    atomic_path,
    atomic_paths,
    atomic_write_bytes,
    atomic_write_npy,
    atomic_write_text,
    remove_stale_temps,
)
from .errors import QuicknatInputError

log = logging.getLogger(__name__)

#: Suffixes of the volume files quicknat reads, longest first.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".img", ".hdr")
#: The most voxels a volume may hold unless raised (see the module docstring).
MAX_VOXELS = 2**28
_COMPRESSED = (".gz", ".mgz", ".bz2", ".zst")


def max_voxels() -> int:
    """The voxel limit in force: ``QUICKNAT_MAX_VOXELS`` when set (a positive integer), else
    :data:`MAX_VOXELS`."""
    env = os.environ.get("QUICKNAT_MAX_VOXELS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else MAX_VOXELS


@dataclass
class Volume:
    """A 3D array with its voxel-to-world (RAS, mm) affine, the source header and path."""

    array: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes in mm (lengths of the affine's columns)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry and header with another array."""
        return Volume(array, self.affine.copy(), self.header, self.path, dict(self.meta))


def stem(path: str | Path) -> str:
    """File name without a volume suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_volume_file(path: str | Path) -> bool:
    """True for a file name quicknat can read (an Analyze pair counts once, by its ``.img``)."""
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES if s != ".hdr")


def analyze_affine(shape: tuple[int, ...], zooms: tuple[float, ...]) -> np.ndarray:
    """The documented LAS (radiological) affine quicknat gives Analyze 7.5 volumes."""
    dx, dy, dz = (float(z) for z in zooms[:3])
    nx, ny, nz = (int(s) for s in shape[:3])
    return np.array(
        [
            [-dx, 0, 0, dx * (nx - 1) / 2],
            [0, dy, 0, -dy * (ny - 1) / 2],
            [0, 0, dz, -dz * (nz - 1) / 2],
            [0, 0, 0, 1],
        ],
        dtype=np.float64,
    )


def _open(path: Path) -> Any:
    name = path.name.lower()
    try:
        if name.endswith((".img", ".hdr")):
            img_path = path.with_suffix(".img")
            hdr_path = path.with_suffix(".hdr")
            for p in (img_path, hdr_path):
                if not p.exists():
                    raise QuicknatInputError(path, f"Analyze volume is missing its {p.suffix} file")
            # nib.load gives a NIfTI pair image when the header has the NIfTI magic; plain
            # Analyze otherwise. Both are handled below.
            return nib.load(str(img_path))
        if name.endswith((".mgz", ".mgh")):
            return nib.freesurfer.MGHImage.from_filename(str(path))
        if name.endswith((".nii", ".nii.gz")):
            return nib.load(str(path))
    except QuicknatInputError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise QuicknatInputError(path, f"cannot read as a volume ({_describe(exc)})") from None
    raise QuicknatInputError(path, f"unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raw_zooms(path: Path, img: Any) -> tuple[float, ...]:
    """Voxel sizes as stored: nibabel's header check silently turns a zero size into 1."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if isinstance(img.header, nib.Nifti1Header | nib.AnalyzeHeader) and not isinstance(img, nib.MGHImage):
        try:
            src = path.with_suffix(".hdr") if path.name.lower().endswith((".img", ".hdr")) else path
            with nib.openers.ImageOpener(str(src)) as fobj:
                raw = type(img.header).from_fileobj(fobj, check=False)
            stored = tuple(float(z) for z in raw["pixdim"][1:4])
            if any(not np.isfinite(z) or z <= 0 for z in stored):
                return stored
        except Exception:  # the image itself loaded; keep nibabel's reading
            pass
    return zooms


def _check_size(path: Path, img: Any, limit: int) -> None:
    """The header's voxel count against ``limit`` and, for an uncompressed file, the file's size;
    nothing has been allocated yet."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    n = 1
    for s in shape:
        n *= s
    if n > limit:
        raise QuicknatInputError(path, f"header claims {'x'.join(map(str, shape))} = {n / 1e6:.0f} M voxels, over the "
                                       f"limit of {limit / 1e6:.0f} M (QUICKNAT_MAX_VOXELS or --max-voxels raises it)")
    proxy = img.dataobj
    source = getattr(proxy, "file_like", None)
    if not isinstance(source, str) or source.lower().endswith(_COMPRESSED) or not os.path.exists(source):
        return
    need = int(getattr(proxy, "offset", 0)) + n * img.header.get_data_dtype().itemsize
    have = os.path.getsize(source)
    if have < need:
        raise QuicknatInputError(path, f"is truncated: its header needs {need} bytes (header and voxels), the file "
                                       f"holds {have}")


def _read_voxels(img: Any) -> np.ndarray:
    """Voxels in their stored type; scaled ones in float32 (nibabel would give float64)."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if nib.is_proxy(proxy) and hasattr(proxy, "get_unscaled") and (slope != 1 or inter != 0):
        raw = np.asarray(proxy.get_unscaled())
        data = raw.astype(np.float32)
        del raw
        data *= np.float32(slope)
        data += np.float32(inter)
        return data
    data = np.asarray(np.asanyarray(proxy))
    if data.dtype == np.float64 and data.size:  # min/max: no full-size temporary
        lo, hi = float(data.min()), float(data.max())
        if max(abs(lo), abs(hi)) < 1e30:  # NaN or Inf compare False: kept, refused later
            data = data.astype(np.float32)
    return data


def _warn_forms(path: Path, img: Any) -> None:
    """Warn once when a NIfTI's qform and sform both hold and disagree."""
    hdr = img.header
    if not isinstance(hdr, nib.Nifti1Header):
        return
    q, qcode = hdr.get_qform(coded=True)
    s, scode = hdr.get_sform(coded=True)
    if not qcode or not scode or q is None or s is None:
        return
    shift = float(np.abs(q[:3, 3] - s[:3, 3]).max())
    rel = float(np.abs(q[:3, :3] - s[:3, :3]).max() / max(np.abs(s[:3, :3]).max(), 1e-12))
    if shift > 1.0 or rel > 0.01:
        used = "sform" if np.allclose(img.affine, s) else "qform"
        log.warning("%s: qform and sform disagree (up to %.1f mm, %.0f %% in the axes); using the %s", path,
                    shift, 100 * rel, used)


def load_volume(path: str | Path, *, allow_nonfinite: bool = False, limit: int | None = None) -> Volume:
    """Load a 3D volume from NIfTI, MGZ/MGH or Analyze 7.5.

    A trailing singleton 4th dimension is squeezed. Raises QuicknatInputError for a missing,
    unreadable or truncated file, a header claiming more than ``limit`` voxels (default
    :func:`max_voxels`), a 2D or real 4D image, non-finite voxels, or a degenerate geometry
    (zero, negative or non-finite voxel sizes).
    """
    path = Path(path)
    if not path.exists():
        raise QuicknatInputError(path, "file does not exist")
    if path.is_dir():
        raise QuicknatInputError(path, "is a folder, not a volume file")
    img = _open(path)
    _check_size(path, img, max_voxels() if limit is None else limit)
    try:
        data = _read_voxels(img)
    except MemoryError:
        raise QuicknatInputError(path, "not enough memory to read its voxels") from None
    except Exception as exc:
        raise QuicknatInputError(path, f"cannot read the voxel data ({_describe(exc)}); truncated?") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise QuicknatInputError(path, f"is {data.ndim}D with shape {data.shape}; quicknat needs one 3D scan")
    if data.ndim < 3 or min(data.shape) < 2:
        raise QuicknatInputError(path, f"is a 2D image (shape {data.shape}); quicknat needs a 3D scan")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise QuicknatInputError(path, f"has unsupported voxel type {data.dtype}")

    zooms = _raw_zooms(path, img)
    if len(zooms) < 3 or not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise QuicknatInputError(path, f"has invalid voxel sizes {zooms} (must be positive)")
    is_analyze = isinstance(img, nib.AnalyzeImage) and not isinstance(img, nib.Nifti1Pair)
    affine = analyze_affine(data.shape, zooms) if is_analyze else np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise QuicknatInputError(path, "has a degenerate voxel-to-world affine (zero or non-finite)")
    _warn_forms(path, img)

    if np.issubdtype(data.dtype, np.floating) and not allow_nonfinite:
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            what = "only NaN/Inf voxels" if bad == data.size else f"{bad} NaN/Inf voxels"
            raise QuicknatInputError(path, f"has {what}")
    return Volume(data, affine, img.header, path, {"format": type(img).__name__})


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when two volumes share shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows as CSV text; columns from ``fieldnames`` or the first row."""
    buf = _io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def save_volume(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    *,
    header: Any = None,
    dtype: Any = None,
) -> Path:
    """Save an array as NIfTI (``.nii``/``.nii.gz``) or MGZ/MGH, atomically.

    With ``header`` from a NIfTI input the output keeps that header (codes, units, description);
    the affine written is ``affine`` exactly as far as the format's float32 storage allows.
    """
    path = Path(path)
    dtype = np.dtype(dtype or array.dtype)
    data = np.asarray(array, dtype=dtype)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_path(path) as tmp:
        if suffix in (".mgz", ".mgh"):
            img = nib.freesurfer.MGHImage(data, affine)
        elif suffix in (".nii", ".nii.gz"):
            hdr = header.copy() if isinstance(header, nib.Nifti1Header) else None
            if hdr is not None:
                hdr.set_data_shape(data.shape)
                hdr.set_data_dtype(dtype)
                hdr.set_slope_inter(None, None)
                if data.ndim == 4:
                    hdr.set_dim_info(None, None, None)
            img = nib.Nifti1Image(data, affine, header=hdr)
            img.set_data_dtype(dtype)
            if hdr is None or (hdr["sform_code"] == 0 and hdr["qform_code"] == 0):
                img.set_sform(affine, code=1)
                img.set_qform(affine, code=1)
        else:
            raise QuicknatInputError(path, "output must be .nii, .nii.gz, .mgz or .mgh")
        nib.save(img, str(tmp))
    return path
