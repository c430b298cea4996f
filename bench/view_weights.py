"""Mean Dice of a model's view aggregation under several view weights, side by side in one run.

    python bench/view_weights.py [--model default] [--weights .4,.4,.2 1,1,1 ...] [--seeds 3]
                                 [--held-out training_seg_19 training_seg_20] [--no-flip]

Weights are coronal,axial,sagittal. **Choose on the held-out synthetic columns**: label maps
never trained on (``../shared/data/label_maps``, T1-like with SynthSeg's priors, ``--seeds``
random draws each, seeds 20000+). The real labelled scan's column (``../shared/data/real_labelled``)
is printed beside them as a check, never to pick from: models are judged on real scans we do
not see. Each volume runs each view once, each on its own grid (:meth:`Segmenter.view_probabilities`); a weighting is
then a weighted sum, so a row costs no network time. Dice is over the scheme's structures other
than CSF: for synthetic draws on the conformed grid they are made on, for the real scan on its own
grid after the way back (as ``default_model_accuracy.py`` measures it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from quicknat.checkpoint import load_model
from quicknat.conform import plan_conform
from quicknat.data.synth import LabelMapSynth, SynthConfig
from quicknat.io import Volume, load_volume
from quicknat.metrics import dice_per_class
from quicknat.segment import Segmenter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIEW_ORDER = ("coronal", "axial", "sagittal")


def mean_dice(pred: np.ndarray, ref: np.ndarray, classes: list[int], num_classes: int) -> float:
    """Mean Dice over ``classes`` that the reference holds."""
    d = dice_per_class(pred, ref, num_classes)
    present = np.bincount(np.asarray(ref).reshape(-1).astype(np.int64), minlength=num_classes) > 0
    return float(np.mean([d[c] for c in classes if present[c]]))


def volumes(seg: Segmenter, names: list[str], seeds: int):
    """(tag, scan, class reference, probabilities -> predicted classes on the reference's grid)
    for the held-out draws and the real scan."""
    cfg = SynthConfig(random_share=0.0, priors=str(SHARED / "synthseg_priors"), soft=False)
    for name in names:
        path = SHARED / "label_maps" / f"{name}.nii.gz"
        if path.exists():
            lab = load_volume(path)
            synth = LabelMapSynth([(lab.array, lab.affine)], seg.scheme, seg.settings, cfg)
            for s in range(seeds):
                img, cls = synth.volume(20_000 + s)  # on the model's finest grid
                scan = Volume(img, plan_conform(lab, seg.settings).affine)
                yield f"{name} #{s}", scan, cls, lambda p: p.argmax(0).numpy()
    img_p, lab_p = SHARED / "real_labelled" / "vxm_t1.nii.gz", SHARED / "real_labelled" / "vxm_aseg.nii.gz"
    if img_p.exists() and lab_p.exists():
        vol, aseg = load_volume(img_p), load_volume(lab_p)
        plan = plan_conform(vol, seg.settings)
        ref = seg.scheme.encode(np.rint(aseg.array).astype(np.int32))[0]
        yield "real scan", vol, ref, lambda p: plan.probs_to_native(p, argmax_only=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", nargs="+", default=[".4,.4,.2", "1,1,1", ".3,.3,.4", ".25,.25,.5", ".45,.2,.35"])
    ap.add_argument("--held-out", nargs="+", default=["training_seg_19", "training_seg_20"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-flip", action="store_true")
    args = ap.parse_args()
    seg = Segmenter(load_model(args.model), device="cpu", flip=not args.no_flip)
    views = [v for v in VIEW_ORDER if v in seg.nets]
    combos = {w: [float(x) for x in w.split(",")][: len(views)] for w in args.weights}
    classes = [i for i, c in enumerate(seg.scheme.classes) if i > 0 and c.name != "CSF"]
    table: dict[str, dict[str, float]] = {}
    for tag, img, ref, predict in volumes(seg, args.held_out, args.seeds):
        probs = seg.view_probabilities(img)
        with torch.inference_mode():
            for w, ws in combos.items():
                acc = sum(wi * probs[v] for wi, v in zip(ws, views))
                acc /= acc.sum(0, keepdim=True)
                table.setdefault(w, {})[tag] = mean_dice(predict(acc), ref, classes, seg.scheme.num_classes)
        print(f"{tag}: done", flush=True)
    tags = list(next(iter(table.values())))
    synth = [t for t in tags if t != "real scan"]
    print(f"\nmodel {seg.model.path}, flip {not args.no_flip}; weights {','.join(views)}\n")
    head = ["held-out synthetic mean"] + (["real scan (check only)"] if "real scan" in tags else []) + synth
    print("| weights | " + " | ".join(head) + " |")
    print("|---|" + "---:|" * len(head))
    for w, row in table.items():
        cells = [np.mean([row[t] for t in synth]) if synth else float("nan")]
        cells += [row["real scan"]] if "real scan" in row else []
        cells += [row[t] for t in synth]
        print(f"| {w} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
