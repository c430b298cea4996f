"""Draw a grid of synthetic training samples (image and labels, three views) as a PNG.

    python bench/synth_samples.py [--maps DIR] [-o synth_samples.png] [--n 6]

Uses ../shared/data/label_maps when present, else phantoms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from quicknat.data.phantom import make_phantom  # noqa: E402
from quicknat.data.synth import LabelMapSynth  # noqa: E402
from quicknat.io import load_volume  # noqa: E402
from quicknat.labels import ASEG33  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "label_maps"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--maps", type=Path, default=SHARED)
    ap.add_argument("-o", "--output", type=Path, default=Path("synth_samples.png"))
    ap.add_argument("--n", type=int, default=6)
    args = ap.parse_args()
    files = sorted(args.maps.glob("*.nii*"))[:3] if args.maps.exists() else []
    maps = [(v.array, v.affine) for v in map(load_volume, files)]
    if not maps:
        _, lab = make_phantom((200, 200, 200), seed=0, head_radius=90)
        maps = [(lab.array, lab.affine)]
    synth = LabelMapSynth(maps, ASEG33)
    views = ["coronal", "axial", "sagittal"]
    fig, ax = plt.subplots(len(views) * 2, args.n, figsize=(2.2 * args.n, 13), facecolor="black")
    for r, view in enumerate(views):
        for k in range(args.n):
            img, cls = synth.sample(view, seed=1000 * r + k)
            rgb = ASEG33.colors[cls] / 255.0
            ax[2 * r, k].imshow(img.T if view != "sagittal" else img, cmap="gray", vmin=0, vmax=1)
            ax[2 * r + 1, k].imshow(np.transpose(rgb, (1, 0, 2)) if view != "sagittal" else rgb)
            ax[2 * r, k].set_title(view, color="white", fontsize=8)
    for a in ax.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=70, facecolor="black")
    print(f"wrote {args.output} ({len(maps)} label maps)")


if __name__ == "__main__":
    main()
