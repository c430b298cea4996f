"""Where models put the grey/white boundary: the real scan's cortex intensity profile, and per model
the cerebral WM / cortex volume error and Dice on the real scan and MNI152 tissue, side by side.

    python bench/tissue_boundary.py TAG=MODEL ... [--no-flip] [--threads N]

MODEL is a model folder (``default``, ``quicknat export`` output) or a one-view checkpoint (a
run's ``last.pt``). The stage-v16 views put the GM/WM boundary outward of FreeSurfer's (cerebral WM
volume +7-9 % on the real scan) and of the MNI152 tissue maps, while on held-out synthetic maps
their WM volume is unbiased: a gap between synthetic and real contrast, not a bias of the
network. Part 1 prints the real contrast that the synthesis lacked (``synth.cortex_gradient``):
the median intensity of FreeSurfer's cortex by its distance to FreeSurfer's white matter. Part 2
prints, per model (with flip averaging unless ``--no-flip``): cerebral WM and cortex Dice and
volume error (predicted / reference - 1) on the real scan (``../shared/data/real_labelled``),
the real scan's mean Dice over the 31 structures, and MNI152 GM and WM Dice and volume error
(the tissue reference of ``bench/default_model_accuracy.py``), and how much of the model's
false MNI152 WM is brain stem: aseg's brain stem is white matter in ``ASEG_TO_TISSUE``, while
nilearn's MNI152 tissue maps call most of it grey matter (mean GM probability ~0.6 over the shipped
model's brain stem), so that share is a difference of definitions rather than of boundaries.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from default_model_accuracy import SHARED, UNSCORED_REAL, _mean, mni_tissue_reference
from scipy import ndimage

from quicknat.checkpoint import load_model
from quicknat.io import load_volume
from quicknat.labels import ASEG_TO_TISSUE, merge_labels
from quicknat.metrics import evaluate_pair
from quicknat.segment import Segmenter

REAL_T1, REAL_ASEG = SHARED / "real_labelled" / "vxm_t1.nii.gz", SHARED / "real_labelled" / "vxm_aseg.nii.gz"
WM, CORTEX = (2, 41), (3, 42)
BRAIN_STEM = 16


def cortex_profile(t1: np.ndarray, aseg: np.ndarray, zooms) -> None:
    wm, ctx = np.isin(aseg, WM), np.isin(aseg, CORTEX)
    depth = ndimage.distance_transform_edt(~wm, sampling=zooms)
    white = float(np.median(t1[wm]))
    print("| cortex depth (mm from WM) | voxels | median T1 / WM median |\n|---:|---:|---:|")
    for d in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0):
        m = ctx & (depth > d - 0.5) & (depth <= d)
        print(f"| {d:g} | {int(m.sum())} | {np.median(t1[m]) / white:.3f} |")


def _dice_error(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    inter, p, r = float((pred & ref).sum()), float(pred.sum()), float(ref.sum())
    return 2 * inter / max(p + r, 1.0), p / max(r, 1.0) - 1


def model_row(seg: Segmenter, real, mni) -> dict[str, str]:
    row = {}
    if real is not None:
        vol, aseg = real
        res = seg.segment(vol)
        scores = evaluate_pair(res.labels, aseg, seg.scheme, surface=False)
        row["real mean (31)"] = f"{_mean(scores, UNSCORED_REAL)[0]:.4f}"
        for name, ids in (("WM", WM), ("cortex", CORTEX)):
            d, e = _dice_error(np.isin(res.labels, ids), np.isin(aseg, ids))
            row[f"real {name} Dice (vol err)"] = f"{d:.3f} ({e:+.1%})"
    if mni is not None:
        vol, mask, ref = mni
        res = seg.segment(vol)
        aseg = np.where(mask, seg.scheme.decode(res.classes), 0)
        pred = merge_labels(aseg, ASEG_TO_TISSUE)
        for name, t in (("GM", 2), ("WM", 3)):
            d, e = _dice_error(pred == t, ref == t)
            row[f"MNI152 {name} Dice (vol err)"] = f"{d:.4f} ({e:+.1%})"
        false_wm = (pred == 3) & (ref != 3)
        stem = int((false_wm & (aseg == BRAIN_STEM)).sum())
        row["MNI152 false WM: brain stem / all"] = f"{stem} / {int(false_wm.sum())}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", metavar="TAG=MODEL")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    real = None
    if REAL_T1.exists() and REAL_ASEG.exists():
        vol, aseg = load_volume(REAL_T1), load_volume(REAL_ASEG)
        real = (vol, aseg.array)
        print("real scan: FreeSurfer cortex intensity by depth")
        cortex_profile(vol.array.astype(np.float64), aseg.array, aseg.spacing)
    try:
        mni = mni_tissue_reference()
    except ImportError:
        mni = None
    rows = {}
    for item in args.models:
        tag, _, path = item.partition("=")
        rows[tag] = model_row(Segmenter(load_model(path), device="cpu", flip=not args.no_flip), real, mni)
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("\n| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for tag, r in rows.items():
        print(f"| {tag} | " + " | ".join(r.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main()
