"""Preparing data sets: OASIS-1 (download, checksum, safe extraction, conversion), FreeSurfer
subjects folders, and folders of label maps. Each writes a :mod:`manifest <quicknat.data.manifest>`.

OASIS-1 layout under ``ROOT/oasis1``::

    downloads/oasis_cross-sectional_disc1.tar.gz   the archive(s), checked by md5
    raw/disc1/OAS1_0001_MR1/...                     extracted (safely)
    nifti/OAS1_0001_MR1_t1.nii.gz, ..._label.nii.gz converted, LAS affine (see quicknat.io)
    manifest.json                                   scans, facts, missing scans, split

Scans are discovered by pattern, never by number: a folder ``OAS1_XXXX_MRn`` with the image
``PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc.img`` (``mpr_n3`` or ``mpr_n4`` in the name) and the
FSL FAST label ``FSL_SEG/*_fseg.img``; with ``labels="freesurfer"`` (OASIS's FreeSurfer
archives) ``mri/aseg.mgz`` with ``mri/orig.mgz`` (or ``T1.mgz``). Scans missing a file are
listed in the manifest's ``missing``, not fatal.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QuicknatInputError
from ..io import Volume, is_volume_file, load_volume, same_grid, save_volume, stem
from ..labels import checked_label_map, get_scheme
from .archive import download, safe_extract
from .manifest import Manifest, Scan, load_manifest, reuse_or_split

log = logging.getLogger(__name__)

OASIS_URL = "https://download.nrg.wustl.edu/data/oasis_cross-sectional_disc{disc}.tar.gz"
OASIS_FS_URL = "https://download.nrg.wustl.edu/data/oasis_cs_freesurfer_disc{disc}.tar.gz"
OASIS_MD5 = {1: "c83e216ef8654a7cc9e2a30a4cdbe0cc"}
SCAN_DIR = re.compile(r"^(OAS1_\d{4})_MR(\d+)$")


def data_root(root: str | Path | None) -> Path:
    """The data root: ``root`` or ``$MONAI_DATA_DIRECTORY``; no silent temporary folder."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MONAI_DATA_DIRECTORY")
    if env:
        return Path(env)
    raise QuicknatInputError(None, "no data root: pass --root DIR or set MONAI_DATA_DIRECTORY")


def _facts(image: Volume | None, label: Volume | None) -> dict:
    ref = image or label
    assert ref is not None
    facts = {"shape": list(ref.shape), "spacing": [round(float(s), 4) for s in ref.spacing]}
    if label is not None:
        facts["label_values"] = [int(v) for v in np.unique(np.rint(label.array).astype(np.int64))]
    return facts


def _convert(src: Path, dest: Path, label: bool) -> Volume:
    """Convert a volume to NIfTI once (skipped when dest is newer than src)."""
    if dest.exists() and dest.stat().st_mtime >= src.stat().st_mtime:
        return load_volume(dest)
    vol = load_volume(src)
    if label:
        data = np.rint(vol.array).astype(np.int16)
    else:
        data = np.asarray(vol.array, dtype=np.float32)
    save_volume(data, vol.affine, dest, dtype=data.dtype)
    return Volume(data, vol.affine, None, dest)


@dataclass
class _Found:
    id: str
    subject: str
    image: Path | None
    label: Path | None


def discover_oasis(raw: Path, labels: str = "fsl") -> list[_Found]:
    """Find OASIS-1 scans under ``raw`` by folder and file patterns."""
    found = []
    for d in sorted(p for p in raw.rglob("OAS1_*_MR*") if p.is_dir() and SCAN_DIR.match(p.name)):
        m = SCAN_DIR.match(d.name)
        assert m
        if labels == "fsl":
            imgs = sorted((d / "PROCESSED" / "MPRAGE" / "T88_111").glob("*_mpr_n*_anon_111_t88_masked_gfc.img"))
            labs = sorted((d / "FSL_SEG").glob("*_fseg.img"))
        else:
            image, label = _freesurfer_pair(d / "mri")
            imgs, labs = [p for p in (image,) if p], [p for p in (label,) if p]
        found.append(_Found(d.name, m.group(1), imgs[0] if imgs else None, labs[0] if labs else None))
    return found


def discover_freesurfer(subjects_dir: Path) -> list[_Found]:
    """FreeSurfer subject folders: ``mri/orig.mgz`` (or ``T1.mgz``) with ``mri/aseg.mgz``."""
    found = []
    for subj in sorted(p for p in subjects_dir.iterdir() if p.is_dir() and (p / "mri").is_dir()):
        found.append(_Found(subj.name, subj.name, *_freesurfer_pair(subj / "mri")))
    return found


def _freesurfer_pair(mri: Path) -> tuple[Path | None, Path | None]:
    """(``orig.mgz`` or else ``T1.mgz``, ``aseg.mgz``) of a FreeSurfer ``mri`` folder, None where absent."""
    image = next((p for p in (mri / "orig.mgz", mri / "T1.mgz") if p.exists()), None)
    return image, (mri / "aseg.mgz" if (mri / "aseg.mgz").exists() else None)


def _build_scans(found: list[_Found], out: Path | None, base: Path) -> tuple[list[Scan], list[dict]]:
    """Pair images with labels (converted to NIfTI in ``out``, or used in place when None);
    what cannot be paired goes to the manifest's "missing" with the reason."""
    scans, missing = [], []
    for f in found:
        if f.image is None or f.label is None:
            what = "image" if f.image is None else "label"
            missing.append({"id": f.id, "reason": f"no {what} file found"})
            continue
        try:
            if out is None:
                img, lab = load_volume(f.image), load_volume(f.label)
            else:
                img = _convert(f.image, out / f"{f.id}_t1.nii.gz", label=False)
                lab = _convert(f.label, out / f"{f.id}_label.nii.gz", label=True)
        except QuicknatInputError as exc:
            missing.append({"id": f.id, "reason": str(exc)})
            continue
        if not same_grid(img, lab):
            missing.append({"id": f.id, "reason": "image and label do not share geometry"})
            continue
        scans.append(Scan(f.id, f.subject, os.path.relpath(img.path, base), os.path.relpath(lab.path, base),
                          _facts(img, lab)))
    return scans, missing


def _previous(path: Path) -> Manifest | None:
    return load_manifest(path) if path.exists() else None


def prepare_oasis(
    root: str | Path | None = None,
    *,
    discs=(1,),
    url: str | None = None,
    md5: str | None = None,
    labels: str = "fsl",
    seed: int = 0,
    resplit: bool = False,
    progress: bool = False,
) -> Path:
    """Download, check, extract and convert OASIS-1 discs; write and return ``manifest.json``."""
    if labels not in ("fsl", "freesurfer"):
        raise ValueError("labels must be 'fsl' or 'freesurfer'")
    base = data_root(root) / ("oasis1" if labels == "fsl" else "oasis1_freesurfer")
    raw = base / "raw"
    sources = []
    for disc in discs:
        template = url or (OASIS_URL if labels == "fsl" else OASIS_FS_URL)
        disc_url = template.format(disc=disc) if "{disc}" in template else template
        want = md5 if md5 is not None else (OASIS_MD5.get(disc) if labels == "fsl" and url is None else None)
        name = Path(disc_url.split("?")[0]).name or f"disc{disc}.tar.gz"
        archive = download(disc_url, base / "downloads" / name, want, progress=progress)
        marker = raw / f".extracted-{name}"
        if not marker.exists():
            safe_extract(archive, raw)
            marker.write_text("ok\n")
        sources.append({"disc": disc, "url": disc_url, "md5": want})
    found = discover_oasis(raw, labels)
    if not found:
        raise QuicknatInputError(raw, "no OASIS-1 scan folders (OAS1_XXXX_MRn) found in the archive")
    scans, missing = _build_scans(found, base / "nifti", base)
    if not scans:
        raise QuicknatInputError(raw, "no OASIS-1 scan has both an image and a label")
    path = base / "manifest.json"
    split = reuse_or_split(scans, _previous(path), seed, resplit)
    scheme = "tissue" if labels == "fsl" else "aseg33"
    manifest = Manifest("oasis1", scheme, scans, split, missing, {"archives": sources, "labels": labels})
    return manifest.save(path)


def prepare_freesurfer(subjects_dir: str | Path, out: str | Path | None = None, *, seed: int = 0,
                       resplit: bool = False) -> Path:
    """Every ``SUBJ/mri/orig.mgz`` (or ``T1.mgz``) with ``SUBJ/mri/aseg.mgz`` -> an aseg33 manifest."""
    sd = Path(subjects_dir)
    if not sd.is_dir():
        raise QuicknatInputError(sd, "subjects folder does not exist")
    base = Path(out) if out else sd
    scans, missing = _build_scans(discover_freesurfer(sd), None, base)
    if not scans:
        raise QuicknatInputError(sd, "no FreeSurfer subject with mri/aseg.mgz and orig.mgz/T1.mgz")
    path = base / "manifest.json"
    split = reuse_or_split(scans, _previous(path), seed, resplit)
    return Manifest("freesurfer", "aseg33", scans, split, missing, {"subjects_dir": str(sd)}).save(path)


def prepare_labelmaps(folder: str | Path, out: str | Path | None = None, *, seed: int = 0, resplit: bool = False,
                      scheme: str = "aseg33", holdout: Sequence[str] = (),
                      validation_scans: Sequence[tuple[str | Path, str | Path]] = ()) -> Path:
    """A folder of label maps without images -> a manifest for synthetic training.

    ``holdout``: label maps (by stem) to hold out for validation instead of a random split.
    ``validation_scans``: real (image, label) pairs added to the validation split, so that
    training keeps the model that is best on real anatomy (see :mod:`quicknat.train`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QuicknatInputError(folder, "label map folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p))
    if not files:
        raise QuicknatInputError(folder, "holds no label map files")
    base = Path(out) if out else folder
    scans = []
    sch = get_scheme(scheme)
    for f in files:
        lab = load_volume(f)
        checked_label_map(lab.array, sch, f)  # not a T1 image, not empty, some of the scheme's IDs
        scans.append(Scan(stem(f), stem(f), None, os.path.relpath(f, base), _facts(None, lab)))
    ids = [s.id for s in scans]
    unknown = sorted(set(holdout) - set(ids))
    if unknown:
        raise QuicknatInputError(folder, f"--holdout names no label map here: {', '.join(unknown)}")
    real = []
    for image_path, label_path in validation_scans:
        image, label = load_volume(image_path), load_volume(label_path)
        if not same_grid(image, label):
            raise QuicknatInputError(label_path, "label and image do not share geometry")
        sid = stem(Path(image_path))
        if sid in ids or sid in [r.id for r in real]:
            raise QuicknatInputError(image_path, f"scan ID {sid!r} is already in the manifest")
        real.append(Scan(sid, sid, os.path.relpath(image_path, base), os.path.relpath(label_path, base),
                         _facts(image, label)))
    path = base / "manifest.json"
    if holdout:
        split = {"seed": seed, "by": "holdout", "train": [i for i in ids if i not in holdout],
                 "validation": sorted(holdout), "test": []}
    else:
        split = reuse_or_split(scans, _previous_without(path, real), seed, resplit)
    split = {**split, "validation": [*split["validation"], *(r.id for r in real)]}
    return Manifest("labelmaps", scheme, scans + real, split, [], {"folder": str(folder)}).save(path)


def _previous_without(path: Path, extra: list[Scan]) -> Manifest | None:
    """The previous manifest with the real validation scans taken out (they are not split)."""
    prev = _previous(path)
    if prev is None or not prev.split:
        return prev
    drop = {s.id for s in extra} | {s.id for s in prev.scans if s.image is not None}
    prev.split = {k: ([i for i in v if i not in drop] if isinstance(v, list) else v) for k, v in prev.split.items()}
    return prev
