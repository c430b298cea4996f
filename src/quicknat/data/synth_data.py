"""Synthetic training data for the training engine: slices generated on the fly from label maps,
fixed synthetic validation volumes, and real labelled scans for validation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..conform import ConformSettings
from ..io import load_volume
from ..labels import LabelScheme
from ..views import get_view
from .manifest import Manifest
from .slices import TrainingData, ValidationSet, VolumeCache, class_weights_for, weight_map
from .synth import LabelMapSynth, SynthConfig

# Classes left out of the mean Dice on real scans when training from SynthSeg's label maps: their
# CSF label is all extra-cerebral CSF, FreeSurfer's aseg CSF a small basal region.
REAL_UNSCORED = ("CSF",)


class SynthSliceDataset(torch.utils.data.Dataset):
    """Synthetic training slices of one view, seeded by (seed, epoch, index).

    Items match :class:`~quicknat.data.slices.SliceDataset` (image (2 * context + 1, H, W), label (H, W) in
    the view's scheme, QuickNAT's weight map) plus ``target`` (C, H, W): the soft class target
    the loss uses (see :class:`quicknat.losses.QuickNATLoss`). ``label`` is its most likely class.

    With ``crop`` (pixels, 0 for whole slices) each item is a ``crop`` x ``crop`` window around
    the slice's labelled region (see :meth:`LabelMapSynth.sample`, which renders only the
    window): the network sees less empty field per step (a 96² crop of a 128² slice costs 56 %
    of its compute and of its generation), and being fully convolutional it segments whole
    slices at inference.
    """

    def __init__(self, synth: LabelMapSynth, view: str, class_weights: np.ndarray, edge_weight: float,
                 length: int, seed: int = 0, crop: int = 0, context: int = 0):
        self.synth = synth
        self.context = context
        self.crop = crop
        self.spec = get_view(view)
        self.merge = torch.from_numpy(self.spec.merge_index(synth.scheme))
        self.num_classes = self.spec.scheme(synth.scheme).num_classes
        self.class_weights = np.asarray(class_weights, dtype=np.float32)
        self.edge_weight = edge_weight
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = (self.seed * 1_000_003 + self.epoch * 100_003 + i) % (2**31)
        img, target = self.synth.sample(self.spec.name, s, context=self.context, crop=self.crop)
        t = torch.from_numpy(target)
        if self.num_classes != t.shape[0]:
            t = torch.zeros((self.num_classes, *t.shape[1:])).index_add_(0, self.merge, t)
        cls = t.argmax(0).numpy()
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "label": torch.from_numpy(cls.astype(np.int64)),
            "target": t,
            "weight": torch.from_numpy(weight_map(cls, self.class_weights, self.edge_weight)),
        }


class SynthVolumes:
    """Whole synthetic volumes from held-out label maps with fixed seeds (validation set);
    quacks like :class:`~quicknat.data.slices.VolumeCache` for the training engine."""

    def __init__(self, synth: LabelMapSynth, ids: list[str], seeds: list[int]):
        self.scheme = synth.scheme
        self.ids = ids
        self.images, self.classes = [], []
        for k, seed in enumerate(seeds):
            img, cls = synth.volume(seed, map_index=k)
            self.images.append(img)
            self.classes.append(cls)


def synthetic_training_data(manifest: Manifest, scheme: LabelScheme, view: str, *, settings: ConformSettings,
                            synth: SynthConfig, length: int, cache_dir: str | Path | None = None,
                            weight_cap: float = 10.0, weight_power: float = 1.0, edge_weight: float = 2.0,
                            seed: int = 0, context: int = 0) -> TrainingData:
    """Training slices generated from the manifest's training label maps (``length`` per
    epoch); validation volumes synthesised from its validation label maps with fixed seeds (the
    same every epoch and run); and its validation scans that have an image (real labelled
    scans), conformed as ``quicknat segment`` does, as the last validation set (the model is
    kept by these when present)."""
    spec = get_view(view)

    def maps(items):
        return [(v.array, v.affine) for v in (load_volume(label) for _, _, label in items)]

    val_items = manifest.labelled("validation")
    train_maps = maps(manifest.labelled("train"))
    counts = np.zeros(scheme.num_classes)
    for arr, _ in train_maps:
        counts += np.bincount(scheme.encode(arr)[0].reshape(-1), minlength=scheme.num_classes)
    weights = class_weights_for(counts, spec.merge_index(scheme), spec.scheme(scheme).num_classes, weight_cap,
                                weight_power)
    generator = LabelMapSynth(train_maps, scheme, settings, synth)
    data = SynthSliceDataset(generator, view, weights, edge_weight, length, seed, crop=synth.crop, context=context)
    label_only = [it for it in val_items if it[1] is None]
    real = [it for it in val_items if it[1] is not None]
    val_synth = LabelMapSynth(maps(label_only), scheme, settings, replace(synth, soft=False))
    sets = [ValidationSet("validation", SynthVolumes(val_synth, [s.id for s, _, _ in label_only],
                                                     [10_000 + k for k in range(len(label_only))]))]
    if real:
        sets.append(ValidationSet("real", VolumeCache(real, scheme, settings, cache_dir), REAL_UNSCORED))
    return TrainingData(data, sets, {"train_scans": len(train_maps), "validation_scans": len(val_items),
                                     "real_validation_scans": len(real), "synthetic": True})
