"""Slice data sets for training one view, conformed exactly as ``quicknat segment`` conforms.

* **Volumes** are read, conformed (:func:`quicknat.conform.plan_conform`, the same code as
  inference) and encoded to class indices of the scheme once, then kept in memory (image
  float16, classes uint8) or in a cache folder of ``.npy`` files that workers memory-map. No
  PNG anywhere: labels stay integer volumes end to end.
* **Slices** of a view are kept when at least ``min_foreground`` (default 0.2 %) of their
  pixels are labelled foreground; mostly-empty slices are dropped.
* **Weights**: QuickNAT's per-pixel weight map, ``w = w_class[label] + w0 * edge``, where
  ``w_class`` is median-frequency balancing over the training set (``median(f) / f_c`` with
  true division, ``f_c`` the fraction of voxels of class ``c`` among all training voxels,
  capped at ``weight_cap`` = 10; classes never seen get weight 0; ``weight_power`` < 1 tempers
  them: ``(median(f) / f_c) ** weight_power``), and ``edge`` marks pixels one
  of whose 4 neighbours has another class. ``w0`` defaults to 2 (the original QuickNAT code;
  FastSurfer uses 5).
* **Augmentation** (optional, training only): left-right flip with the lateral classes swapped
  (coronal and axial views: their slices contain the left-right axis), then TorchIO's
  RandomAffine (in-plane rotation ±15°, scaling ±10 %), RandomElasticDeformation, RandomBiasField,
  RandomGamma and RandomNoise. Each sample's randomness is seeded by (seed, epoch, index), so a
  run is reproducible whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..conform import ConformSettings, plan_conform
from ..errors import QuicknatInputError
from ..io import atomic_write_npy, load_volume, same_grid
from ..labels import LabelScheme
from ..views import get_view, slices, with_context
from .manifest import Manifest, Scan

log = logging.getLogger(__name__)

MIN_FOREGROUND = 0.002
WEIGHT_CAP = 10.0
EDGE_WEIGHT = 2.0


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5
    rotation: float = 15.0
    scaling: float = 0.1
    elastic: float = 0.25  # probability (elastic deformation is the slowest transform)
    bias: float = 0.3
    gamma: float = 0.3
    noise: float = 0.03


def edge_map(classes: np.ndarray) -> np.ndarray:
    """Pixels one of whose 4 neighbours has another class (2D or batched 2D, last two axes)."""
    c = np.asarray(classes)
    edge = np.zeros(c.shape, dtype=bool)
    d0 = c[..., 1:, :] != c[..., :-1, :]
    d1 = c[..., :, 1:] != c[..., :, :-1]
    edge[..., 1:, :] |= d0
    edge[..., :-1, :] |= d0
    edge[..., :, 1:] |= d1
    edge[..., :, :-1] |= d1
    return edge


def median_frequency_weights(counts: np.ndarray, cap: float = WEIGHT_CAP, power: float = 1.0) -> np.ndarray:
    """Class weights ``(median(f) / f_c) ** power`` over classes present (true division), capped."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    if present.any():
        freq = counts[present] / counts.sum()
        w[present] = np.minimum((np.median(freq) / freq) ** power, cap)
    return w


def weight_map(classes: np.ndarray, class_weights: np.ndarray, w0: float = EDGE_WEIGHT) -> np.ndarray:
    """QuickNAT's per-pixel loss weight: class weight plus ``w0`` on label edges."""
    return (class_weights[np.asarray(classes, dtype=np.int64)] + w0 * edge_map(classes)).astype(np.float32)


def _cache_key(scan: Scan, settings: ConformSettings, scheme: LabelScheme) -> str:
    text = repr((scan.image, scan.label, settings.to_dict(), scheme.to_dict()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class VolumeCache:
    """Conformed images (float16) and class maps (uint8) of scans, computed once."""

    def __init__(self, scans: list[tuple[Scan, Path | None, Path]], scheme: LabelScheme,
                 settings: ConformSettings, cache_dir: str | Path | None = None):
        self.scheme = scheme
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.images: list[np.ndarray] = []
        self.classes: list[np.ndarray] = []
        self.ids: list[str] = []
        self.unknown: dict[int, int] = {}
        for scan, image_path, label_path in scans:
            img, cls = self._load(scan, image_path, label_path)
            self.images.append(img)
            self.classes.append(cls)
            self.ids.append(scan.id)

    def _load(self, scan: Scan, image_path: Path | None, label_path: Path):
        if self.cache_dir is not None:
            key = _cache_key(scan, self.settings, self.scheme)
            ip, cp = self.cache_dir / f"{scan.id}-{key}-img.npy", self.cache_dir / f"{scan.id}-{key}-cls.npy"
            if ip.exists() and cp.exists():
                return np.load(ip, mmap_mode="r"), np.load(cp, mmap_mode="r")
        lab = load_volume(label_path)
        classes, unknown = self.scheme.encode(lab.array, path=label_path)
        for k, v in unknown.items():
            self.unknown[k] = self.unknown.get(k, 0) + v
        if image_path is not None:
            image = load_volume(image_path)
            if not same_grid(image, lab):
                raise QuicknatInputError(label_path, "label and image do not share geometry")
            plan = plan_conform(image, self.settings)
            img = plan.image(image.array).astype(np.float16)
        else:  # label maps only (synthetic training): conform the label map's geometry
            plan = plan_conform(lab.with_array((classes > 0).astype(np.float32)), self.settings)
            img = np.zeros(plan.shape, dtype=np.float16)
        cls = plan.classes(classes, self.scheme.num_classes)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for path, arr in ((ip, img), (cp, cls)):
                atomic_write_npy(path, arr)
            return np.load(ip, mmap_mode="r"), np.load(cp, mmap_mode="r")
        return img, cls

    def class_counts(self) -> np.ndarray:
        counts = np.zeros(self.scheme.num_classes, dtype=np.int64)
        for c in self.classes:
            counts += np.bincount(np.asarray(c).reshape(-1), minlength=self.scheme.num_classes)
        return counts


class SliceDataset(Dataset):
    """2D slices of one view: ``{"image": (1,H,W) float32, "label": (H,W) int64, "weight": (H,W)}``;
    with ``context`` the image holds the slice's neighbours too, ``(2 * context + 1, H, W)``
    (:func:`quicknat.views.with_context`), augmented together.

    Labels are class indices of the view's scheme (left/right merged for the sagittal view).
    """

    def __init__(
        self,
        cache: VolumeCache,
        view: str,
        class_weights: np.ndarray | None = None,
        edge_weight: float = EDGE_WEIGHT,
        min_foreground: float = MIN_FOREGROUND,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        context: int = 0,
    ):
        self.cache = cache
        self.context = context
        self.spec = get_view(view)
        full = cache.scheme
        self.scheme = self.spec.scheme(full)
        self.merge = self.spec.merge_index(full)
        self.swap = full.lr_swap_index()
        if class_weights is None:
            counts = np.bincount(self.merge, weights=cache.class_counts(), minlength=self.scheme.num_classes)
            class_weights = median_frequency_weights(counts)
        self.class_weights = np.asarray(class_weights, dtype=np.float32)
        self.edge_weight = edge_weight
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.index: list[tuple[int, int]] = []
        for v, cls in enumerate(cache.classes):
            st = slices(np.asarray(cls), self.spec)
            frac = (st.reshape(len(st), -1) > 0).mean(1)
            self.index += [(v, int(s)) for s in np.flatnonzero(frac >= min_foreground)]
        self._transform = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _tio(self):
        if self._transform is None:
            import torchio as tio

            a = self.augment
            assert a is not None
            tfs = [
                tio.RandomAffine(scales=(1 - a.scaling, 1 + a.scaling, 1 - a.scaling, 1 + a.scaling, 1, 1),
                                 degrees=(0, 0, 0, 0, -a.rotation, a.rotation), isotropic=False,
                                 default_pad_value=0),
                tio.RandomElasticDeformation(num_control_points=(7, 7, 5), max_displacement=(6, 6, 0),
                                             locked_borders=2, p=a.elastic),
                tio.RandomBiasField(coefficients=a.bias),
                tio.RandomGamma(log_gamma=(-a.gamma, a.gamma)),
                tio.RandomNoise(std=(0, a.noise)),
            ]
            self._transform = tio.Compose(tfs)
        return self._transform

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, s = self.index[i]
        img = np.asarray(with_context(slices(self.cache.images[v], self.spec), [s], self.context)[0], np.float32)
        cls = np.asarray(slices(self.cache.classes[v], self.spec)[s]).astype(np.int64)
        if self.augment is not None:
            img, cls = self._augment(img, cls, i)
        cls = self.merge[cls]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "label": torch.from_numpy(np.ascontiguousarray(cls)),
            "weight": torch.from_numpy(weight_map(cls, self.class_weights, self.edge_weight)),
        }

    def _augment(self, img: np.ndarray, cls: np.ndarray, i: int):
        import torchio as tio

        seed = int.from_bytes(hashlib.sha1(f"{self.seed}-{self.epoch}-{i}".encode()).digest()[:4], "little")
        rng = np.random.default_rng(seed)
        # conformed axis 0 is left-right; it is the slice's first axis in coronal/axial views
        if not self.spec.merge_lr and self.spec.lateral_in_plane and rng.random() < self.augment.flip:
            img, cls = img[:, ::-1], self.swap[cls[::-1]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            subject = tio.Subject(
                image=tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(img))[..., None]),
                label=tio.LabelMap(tensor=torch.from_numpy(np.ascontiguousarray(cls))[None, ..., None]),
            )
            out = self._tio()(subject)
        img = out["image"].data[..., 0].numpy().clip(0, None)
        cls = out["label"].data[0, ..., 0].numpy().round().astype(np.int64)
        return img, cls


def volume_slices(image: np.ndarray, view: str) -> np.ndarray:
    """All slices of a conformed volume for one view, (N, H, W) float32 (for validation)."""
    return np.ascontiguousarray(slices(np.asarray(image, dtype=np.float32), view))


class ValidationVolumes(Protocol):
    """Whole conformed validation volumes: images and class maps of the full scheme, by ID
    (:class:`VolumeCache` for real scans, :class:`~quicknat.data.synth.SynthVolumes`)."""

    scheme: LabelScheme
    ids: list[str]
    images: Sequence[np.ndarray]
    classes: Sequence[np.ndarray]


@dataclass
class ValidationSet:
    """A named validation set; ``unscored`` classes are left out of its mean Dice."""

    name: str
    volumes: ValidationVolumes
    unscored: tuple[str, ...] = ()


@dataclass
class TrainingData:
    """What the training engine needs of the data for one view: training slices, validation
    sets (the model is kept by the last one's mean Dice) and provenance facts."""

    dataset: Dataset
    validation: list[ValidationSet]
    facts: dict = field(default_factory=dict)


def class_weights_for(counts: np.ndarray, merge: np.ndarray, num_classes: int, cap: float,
                      power: float = 1.0) -> np.ndarray:
    """Median-frequency weights of a view's classes from voxel counts of the full scheme."""
    return median_frequency_weights(np.bincount(merge, weights=counts, minlength=num_classes), cap, power)


def real_training_data(manifest: Manifest, scheme: LabelScheme, view: str, *, settings: ConformSettings,
                       cache_dir: str | Path | None = None, weight_cap: float = WEIGHT_CAP, weight_power: float = 1.0,
                       edge_weight: float = EDGE_WEIGHT, min_foreground: float = MIN_FOREGROUND,
                       augment: AugmentConfig | None = None, seed: int = 0, context: int = 0) -> TrainingData:
    """Slices of the manifest's labelled training scans; its validation scans, whole."""
    spec = get_view(view)
    train_cache = VolumeCache(manifest.labelled("train"), scheme, settings, cache_dir)
    val_cache = VolumeCache(manifest.labelled("validation"), scheme, settings, cache_dir)
    if train_cache.unknown:
        log.warning("label IDs not in scheme %s (set to background): %s", scheme.name,
                    dict(sorted(train_cache.unknown.items())[:10]))
    weights = class_weights_for(train_cache.class_counts(), spec.merge_index(scheme),
                                spec.scheme(scheme).num_classes, weight_cap, weight_power)
    data = SliceDataset(train_cache, view, weights, edge_weight, min_foreground, augment, seed, context)
    return TrainingData(data, [ValidationSet("validation", val_cache)],
                        {"train_scans": len(train_cache.ids), "validation_scans": len(val_cache.ids),
                         "synthetic": False})
