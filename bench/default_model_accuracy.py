"""Accuracy of a model (default: the shipped one) where we can measure it without labelled T1s.

    python bench/default_model_accuracy.py [--model PATH] [--maps DIR] [--out DIR] [--seeds 2]

1. Held-out synthetic maps: Dice per structure of the three-view model on volumes synthesised
   with fixed seeds from label maps the model never trained on (training_seg_19/20 of
   ../shared/data/label_maps, the validation split of the shipped recipe).
2. MNI152 (nilearn's 2009 template, 1 mm): the model's aseg33 segmentation merged to tissue
   against argmax(CSF, GM, WM) inside the template's brain mask, with CSF = 1 - GM - WM.
3. Overlays (PNG) of both ../shared/data/t1_unlabelled scans and of MNI152, to look at.
Prints tables; skips what is absent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from quicknat.checkpoint import load_model
from quicknat.conform import plan_conform
from quicknat.data.synth import LabelMapSynth
from quicknat.io import Volume, load_volume
from quicknat.labels import ASEG_TO_TISSUE, TISSUE, merge_labels
from quicknat.metrics import evaluate_pair, foreground_mean
from quicknat.segment import Segmenter, write_outputs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def held_out(seg: Segmenter, maps_dir: Path, names: list[str], seeds: int) -> None:
    files = [maps_dir / f"{n}.nii.gz" for n in names if (maps_dir / f"{n}.nii.gz").exists()]
    if not files:
        print("held-out label maps not found: skipped")
        return
    scheme = seg.scheme
    per: dict[str, list[float]] = {}
    means = []
    for f in files:
        lab = load_volume(f)
        synth = LabelMapSynth([(lab.array, lab.affine)], scheme, seg.settings)
        for s in range(seeds):
            img, cls = synth.volume(10_000 + s)
            vol = Volume(img, plan_conform(lab, seg.settings).affine)
            res = seg.segment(vol)
            scores = evaluate_pair(scheme.decode(res.classes), scheme.decode(cls), scheme, surface=False)
            means.append(foreground_mean(scores))
            for sc in scores:
                if sc.status not in ("absent", "background"):
                    per.setdefault(sc.structure, []).append(sc.dice)
    print(f"\nheld-out synthetic volumes ({len(files)} maps x {seeds} seeds): Dice per structure")
    print(f"{'structure':<32}{'mean':>8}{'min':>8}")
    for k, v in per.items():
        print(f"{k:<32}{np.mean(v):>8.3f}{np.min(v):>8.3f}")
    print(f"{'MEAN (foreground)':<32}{np.mean(means):>8.3f}{np.min(means):>8.3f}")


def mni_tissue(seg: Segmenter, out: Path) -> None:
    try:
        from nilearn.datasets import (
            load_mni152_brain_mask,
            load_mni152_gm_template,
            load_mni152_template,
            load_mni152_wm_template,
        )
    except ImportError:
        print("nilearn missing: MNI152 check skipped")
        return
    t1 = load_mni152_template(resolution=1)
    gm = load_mni152_gm_template(resolution=1).get_fdata()
    wm = load_mni152_wm_template(resolution=1).get_fdata()
    mask = load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
    csf = np.clip(1 - gm - wm, 0, 1)
    ref = np.where(mask, np.argmax(np.stack([csf, gm, wm]), 0) + 1, 0)
    vol = Volume(np.asarray(t1.get_fdata(), np.float32), t1.affine, path=Path("mni152.nii.gz"))
    t = time.perf_counter()
    res = seg.segment(vol)
    dt = time.perf_counter() - t
    pred = merge_labels(seg.scheme.decode(res.classes), ASEG_TO_TISSUE)
    pred = np.where(mask, pred, 0)  # compare inside the template's brain
    scores = evaluate_pair(pred, ref, TISSUE, surface=False)
    print(f"\nMNI152 tissue Dice (aseg33 merged to tissue vs argmax of the template's maps), {dt:.1f} s:")
    for s in scores[1:]:
        print(f"{s.structure:<16}{s.dice:>8.3f}")
    print(f"{'MEAN':<16}{foreground_mean(scores):>8.3f}")
    write_outputs(res, out, "mni152")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--maps", type=Path, default=SHARED / "label_maps")
    ap.add_argument("--held-out", nargs="+", default=["training_seg_19", "training_seg_20"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("default_model_check"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    model = load_model(args.model)
    seg = Segmenter(model, device=args.device)
    prov = next(iter(model.views.values())).provenance
    print(f"model: {model.path}  best validation Dice per view: "
          + ", ".join(f"{v}={ck.provenance.get('best_val_dice', float('nan')):.3f}" for v, ck in model.views.items()))
    print(f"trained on: {prov.get('data', {}).get('dataset')} ({prov.get('data', {}).get('train_scans')} maps)")
    held_out(seg, args.maps, args.held_out, args.seeds)
    mni_tissue(seg, args.out)
    for name in ("whole_head_t1", "skullstripped_t1"):
        p = SHARED / "t1_unlabelled" / f"{name}.nii.gz"
        if p.exists():
            t = time.perf_counter()
            res = seg.segment(load_volume(p))
            write_outputs(res, args.out, name)
            print(f"{name}: {time.perf_counter() - t:.1f} s, overlay {args.out / (name + '_overlay.png')}")


if __name__ == "__main__":
    main()
