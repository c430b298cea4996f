"""Small data and a tiny fitted model for tests (no ../shared, no internet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quicknat.checkpoint import make_checkpoint, save_checkpoint, save_model
from quicknat.conform import ConformSettings, plan_conform
from quicknat.data.phantom import make_phantom
from quicknat.io import save_volume
from quicknat.labels import LabelClass, LabelScheme
from quicknat.model import QuickNAT, QuickNATConfig
from quicknat.views import VIEWS, get_view, slices

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


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    return F.cross_entropy(logits, target) + dice


def fit_tiny_model(
    folder: Path,
    scheme: LabelScheme = TEST_SCHEME,
    settings: ConformSettings = TEST_CONFORM,
    seeds=(0, 1, 2),
    steps: int = 200,
    filters: int = 12,
    batch: int = 8,
    views=tuple(VIEWS),
    phantom_kw: dict | None = None,
) -> Path:
    """Fit a tiny QuickNAT per view on phantoms (Adam, CE + Dice) and save a model folder."""
    torch.manual_seed(0)
    kw = {"shape": (96, 96, 96), "spacing": (1.5, 1.5, 1.5), **(phantom_kw or {})}
    data = [conformed_pair(s, scheme, settings, **kw)[:2] for s in seeds]
    paths = {}
    for view in views:
        spec = get_view(view)
        vscheme = spec.scheme(scheme)
        merge = scheme.lr_merge_index() if spec.merge_lr else np.arange(scheme.num_classes)
        xs, ys = [], []
        for img, cls in data:
            sx, sy = slices(img, view), slices(merge[cls], view)
            keep = sx.reshape(len(sx), -1).max(1) > 0.02
            xs.append(sx[keep])
            ys.append(sy[keep])
        x = torch.from_numpy(np.concatenate(xs)).float()[:, None]
        y = torch.from_numpy(np.concatenate(ys)).long()
        net = QuickNAT(QuickNATConfig(num_classes=vscheme.num_classes, num_filters=filters, dropout=0.1))
        opt = torch.optim.Adam(net.parameters(), lr=5e-3)
        gen = torch.Generator().manual_seed(0)
        net.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            loss = soft_dice_ce(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        ck = make_checkpoint(net.eval(), view, scheme, settings, {"data": "phantoms", "steps": steps})
        paths[view] = save_checkpoint(ck, folder / f"{view}.pt")
    save_model(folder, paths)
    return folder


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

    base = dict(num_filters=12, dropout=0.1, optimizer="adam", lr=5e-3, weight_decay=0.0, epochs=4,
                steps_per_epoch=50, batch_size=8, augment=None, conform=TEST_CONFORM, lr_step=3, lr_gamma=0.2)
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
