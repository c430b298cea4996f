"""Outputs of segmentation: what each scan's files are called (plain or BIDS layout), writing
them all or nothing (:func:`write_outputs`, see its docstring for files and columns), whether a
scan's outputs are complete (``--skip-existing``) and the output folder's checks.
:func:`quicknat.runner.segment_files` runs a cohort through these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import atomic_paths
from .cohort import SIDECAR_KIND, dseg_tsv, read_sidecar
from .errors import QuicknatError
from .io import csv_text, save_volume
from .labels import ASEG_TO_TISSUE, TISSUE, LabelScheme, merge_labels
from .report import save_overlay
from .result import SegmentationResult

#: File names per output kind: ``<name>_<suffix>`` (``{d}``: the scheme, ``aseg`` for aseg33).
LAYOUTS: dict[str, dict[str, str]] = {
    "plain": {
        "sidecar": "seg.json", "seg": "seg.nii.gz", "volumes": "volumes.csv", "qc": "qc.csv",
        "tissue": "tissue.nii.gz", "posteriors": "posteriors.nii.gz", "posteriors_sidecar": "posteriors.json",
        "uncertainty": "uncertainty.nii.gz", "overlay": "overlay.png",
    },
    "bids": {
        "sidecar": "desc-{d}_dseg.json", "seg": "desc-{d}_dseg.nii.gz", "lut": "desc-{d}_dseg.tsv",
        "volumes": "desc-{d}_volumes.csv", "qc": "desc-{d}_qc.csv", "tissue": "desc-tissue_dseg.nii.gz",
        "tissue_lut": "desc-tissue_dseg.tsv", "posteriors": "desc-{d}_probseg.nii.gz",
        "posteriors_sidecar": "desc-{d}_probseg.json", "uncertainty": "desc-{d}entropy_map.nii.gz",
        "overlay": "desc-{d}_overlay.png",
    },
}


def output_names(name: str, scheme: LabelScheme, layout: str = "plain") -> dict[str, str]:
    """Each output kind's file name for scan ``name`` (relative to its folder)."""
    d = "aseg" if scheme.name == "aseg33" else scheme.name
    return {kind: f"{name}_{suffix.format(d=d)}" for kind, suffix in LAYOUTS[layout].items()}


def write_outputs(
    result: SegmentationResult,
    outdir: str | Path,
    name: str,
    tissue: bool = False,
    overlay: bool = True,
    *,
    layout: str = "plain",
    meta: dict | None = None,
) -> list[Path]:
    """Write one scan's outputs, all or nothing; returns the paths. Files (plain layout,
    ``<name>`` = the scan's name in the run; :data:`LAYOUTS` gives the BIDS names):

    * ``<name>_seg.nii.gz``: label IDs, int16, the input's shape, affine and header.
    * ``<name>_volumes.csv``: structure, label, voxels, volume_mm3 (every class, then
      BrainSegVol and IntracranialVol, :func:`quicknat.cohort.volume_summary`).
    * ``<name>_seg.json``: the sidecar: input, model, options, quicknat version and the files
      written (renamed into place last, so its presence means the scan is complete).
    * ``<name>_qc.csv`` (MC dropout): structure, label, mean/std volume, cv, iou, passes.
    * ``<name>_overlay.png``: the scan and segmentation in three planes.
    * ``<name>_tissue.nii.gz`` (``tissue``): aseg33 merged to 1 CSF, 2 GM, 3 WM.
    * ``<name>_posteriors.nii.gz``: class probabilities, 4D (X, Y, Z, C), float32, with
      ``<name>_posteriors.json`` naming the channels.
    * ``<name>_uncertainty.nii.gz``: voxel-wise entropy of the mean probability (nats).
    * BIDS only: ``<name>_desc-aseg_dseg.tsv`` (index, name, colour).
    """
    outdir = Path(outdir)
    vol = result.volume
    names = output_names(name, result.scheme, layout)
    done: dict[str, str] = {}

    with atomic_paths() as staged:
        sidecar = staged(outdir / names["sidecar"])  # staged first: renamed onto its name last

        def stage(kind: str) -> Path:
            done[kind] = names[kind]
            return staged(outdir / names[kind])

        labels = result.labels
        save_volume(labels, vol.affine, stage("seg"), header=vol.header, dtype=np.int16)
        stage("volumes").write_text(csv_text(result.volumes()))
        if layout == "bids":
            stage("lut").write_text(dseg_tsv(result.scheme))
        if result.qc is not None:
            stage("qc").write_text(csv_text(result.qc))
        if tissue:
            if result.scheme.name != "aseg33":
                raise QuicknatError(f"--tissue needs an aseg33 model, not {result.scheme.name!r}")
            save_volume(merge_labels(labels, ASEG_TO_TISSUE), vol.affine, stage("tissue"),
                        header=vol.header, dtype=np.int16)
            if layout == "bids":
                stage("tissue_lut").write_text(dseg_tsv(TISSUE))
        if result.posteriors is not None:
            post = np.moveaxis(result.posteriors, 0, -1).astype(np.float32, copy=False)  # a view, no 2nd copy
            save_volume(post, vol.affine, stage("posteriors"), dtype=np.float32)
            channels = [{"channel": k, "label": c.label, "name": c.name} for k, c in enumerate(result.scheme.classes)]
            stage("posteriors_sidecar").write_text(json.dumps(
                {"Description": "class probabilities; the 4th axis is the channel", "channels": channels},
                indent=1) + "\n")
        if result.uncertainty is not None:
            save_volume(result.uncertainty, vol.affine, stage("uncertainty"), header=vol.header, dtype=np.float32)
        if overlay:
            save_overlay(
                None, None, stage("overlay"), scheme=result.scheme,
                conformed=(result.conformed_image, result.conformed_classes), title=name,
            )
        info = {"kind": SIDECAR_KIND, "name": name, "scheme": result.scheme.name, **(meta or {}), "outputs": done}
        sidecar.write_text(json.dumps(info, indent=1) + "\n")
    return [outdir / names["sidecar"], *(outdir / f for f in done.values())]


def is_complete(outdir: Path, name: str, scheme: LabelScheme, layout: str, source: Path,
                wanted: Iterable[str]) -> bool:
    """The scan's outputs are all there (its sidecar, every file it lists, each ``wanted`` kind)
    and newer than ``source`` (``--skip-existing``)."""
    side = Path(outdir) / output_names(name, scheme, layout)["sidecar"]
    meta = read_sidecar(side)
    if meta is None or not set(wanted) <= set(meta.get("outputs", {})):
        return False
    files = [side, *(side.parent / f for f in meta["outputs"].values())]
    try:
        return all(f.stat().st_mtime >= source.stat().st_mtime for f in files)
    except OSError:
        return False


def example_scan() -> Path:
    """The bundled example: nilearn's MNI152 2009 T1 template (1 mm), shipped with nilearn."""
    from nilearn.datasets import load_mni152_template

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quicknat"
    path = cache / "mni152_t1_1mm.nii.gz"
    if not path.exists():
        img = load_mni152_template(resolution=1)
        save_volume(np.asarray(img.get_fdata(), dtype=np.float32), img.affine, path, dtype=np.float32)
    return path
