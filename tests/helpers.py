"""Small data and a tiny fitted model for tests (no ../shared, no internet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quicknat.conform import ConformSettings, plan_conform
from quicknat.data.phantom import make_phantom
from quicknat.io import save_volume
from quicknat.labels import LabelClass, LabelScheme

#: Coarse conformed grid for fast tests: 2.5 mm voxels, 64^3.
TEST_CONFORM = ConformSettings(voxel_size=2.5, shape=(64, 64, 64))

#: Six classes over the phantom's aseg IDs, with left/right pairs (so the sagittal view merges
#: and expands) and small structures merged into their tissue; the brain stem (16) is unknown
#: to this scheme and encodes to background.
TEST_SCHEME = LabelScheme(
    "test6",
    (
        LabelClass("Unknown", 0, (0, 0, 0)),
        LabelClass("Left-White", 2, (245, 245, 245), (7, 28), "Right-White"),
        LabelClass("Right-White", 41, (245, 245, 245), (46, 60), "Left-White"),
        LabelClass("Left-Grey", 3, (205, 62, 78), (8, 10, 11, 12, 13, 17, 18, 26), "Right-Grey"),
        LabelClass("Right-Grey", 42, (205, 62, 78), (47, 49, 50, 51, 52, 53, 54, 58), "Left-Grey"),
        LabelClass("CSF", 24, (60, 60, 60), (4, 5, 43, 44, 14, 15)),
    ),
)


def phantom_files(folder: Path, seed: int, **kw) -> tuple[Path, Path]:
    """Write a phantom image and label map as NIfTI; returns their paths."""
    img, lab = make_phantom(seed=seed, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    ip = save_volume(img.array, img.affine, folder / f"ph{seed}_t1.nii.gz")
    lp = save_volume(lab.array, lab.affine, folder / f"ph{seed}_seg.nii.gz", dtype=np.int16)
    return ip, lp


def conformed_pair(seed: int, scheme: LabelScheme, settings: ConformSettings, **kw):
    img, lab = make_phantom(seed=seed, **kw)
    plan = plan_conform(img, settings)
    cls, _ = scheme.encode(lab.array)
    return plan.image(img.array), plan.classes(cls, scheme.num_classes), lab, plan


def phantom_manifest(folder: Path, seeds=(0, 1, 2, 3, 4), split=None, scheme: LabelScheme = TEST_SCHEME,
                     **phantom_kw) -> Path:
    """Phantom scans written as NIfTI plus a manifest (first seeds train, then validation, test)."""
    from quicknat.data.manifest import Manifest, Scan

    kw = {"shape": (96, 96, 96), "spacing": (1.5, 1.5, 1.5), **phantom_kw}
    scans = []
    for s in seeds:
        ip, lp = phantom_files(folder / "scans", s, **kw)
        scans.append(Scan(f"ph{s}", f"ph{s}", str(ip.relative_to(folder)), str(lp.relative_to(folder))))
    ids = [s.id for s in scans]
    split = split or {"seed": 0, "by": "subject", "train": ids[:-2], "validation": ids[-2:-1], "test": ids[-1:]}
    return Manifest("phantoms", scheme.to_dict(), scans, split).save(folder / "manifest.json")


def tiny_config(**kw):
    """A training config small enough for CPU tests (same engine as real training)."""
    from quicknat.config import TrainConfig

    # 3x3 kernels (the product's 5x5 is tested in test_model): the shared tiny model trains in
    # 2/3 of the CPU time and segments the held-back phantom as well (mean Dice 0.91 vs 0.905)
    base = dict(num_filters=8, kernel_size=3, dropout=0.1, optimizer="adam", lr=5e-3, weight_decay=0.0, epochs=4,
                steps_per_epoch=15, batch_size=8, augment=None, conform=TEST_CONFORM, lr_step=2, lr_gamma=0.3)
    base.update(kw)
    return TrainConfig(**base)


def dice_per_class(a: np.ndarray, b: np.ndarray, classes) -> dict[int, float]:
    out = {}
    for c in classes:
        x, y = a == c, b == c
        s = x.sum() + y.sum()
        if s:
            out[int(c)] = float(2 * (x & y).sum() / s)
    return out
