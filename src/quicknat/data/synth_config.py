"""The settings of the synthetic training-data generator (:mod:`quicknat.data.synth`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class SynthConfig:
    """The generator's settings (a typed part of :class:`quicknat.config.TrainConfig`)."""

    rotation: float = 15.0
    scaling: float = 0.2
    shearing: float = 0.012
    translation: float = 20.0
    flip: float = 0.5
    deform_std: float = 4.0
    deform_grid: int = 5
    mean_range: tuple[float, float] = (25.0, 225.0)
    std_range: tuple[float, float] = (5.0, 25.0)
    random_share: float = 0.25  # share of random-contrast samples (the rest T1-like)
    priors: str | None = None  # folder with SynthSeg's T1 priors (see module docstring)
    strip_prob: float = 0.25
    head_slices: float = 0.1  # share of slices placed anywhere in the head, brain or not
    bias_std: float = 0.7
    bias_grid: int = 4
    thick_prob: float = 0.3
    max_thickness: float = 6.0  # mm
    blur_max: float = 1.0  # conformed voxels
    noise_max: float = 12.0
    gamma_std: float = 0.3
    # cortex brighter (in T1) near its white matter, as real cortex is (more myelinated deep layers):
    # each sample adds to a cortex voxel a ~ U(0, cortex_gradient) of its hemisphere's WM - cortex
    # mean difference, times exp(-(depth - 1 mm) / cortex_gradient_mm) (depth: its distance to WM)
    cortex_gradient: float = 0.0
    cortex_gradient_mm: float = 1.5
    soft: bool = True  # sub-voxel averaging and soft targets when the grid is coarser than the maps
    crop: int = 0  # train on crops of crop x crop pixels around the slice's labelled region (0: whole slices)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "priors":
                if v is not None and not isinstance(v, str):
                    raise ValueError("synth.priors must be a folder path")
            elif f.name == "soft":
                if not isinstance(v, bool):
                    raise ValueError("synth.soft must be true or false")
            elif f.name in ("mean_range", "std_range"):
                if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v)
                        and 0 <= v[0] <= v[1]):
                    raise ValueError(f"synth.{f.name} must be two numbers low <= high")
                object.__setattr__(self, f.name, (float(v[0]), float(v[1])))
            elif not _is_number(v) or v < 0:
                raise ValueError(f"synth.{f.name} must be a non-negative number")
        for name in ("flip", "random_share", "strip_prob", "head_slices", "thick_prob", "cortex_gradient"):
            if getattr(self, name) > 1:
                raise ValueError(f"synth.{name} is a probability (0-1)")
        if not isinstance(self.crop, int) or self.crop % 16:
            raise ValueError("synth.crop must be 0 (whole slices) or a multiple of 16 (the network pools 4 times)")
        if self.cortex_gradient_mm <= 0:
            raise ValueError("synth.cortex_gradient_mm must be positive")
        if self.deform_grid < 2 or self.bias_grid < 2:
            raise ValueError("synth.deform_grid and synth.bias_grid must be at least 2")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_range"], d["std_range"] = list(self.mean_range), list(self.std_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SynthConfig:
        d = dict(d or {})
        if "t1_share" in d:  # older configs: share of T1-like samples
            d["random_share"] = 1.0 - float(d.pop("t1_share"))
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown synth keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
