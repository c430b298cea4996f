"""What a segmentation returns: :class:`SegmentationResult`, the labels on the scan's own grid
with what the outputs (:mod:`quicknat.outputs`) and QC need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cohort import volume_summary
from .conform import ConformPlan
from .io import Volume
from .labels import LabelScheme


@dataclass
class SegmentationResult:
    """A scan's segmentation on its own grid, plus what the outputs and QC need."""

    volume: Volume
    scheme: LabelScheme
    classes: np.ndarray  # native grid, class indices
    plan: ConformPlan
    conformed_image: np.ndarray
    conformed_classes: np.ndarray
    posteriors: np.ndarray | None = None  # native grid, (C, X, Y, Z) float32
    uncertainty: np.ndarray | None = None  # native grid, entropy of the mean probability
    qc: list[dict] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """Label IDs of the scheme, on the input's grid."""
        return self.scheme.decode(self.classes)

    def volumes(self) -> list[dict]:
        """Volume (mm³) of every structure of the scheme, from the native voxel size, then
        ``BrainSegVol`` and ``IntracranialVol`` (:func:`quicknat.cohort.volume_summary`)."""
        counts = np.bincount(self.classes.reshape(-1).astype(np.int64), minlength=self.scheme.num_classes)
        vv = self.volume.voxel_volume
        rows = [
            {
                "structure": c.name,
                "label": c.label,
                "voxels": int(counts[k]),
                "volume_mm3": round(float(counts[k]) * vv, 3),
            }
            for k, c in enumerate(self.scheme.classes)
            if k != 0
        ]
        return rows + volume_summary(rows)
