"""Which views, on which grids, to combine: every combination of single-view checkpoints on the
real labelled scan, in one run, from one segmentation per view.

    python bench/view_ensembles.py TAG=CHECKPOINT[:noflip] ... [--combos A+B+C ...] [--threads N]

Each TAG names a one-view checkpoint (a ``.pt`` from ``quicknat export`` or a run; ``:noflip``
runs it without flip averaging). Its unweighted class probabilities on its own conformed grid
(:meth:`quicknat.segment.Segmenter.view_probabilities`) are mapped to the scan's grid once; a
combination is their sum (equal weights, argmax), scored against the aseg like
``bench/default_model_accuracy.py`` scores the real scan (mean Dice over the 31 structures other
than CSF). No clean-ups run (the scan is skull-stripped: they changed no Dice there). Summing
on the scan's grid is what :class:`~quicknat.segment.Segmenter` does on the finest conformed grid
for a model whose views run on different grids, up to the interpolation: confirm a choice with
``bench/default_model_accuracy.py`` on the model itself. Example (the shipped 2 mm views against
1.5 mm ones)::

    D=src/quicknat/models/default
    python bench/view_ensembles.py c2=$D/coronal.pt a2=$D/axial.pt s2=$D/sagittal.pt \\
        a15=runs/v13/axial/last.pt s15=runs/v13/sagittal/last.pt --combos c2+a2+s2 c2+a2+s15 c2+a15+s2
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from default_model_accuracy import SHARED, UNSCORED_REAL, _mean

from quicknat.conform import plan_conform
from quicknat.io import load_volume
from quicknat.metrics import evaluate_pair
from quicknat.segment import Segmenter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("views", nargs="+", metavar="TAG=CHECKPOINT[:noflip]")
    ap.add_argument("--combos", nargs="*", default=None, help="A+B+C ... (default: every combination)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    img, lab = SHARED / "real_labelled" / "vxm_t1.nii.gz", SHARED / "real_labelled" / "vxm_aseg.nii.gz"
    if not (img.exists() and lab.exists()):
        print("no real labelled scan in ../shared/data/real_labelled: nothing to do")
        return
    vol, ref = load_volume(img), load_volume(lab).array
    probs, scheme = {}, None
    for item in args.views:
        tag, _, spec = item.partition("=")
        path, _, opt = spec.partition(":")
        seg = Segmenter(Path(path), device="cpu", flip=opt != "noflip", clean=False, csf_reach_mm=0.0)
        plan = plan_conform(vol, seg.settings)
        (p,) = seg.view_probabilities(plan.image(vol.array)).values()
        probs[tag] = plan.probs_to_native(p, argmax_only=False).astype(np.float16)
        scheme = seg.scheme
    combos = ([c.split("+") for c in args.combos] if args.combos else
              [list(c) for r in range(1, len(probs) + 1) for c in itertools.combinations(probs, r)])
    rows = []
    for combo in combos:
        acc = sum(probs[t].astype(np.float32) for t in combo)
        mean, per = _mean(evaluate_pair(scheme.decode(acc.argmax(0).astype(np.uint8)), ref, scheme, surface=False),
                          UNSCORED_REAL)
        rows.append(("+".join(combo), mean, per))
    print("\n| views | mean (31) | cortex L / R | cerebral WM L | Left-Inf-Lat-Vent | pallidum L | worst |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, mean, per in rows:
        worst = min(per, key=per.get)
        print(f"| {name} | {mean:.4f} | {per['Left-Cerebral-Cortex']:.3f} / {per['Right-Cerebral-Cortex']:.3f} | "
              f"{per['Left-Cerebral-White-Matter']:.3f} | {per['Left-Inf-Lat-Vent']:.3f} | "
              f"{per['Left-Pallidum']:.3f} | {worst} {per[worst]:.3f} |")


if __name__ == "__main__":
    main()
