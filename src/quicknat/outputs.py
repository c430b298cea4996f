"""Outputs of segmentation, and running it over files and folders.

:func:`write_outputs` writes one scan's files, all or nothing (see its docstring for files and
columns); :func:`find_scans` expands files and folders; :func:`segment_files` runs a
:class:`~quicknat.segment.Segmenter` over them with I/O streamed beside compute, a failing scan
recorded and skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import Model
from .errors import QuicknatError, QuicknatInputError
from .io import Volume, atomic_paths, csv_text, is_volume_file, load_volume, remove_stale_temps, save_volume, stem
from .labels import ASEG_TO_TISSUE, merge_labels
from .report import save_overlay
from .segment import SegmentationResult, Segmenter

log = logging.getLogger(__name__)


def write_outputs(
    result: SegmentationResult,
    outdir: str | Path,
    name: str,
    tissue: bool = False,
    overlay: bool = True,
) -> list[Path]:
    """Write one scan's outputs; returns the paths. Files (``<name>`` = the scan's stem):

    * ``<name>_seg.nii.gz``: label IDs, int16, the input's shape, affine and header.
    * ``<name>_volumes.csv``: structure, label, voxels, volume_mm3 (every class, then Total).
    * ``<name>_qc.csv`` (MC dropout): structure, label, mean/std volume, cv, iou, passes.
    * ``<name>_overlay.png``: the scan and segmentation in three planes.
    * ``<name>_tissue.nii.gz`` (``tissue``): aseg33 merged to 1 CSF, 2 GM, 3 WM.
    * ``<name>_posteriors.nii.gz``: class probabilities, 4D (X, Y, Z, C), float32.
    * ``<name>_uncertainty.nii.gz``: voxel-wise entropy of the mean probability (nats).
    """
    outdir = Path(outdir)
    vol = result.volume
    written: list[Path] = []

    with atomic_paths() as staged:

        def stage(suffix: str) -> Path:
            written.append(outdir / f"{name}_{suffix}")
            return staged(written[-1])

        labels = result.labels
        save_volume(labels, vol.affine, stage("seg.nii.gz"), header=vol.header, dtype=np.int16)
        (stage("volumes.csv")).write_text(csv_text(result.volumes()))
        if result.qc is not None:
            stage("qc.csv").write_text(csv_text(result.qc))
        if tissue:
            if result.scheme.name != "aseg33":
                raise QuicknatError(f"--tissue needs an aseg33 model, not {result.scheme.name!r}")
            save_volume(merge_labels(labels, ASEG_TO_TISSUE), vol.affine, stage("tissue.nii.gz"),
                        header=vol.header, dtype=np.int16)
        if result.posteriors is not None:
            post = np.moveaxis(result.posteriors, 0, -1).astype(np.float32, copy=False)  # a view, no 2nd copy
            save_volume(post, vol.affine, stage("posteriors.nii.gz"), dtype=np.float32)
        if result.uncertainty is not None:
            unc_path = stage("uncertainty.nii.gz")
            save_volume(result.uncertainty, vol.affine, unc_path, header=vol.header, dtype=np.float32)
        if overlay:
            save_overlay(
                None, None, stage("overlay.png"), scheme=result.scheme,
                conformed=(result.conformed_image, result.conformed_classes), title=name,
            )
    return written


def check_output_folder(outdir: Path) -> None:
    """Before any work: ``outdir`` is a folder (or can become one) that this user can write."""
    if outdir.exists() and not outdir.is_dir():
        raise QuicknatInputError(outdir, "is a file; the output (-o) must be a folder")
    parent = outdir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QuicknatInputError(parent, "is not writable; choose another output folder (-o)")


def find_scans(inputs: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """Expand files and folders into (scan path, came from a folder) pairs, sorted per folder."""
    out: list[tuple[Path, bool]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_volume_file(q) and not q.name.startswith("."))
            out.extend((q, True) for q in found)
        else:
            out.append((p, False))
    return out


def example_scan() -> Path:
    """The bundled example: nilearn's MNI152 2009 T1 template (1 mm), shipped with nilearn."""
    from nilearn.datasets import load_mni152_template

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quicknat"
    path = cache / "mni152_t1_1mm.nii.gz"
    if not path.exists():
        img = load_mni152_template(resolution=1)
        save_volume(np.asarray(img.get_fdata(), dtype=np.float32), img.affine, path, dtype=np.float32)
    return path


def _load(path: Path, limit: int | None = None) -> tuple[Volume, float]:
    t = time.perf_counter()
    return load_volume(path, limit=limit), time.perf_counter() - t


def _settle(oc: ScanOutcome, job: Callable[[], object]) -> object:
    """Run ``job``; a failure becomes the scan's error (and None is returned)."""
    try:
        return job()
    except (QuicknatInputError, QuicknatError) as exc:
        oc.error = str(exc)
    except Exception as exc:  # one bad scan must not stop a cohort
        log.debug("failure on %s", oc.path, exc_info=True)
        oc.error = f"{oc.path}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _submit(pool: ThreadPoolExecutor, stream: bool, fn, *args) -> Future:
    """``fn(*args)`` in ``pool`` when streaming; else run now, its outcome in a done future."""
    if stream:
        return pool.submit(fn, *args)
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as exc:
        done.set_exception(exc)
    return done


@dataclass
class ScanOutcome:
    path: Path
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    from_folder: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def segment_files(
    inputs: Sequence[str | Path],
    outdir: str | Path | None = None,
    *,
    model: Model | str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    mc: int = 0,
    tissue: bool = False,
    posteriors: bool = False,
    uncertainty: bool = False,
    overlay: bool = True,
    amp: bool = False,
    flip: bool = True,
    clean: bool = False,
    progress: bool = False,
    segmenter: Segmenter | None = None,
    stream: bool = True,
    max_voxels: int | None = None,
) -> list[ScanOutcome]:
    """Segment scans (files or folders); a scan that fails is recorded and skipped.

    The model is loaded before any scan is read, so a missing model fails once, up front.
    With ``stream`` (the default), I/O overlaps compute: the next scan is read in one thread and
    the previous scan's outputs are written in another while the current scan is segmented; at
    most one scan is read ahead and one result waits to be written. ``stream=False`` does one
    thing at a time (the reference: both write the same files). ``max_voxels`` raises the
    voxel limit of :func:`quicknat.io.max_voxels` for these scans.
    """
    outdir = Path(outdir) if outdir is not None else Path("quicknat_out")
    check_output_folder(outdir)
    if uncertainty and mc < 1:
        raise QuicknatInputError(None, "--uncertainty needs --mc N (the entropy over N MC-dropout passes)")
    scans = find_scans(inputs) if inputs else []
    if inputs and not scans:
        raise QuicknatInputError(Path(inputs[0]), "holds no scans (.nii, .nii.gz, .mgz, .mgh, .img)")
    seg = segmenter or Segmenter(model, device=device, batch_size=batch_size, amp=amp, flip=flip, clean=clean)
    if not inputs:
        scans = find_scans([example_scan()])
    remove_stale_temps(outdir)
    outcomes = [ScanOutcome(path, from_folder=from_folder) for path, from_folder in scans]

    def write(oc: ScanOutcome, res: SegmentationResult) -> None:
        t = time.perf_counter()
        oc.outputs = write_outputs(res, outdir, stem(oc.path), tissue=tissue, overlay=overlay)
        res.timings["write"] = time.perf_counter() - t
        oc.timings = res.timings

    def finish(oc: ScanOutcome, job: Future | None) -> None:
        if job is not None:
            _settle(oc, job.result)
        if oc.error is None:  # a failure is the caller's to report, once
            log.info("%s: wrote %d files", oc.path, len(oc.outputs))

    def compute(reading: Future) -> SegmentationResult:
        vol, seconds = reading.result()
        res = seg.segment(vol, mc=mc, posteriors=posteriors, uncertainty=uncertainty and mc > 0)
        res.timings["load"] = seconds
        return res

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        def read(i: int) -> Future | None:
            return _submit(reader, stream, _load, outcomes[i].path, max_voxels) if i < len(outcomes) else None

        reading = read(0)
        writing: tuple[ScanOutcome, Future] | None = None
        for i, oc in enumerate(tqdm(outcomes, desc="segment", unit="scan", disable=not progress)):
            current = reading
            reading = read(i + 1)
            res = _settle(oc, lambda current=current: compute(current))
            if writing is not None:  # at most one result waits to be written
                finish(*writing)
                writing = None
            if res is not None:
                writing = (oc, _submit(writer, stream, write, oc, res))
            else:
                finish(oc, None)
        if writing is not None:
            finish(*writing)
    return outcomes
