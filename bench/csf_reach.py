"""How far from the brain should a segmentation's CSF reach? The label maps' answer, and the model's.

    python bench/csf_reach.py [--model default] [--reach 0 4 6 8 10] [--seeds 1]

1. **The training label maps** (``../shared/data/label_maps``, all but the held-out 19/20): the
   distance (mm, on their 1 mm grid) from each CSF voxel (label 24) to the nearest voxel of
   another aseg33 structure, as percentiles, and the share of CSF beyond each reach. The maps'
   CSF is the subarachnoid space around the brain, but in some maps it also runs down the spinal
   canal, 20-80 mm below the brain.
2. **The model on held-out synthetic whole heads** (maps 19/20, T1-like, scalp/skull/eyes
   present, the same draws as ``bench/default_model_accuracy.py``): segmented once with flip
   averaging and no CSF limit, then for each reach (0: none, today's output before this limit
   existed) and with/without ``--clean``: the share of labelled voxels farther than 3 mm from the
   map's brain and CSF, and the Dice of CSF. The other structures cannot change (only CSF voxels
   become background), so their Dice is not repeated here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from quicknat.cleanup import far_csf, off_brain
from quicknat.conform import plan_conform
from quicknat.data.synth import LabelMapSynth, SynthConfig
from quicknat.io import Volume, load_volume
from quicknat.labels import get_scheme
from quicknat.segment import Segmenter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CSF_LABEL = 24


def label_maps(holdout: list[str], reaches: list[float]) -> None:
    scheme = get_scheme("aseg33")
    brain_ids = sorted({i for c in scheme.classes[1:] for i in c.source_ids} - {CSF_LABEL})
    files = sorted(f for f in (SHARED / "label_maps").glob("*.nii.gz") if f.name.split(".")[0] not in holdout)
    if not files:
        print("no label maps in ../shared/data/label_maps: section 1 skipped")
        return
    dists = []
    for f in files:
        lab = np.asarray(nib.load(f).dataobj).astype(np.int32)
        zooms = nib.load(f).header.get_zooms()[:3]
        d = ndimage.distance_transform_edt(~np.isin(lab, brain_ids), sampling=zooms)[lab == CSF_LABEL]
        dists.append(d)
    d = np.concatenate(dists)
    q = np.percentile(d, [50, 90, 95, 99])
    print(f"\n1. CSF of {len(files)} training label maps: distance to other structures (mm)")
    print("| median | 90 % | 95 % | 99 % | " + " | ".join(f"beyond {r:g} mm" for r in reaches if r > 0) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * sum(r > 0 for r in reaches))
    beyond = " | ".join(f"{100 * float((d > r).mean()):.1f} %" for r in reaches if r > 0)
    print(f"| {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {q[3]:.1f} | {beyond} |")


def _scores(classes: np.ndarray, truth: np.ndarray, far: np.ndarray, csf: int) -> tuple[float, float]:
    labelled = classes > 0
    outside = 100.0 * float((labelled & far).sum()) / max(int(labelled.sum()), 1)
    p, t = classes == csf, truth == csf
    return outside, 2.0 * float((p & t).sum()) / max(int(p.sum() + t.sum()), 1)


def whole_heads(model: str | None, holdout: list[str], reaches: list[float], seeds: int) -> None:
    seg = Segmenter(model, device="cpu", flip=True, clean=False, csf_reach_mm=0.0)  # raw: clean-ups below
    csf = [n.casefold() for n in seg.scheme.names].index("csf")
    cfg = SynthConfig(random_share=0.0, priors=str(SHARED / "synthseg_priors"), soft=False, strip_prob=0.0)
    rows: dict[tuple[float, bool], list[tuple[float, float]]] = {}
    for name in holdout:
        f = SHARED / "label_maps" / f"{name}.nii.gz"
        if not f.exists():
            continue
        lab = load_volume(f)
        synth = LabelMapSynth([(lab.array, lab.affine)], seg.scheme, seg.settings, cfg)
        for s in range(seeds):
            img, truth = synth.volume(10_000 + s)
            res = seg.segment(Volume(img, plan_conform(lab, seg.settings).affine))
            far = ndimage.distance_transform_edt(truth == 0, sampling=seg.settings.voxel_size) > 3.0
            for reach in reaches:
                classes = res.classes.copy()
                classes[far_csf(classes, seg.scheme, seg.settings.voxel_size, reach)] = 0
                rows.setdefault((reach, False), []).append(_scores(classes, truth, far, csf))
                classes[off_brain(classes, seg.settings.voxel_size)] = 0  # then --clean, as segment does
                rows.setdefault((reach, True), []).append(_scores(classes, truth, far, csf))
    if not rows:
        print("no held-out label maps: section 2 skipped")
        return
    print(f"\n2. {seg.model.path}: held-out synthetic whole heads {', '.join(holdout)} x {seeds} seed(s)")
    print("| CSF reach | --clean | outside brain % | CSF Dice |")
    print("|---:|---|---:|---:|")
    for (reach, clean), v in rows.items():
        out, dice = np.mean(v, axis=0)
        print(f"| {'none' if reach <= 0 else f'{reach:g} mm'} | {'yes' if clean else 'no'} | {out:.2f} | {dice:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model (default: the shipped one)")
    ap.add_argument("--reach", type=float, nargs="+", default=[0, 4, 6, 8, 10], help="reaches to compare (mm)")
    ap.add_argument("--held-out", nargs="+", default=["training_seg_19", "training_seg_20"])
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    label_maps(args.held_out, args.reach)
    whole_heads(args.model, args.held_out, args.reach, args.seeds)


if __name__ == "__main__":
    main()
