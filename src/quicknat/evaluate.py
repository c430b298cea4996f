"""``quicknat evaluate``: score segmentations against references, per structure and subject.

Outputs (``-o DIR`` or ``-o metrics.csv``):

* ``metrics.csv``: long format, one row per (subject, structure, metric): columns ``subject,
  structure, label, status, metric, value``; metrics as in :mod:`quicknat.metrics`.
* ``summary.csv``: per structure and metric, ``n, mean, std, median`` over subjects where the
  structure is present; plus the rows ``structure = "Mean (foreground)"``.
* ``eval.json`` (model evaluation): the model, manifest, split and per subject the image,
  reference and prediction paths, for ``quicknat report``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .data.manifest import load_manifest
from .errors import QuicknatInputError
from .io import Volume, atomic_write_text, csv_text, is_volume_file, load_volume, same_grid, stem
from .labels import ASEG_TO_TISSUE, LabelScheme, checked_label_map, compact_labels, get_scheme, merge_labels
from .metrics import METRICS, StructureScore, evaluate_pair
from .outputs import write_outputs
from .resample import resample
from .segment import Segmenter

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"(_seg|_label|_labels|_aseg|_t1|_T1w|_pred|_ref|_fseg)+$")


def subject_key(path: str | Path) -> str:
    """Pairing key of a file: its stem without suffixes like _seg, _label, _aseg, _t1."""
    return _SUFFIX.sub("", stem(path))


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_volume_file(p))
    return [path]


def pair_files(pred: str | Path, ref: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair a file with a file, or two folders by subject key; unmatched files are an error."""
    pred, ref = Path(pred), Path(ref)
    if not pred.exists():
        raise QuicknatInputError(pred, "does not exist")
    if not ref.exists():
        raise QuicknatInputError(ref, "does not exist")
    if pred.is_file() and ref.is_file():
        return [(subject_key(ref), pred, ref)]
    if pred.is_dir() != ref.is_dir():
        raise QuicknatInputError(pred, "--pred and --ref must both be files or both be folders")
    preds = {subject_key(p): p for p in _files(pred)}
    refs = {subject_key(p): p for p in _files(ref)}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise QuicknatInputError(pred, f"no file pairs with {ref} by subject name")
    for k in sorted(set(refs) - set(preds)):
        log.warning("no prediction for %s", refs[k])
    return [(k, preds[k], refs[k]) for k in common]


def resample_labels(pred: Volume, ref: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the reference grid (IDs never mixed)."""
    m = np.linalg.inv(pred.affine) @ ref.affine  # ref voxel -> pred voxel
    ids, inv = compact_labels(np.rint(pred.array).astype(np.int64))
    t = torch.from_numpy(inv.astype(np.float32))
    out = resample(t, m, ref.shape, "nearest").numpy().round().astype(np.int64)
    return ids[out]


def load_label_map(path: Path, scheme: LabelScheme, *, reference: bool) -> Volume:
    """A label map checked for use in scoring (:func:`quicknat.labels.checked_label_map`): a
    reference must hold labels; IDs outside the scheme are scored as background, with one
    warning naming them."""
    vol = load_volume(path)
    what = "reference" if reference else "prediction"
    _, unknown = checked_label_map(vol.array, scheme, path, what=what, allow_empty=not reference)
    if unknown:
        log.warning("%s: label IDs outside scheme %r scored as background: %s", path, scheme.name,
                    ", ".join(f"{k} ({v} voxels)" for k, v in sorted(unknown.items())[:8]))
    return vol


def score_pair(pred_path: Path, ref_path: Path, scheme: LabelScheme, resample: bool = False,
               merge_to_tissue: bool = False) -> list[StructureScore]:
    ref = load_label_map(ref_path, scheme, reference=True)
    # a prediction merged to tissue is in the model's aseg33 scheme, checked after the merge
    pred = load_volume(pred_path) if merge_to_tissue else load_label_map(pred_path, scheme, reference=False)
    if not same_grid(pred, ref, atol=1e-4):
        if not resample:
            raise QuicknatInputError(pred_path, f"is on a different grid than {ref_path} (pass --resample)")
        p = resample_labels(pred, ref)
    else:
        p = pred.array
    if merge_to_tissue:
        p = merge_labels(p, ASEG_TO_TISSUE)
    return evaluate_pair(p, ref.array, scheme, ref.spacing)


def long_rows(subject: str, scores: list[StructureScore]) -> list[dict]:
    rows = []
    for s in scores:
        d = asdict(s)
        for m in METRICS:
            rows.append({"subject": subject, "structure": s.structure, "label": s.label, "status": s.status,
                         "metric": m, "value": d[m]})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """mean/std/median per structure and metric over subjects where the structure is present."""
    groups: dict[tuple[str, str], list[float]] = {}
    order: list[tuple[str, str]] = []
    fg: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        key = (r["structure"], r["metric"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        if r["status"] != "absent" and not (isinstance(r["value"], float) and math.isnan(r["value"])):
            groups[key].append(float(r["value"]))
    # per-subject foreground means
    by_subject: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["status"] in ("absent", "background") or (isinstance(r["value"], float) and math.isnan(r["value"])):
            continue
        by_subject.setdefault((r["subject"], r["metric"]), []).append(float(r["value"]))
    for (_, metric), vals in by_subject.items():
        fg.setdefault(("Mean (foreground)", metric), []).append(float(np.mean(vals)))
    out = []
    for key in order + sorted(fg):
        vals = groups.get(key) or fg.get(key) or []
        a = np.array(vals, dtype=np.float64)
        out.append({
            "structure": key[0], "metric": key[1], "n": len(a),
            "mean": float(a.mean()) if len(a) else math.nan,
            "std": float(a.std(ddof=1)) if len(a) > 1 else (0.0 if len(a) else math.nan),
            "median": float(np.median(a)) if len(a) else math.nan,
        })
    return out


def _outputs(out: Path | None) -> tuple[Path, Path]:
    if out is None:
        out = Path("quicknat_eval")
    if out.suffix == ".csv":
        return out, out.with_name(out.stem + "_summary.csv")
    return out / "metrics.csv", out / "summary.csv"


def evaluate_files(pred: str | Path, ref: str | Path, scheme: str | Path | LabelScheme = "aseg33", *,
                   out: str | Path | None = None, resample: bool = False) -> tuple[Path, list[dict]]:
    """Score a file pair or two folders paired by subject; returns (metrics path, summary)."""
    sch = get_scheme(scheme)
    rows: list[dict] = []
    for subject, p, r in pair_files(pred, ref):
        rows += long_rows(subject, score_pair(p, r, sch, resample))
    metrics_path, summary_path = _outputs(Path(out) if out else None)
    summary = summarise(rows)
    atomic_write_text(metrics_path, csv_text(rows))
    atomic_write_text(summary_path, csv_text(summary))
    return metrics_path, summary


def evaluate_model(model, manifest: str | Path, *, split: str = "test", out: str | Path = "quicknat_eval",
                   device: str = "auto", batch_size: int | None = None, mc: int = 0,
                   flip: bool | None = None) -> tuple[Path, list[dict]]:
    """Segment a manifest split's scans with ``model`` and score them against their labels.

    An aseg33 model scored on a tissue data set (OASIS FSL_SEG) is merged to tissue first.
    """
    m = load_manifest(manifest)
    seg = Segmenter(model, device=device, batch_size=batch_size, flip=flip)
    data_scheme = m.label_scheme()
    merge = seg.scheme.name == "aseg33" and data_scheme.name == "tissue"
    if seg.scheme != data_scheme and not merge:
        raise QuicknatInputError(m.path, f"data scheme {data_scheme.name!r} differs from the model's "
                                         f"{seg.scheme.name!r}")
    out = Path(out)
    rows: list[dict] = []
    pairs = []
    for scan in m.scans_in(split):
        image, label = m.resolve(scan.image), m.resolve(scan.label)
        if image is None or label is None:
            raise QuicknatInputError(m.path, f"scan {scan.id} needs an image and a label")
        res = seg.segment(load_volume(image), mc=mc)
        written = write_outputs(res, out / "seg", scan.id, overlay=False)
        pred_path = next(p for p in written if p.name.endswith("_seg.nii.gz"))
        scores = score_pair(pred_path, label, data_scheme, merge_to_tissue=merge)
        rows += long_rows(scan.id, scores)
        qc = next((str(p) for p in written if p.name.endswith("_qc.csv")), None)
        pairs.append({"id": scan.id, "image": str(image), "ref": str(label), "pred": str(pred_path), "qc": qc})
    if not pairs:
        raise QuicknatInputError(m.path, f"split {split!r} holds no scans")
    metrics_path, summary_path = _outputs(out)
    summary = summarise(rows)
    atomic_write_text(metrics_path, csv_text(rows))
    atomic_write_text(summary_path, csv_text(summary))
    info = {"model": str(getattr(seg.model, "path", model)), "manifest": str(m.path), "split": split,
            "scheme": data_scheme.to_dict(), "merged_to_tissue": merge, "mc": mc, "scans": pairs}
    atomic_write_text(out / "eval.json", json.dumps(info, indent=1) + "\n")
    return metrics_path, summary


def format_summary(summary: list[dict], metrics=("dice", "hd95")) -> str:
    """The summary as a fixed-width text table (mean ± std, median) for the terminal."""
    lines = [f"{'structure':<32}" + "".join(f"{m + ' mean±std':>22}{'median':>9}" for m in metrics)]
    by = {(r["structure"], r["metric"]): r for r in summary}
    structures = list(dict.fromkeys(r["structure"] for r in summary))
    for s in structures:
        cells = ""
        for m in metrics:
            r = by.get((s, m))
            if r is None or r["n"] == 0:
                cells += f"{'absent':>22}{'':>9}"
            else:
                cells += f"{r['mean']:>13.3f} ± {r['std']:<6.3f}{r['median']:>9.3f}"
        lines.append(f"{s:<32}{cells}")
    return "\n".join(lines)
