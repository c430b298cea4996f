"""Synthetic training samples next to real T1 slices, to judge the generator's realism by eye.

    python bench/synth_samples.py [--config configs/synth_cpu_v2.yaml] [-o synth_samples.png] [--n 6]

Row per view: the real whole-head T1 and the real labelled T1 of ../shared/data (conformed as
``quicknat segment`` conforms them, on the config's grid), then ``--n`` generated samples of
the config's generator (T1-like and random-contrast, whole-head and skull-stripped as drawn),
each above its target's most likely class. Uses ../shared/data/label_maps, else phantoms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quicknat.config import load_config  # noqa: E402
from quicknat.conform import plan_conform  # noqa: E402
from quicknat.data.phantom import make_phantom  # noqa: E402
from quicknat.data.synth import LabelMapSynth  # noqa: E402
from quicknat.io import load_volume  # noqa: E402
from quicknat.labels import ASEG33  # noqa: E402
from quicknat.views import VIEWS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synth_cpu_v2.yaml")
    ap.add_argument("--maps", type=Path, default=SHARED / "label_maps")
    ap.add_argument("-o", "--output", type=Path, default=Path("synth_samples.png"))
    ap.add_argument("--n", type=int, default=6)
    args = ap.parse_args()
    cfg = load_config(args.config)
    synth_cfg = cfg.synth
    if synth_cfg.priors and not Path(synth_cfg.priors).exists():
        print(f"priors {synth_cfg.priors} not found: built-in T1 ranges used")
        from dataclasses import replace

        synth_cfg = replace(synth_cfg, priors=None)
    files = sorted(args.maps.glob("*.nii*"))[:3] if args.maps.exists() else []
    maps = [(v.array, v.affine) for v in map(load_volume, files)]
    if not maps:
        _, lab = make_phantom((200, 200, 200), seed=0, head_radius=90)
        maps = [(lab.array, lab.affine)]
    synth = LabelMapSynth(maps, ASEG33, cfg.conform, synth_cfg)
    reals = []
    for p in (SHARED / "t1_unlabelled" / "whole_head_t1.nii.gz", SHARED / "real_labelled" / "vxm_t1.nii.gz"):
        if p.exists():
            vol = load_volume(p)
            reals.append((p.name, plan_conform(vol, cfg.conform).image(vol.array)))
    cols = len(reals) + args.n
    fig, ax = plt.subplots(len(VIEWS) * 2, cols, figsize=(2.2 * cols, 13), facecolor="black")
    for r, spec in enumerate(VIEWS.values()):
        mid = cfg.conform.shape[spec.axis] // 2 + (10 if spec.lateral_in_plane else 12)
        for c, (name, image) in enumerate(reals):
            ax[2 * r, c].imshow(spec.display(spec.slice_of(image, mid)), cmap="gray", vmin=0, vmax=1)
            ax[2 * r, c].set_title(f"real: {name[:14]}", color="yellow", fontsize=8)
        for k in range(args.n):
            img, target = synth.sample(spec.name, seed=1000 * r + k)
            rgb = ASEG33.colors[target.argmax(0)] / 255.0
            ax[2 * r, len(reals) + k].imshow(spec.display(img[0]), cmap="gray", vmin=0, vmax=1)
            ax[2 * r + 1, len(reals) + k].imshow(spec.display(rgb))
            ax[2 * r, len(reals) + k].set_title(f"{spec.name} synth", color="white", fontsize=8)
    for a in ax.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=70, facecolor="black")
    print(f"wrote {args.output} ({len(maps)} label maps, {len(reals)} real scans)")


if __name__ == "__main__":
    main()
