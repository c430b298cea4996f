"""Cohort tables and the files a viewer or a BIDS tool reads beside the labels.

* :func:`volume_summary`: the summary rows of a scan's volumes: ``BrainSegVol`` (every labelled
  structure except ventricles and CSF) and ``IntracranialVol``, estimated from the segmentation
  as brain plus ventricles plus labelled CSF (as SynthSeg's ``total intracranial``): as good as
  the model's CSF class (docs/outputs.md), for normalising within one cohort and one model.
* :func:`cohort_rows` / :func:`write_cohort_table`: one row per scan, one column per structure
  (mm³), the two summary volumes, the model and the quicknat version, built from each scan's
  sidecar (``<name>_seg.json`` or BIDS ``<name>_desc-*_dseg.json``) and volumes CSV, so
  ``quicknat stats`` rebuilds it from the outputs alone (and merges sharded runs).
* :func:`lut_text` (FreeSurfer colour table: freeview, 3D Slicer) and :func:`dseg_tsv` (BIDS).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from .atomic import atomic_write_text
from .io import csv_text
from .labels import LabelScheme

log = logging.getLogger(__name__)

SIDECAR_KIND = "quicknat-segmentation"
_FLUID = ("ventricle", "csf")


def is_fluid(name: str) -> bool:
    """Ventricles and CSF: inside the skull, not brain tissue."""
    return any(f in name.lower() for f in _FLUID)


def volume_summary(rows: list[dict]) -> list[dict]:
    """``BrainSegVol`` and ``IntracranialVol`` rows from per-structure volume rows."""
    brain = [r for r in rows if not is_fluid(r["structure"])]
    out = []
    for name, part in (("BrainSegVol", brain), ("IntracranialVol", rows)):
        out.append({"structure": name, "label": "", "voxels": sum(int(r["voxels"]) for r in part),
                    "volume_mm3": round(sum(float(r["volume_mm3"]) for r in part), 3)})
    return out


def lut_text(scheme: LabelScheme) -> str:
    """The scheme as a FreeSurfer colour table (``index name R G B A``), background included."""
    lines = [f"# quicknat label scheme {scheme.name}: index name R G B A"]
    lines += [f"{c.label:<5d} {c.name:<32s} {c.color[0]:3d} {c.color[1]:3d} {c.color[2]:3d}   0"
              for c in scheme.classes]
    return "\n".join(lines) + "\n"


def dseg_tsv(scheme: LabelScheme) -> str:
    """The scheme as a BIDS ``_dseg.tsv`` (index, name, color as ``#rrggbb``)."""
    lines = ["index\tname\tcolor"]
    lines += [f"{c.label}\t{c.name}\t#{c.color[0]:02x}{c.color[1]:02x}{c.color[2]:02x}" for c in scheme.classes]
    return "\n".join(lines) + "\n"


def write_lut(outdir: Path, scheme: LabelScheme) -> Path:
    """``<outdir>/<scheme>_lut.txt`` (the same text every time, so concurrent shards agree)."""
    path = Path(outdir) / f"{scheme.name}_lut.txt"
    atomic_write_text(path, lut_text(scheme))
    return path


def write_dataset_description(root: Path, version: str) -> Path:
    """A BIDS derivatives ``dataset_description.json`` (kept if one exists)."""
    path = Path(root) / "dataset_description.json"
    if not path.exists():
        desc = {"Name": "quicknat segmentations", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "quicknat", "Version": version}]}
        atomic_write_text(path, json.dumps(desc, indent=2) + "\n")
    return path


def read_sidecar(path: Path) -> dict | None:
    """A quicknat scan sidecar (None for any other JSON)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("kind") == SIDECAR_KIND else None


def find_sidecars(outdir: Path) -> list[Path]:
    """Every quicknat scan sidecar under ``outdir``."""
    return sorted(p for p in Path(outdir).rglob("*seg.json") if read_sidecar(p) is not None)


def cohort_rows(sidecars: list[Path]) -> list[dict]:
    """One row per scan (sorted by name) from sidecars and the volumes CSVs they name."""
    rows = []
    for sc in sidecars:
        meta = read_sidecar(sc)
        if meta is None:
            continue
        vol_path = sc.parent / meta["outputs"]["volumes"]
        try:
            with open(vol_path, newline="") as fh:
                vols = list(csv.DictReader(fh))
        except OSError as exc:
            log.warning("%s: skipped in the cohort table (%s)", sc, exc.strerror or exc)
            continue
        row = {"scan": meta["name"], "input": meta["input"]}
        row.update({r["structure"]: r["volume_mm3"] for r in vols})
        row.update({"model": meta["model"], "quicknat_version": meta["quicknat_version"]})
        rows.append(row)
    return sorted(rows, key=lambda r: r["scan"])


def write_cohort_table(path: Path, rows: list[dict]) -> Path:
    """Write the cohort table (columns: scan, input, structures in order, summary, model)."""
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    tail = ["model", "quicknat_version"]
    columns = [c for c in columns if c not in tail] + tail
    atomic_write_text(path, csv_text(rows, columns) if rows else ",".join(["scan", "input", *tail]) + "\n")
    return path


def write_failures(path: Path, failures: list[tuple[str, str]]) -> Path:
    """``input,reason`` per failed input (the header alone when none failed)."""
    rows = [{"input": i, "reason": r} for i, r in failures]
    atomic_write_text(path, csv_text(rows, ["input", "reason"]) if rows else "input,reason\n")
    return path


def rebuild_tables(outdir: Path) -> tuple[Path, Path, int, int]:
    """``quicknat stats``: ``volumes.csv`` from every scan's outputs under ``outdir`` and
    ``failures.csv`` from the runs' failure lists (sharded ones too), less the inputs that have
    outputs now. Returns both paths, the number of scans and of failures."""
    outdir = Path(outdir)
    rows = cohort_rows(find_sidecars(outdir))
    done = {r["input"] for r in rows}
    failures: dict[str, str] = {}
    for f in sorted(outdir.glob("failures*.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("input") and r["input"] not in done:
                    failures[r["input"]] = r.get("reason", "")
    table = write_cohort_table(outdir / "volumes.csv", rows)
    fails = write_failures(outdir / "failures.csv", sorted(failures.items()))
    return table, fails, len(rows), len(failures)
