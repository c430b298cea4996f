"""Training configuration: frozen dataclasses with a YAML round trip.

Precedence: defaults < config file (``--config``) < command-line flags. Every run writes its
resolved configuration to ``RUNDIR/config.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .conform import ConformSettings
from .data.slices import AugmentConfig
from .data.synth import SynthConfig
from .errors import QuicknatInputError


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow the QuickNAT paper (SGD, lr 0.1 / 10 every 10 epochs, momentum 0.95,
    weight decay 1e-4); batch size 8 where the paper used 1 for GPU memory reasons."""

    # network
    num_filters: int = 64
    kernel_size: int = 5
    se: str = "none"
    dropout: float = 0.2
    # optimisation
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.95
    weight_decay: float = 1e-4
    lr_step: int = 10  # epochs between learning-rate drops (stepped per epoch)
    lr_gamma: float = 0.1
    epochs: int = 30
    batch_size: int = 8
    grad_clip: float | None = None
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    # loss
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    edge_weight: float = 2.0
    weight_cap: float = 10.0
    # data
    conform: ConformSettings = field(default_factory=ConformSettings)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    min_foreground: float = 0.002
    num_workers: int = 0
    cache_dir: str | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)  # synthetic training: the generator
    # run
    seed: int = 0
    deterministic: bool = False
    val_batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conform"] = self.conform.to_dict()
        d["synth"] = self.synth.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        kw = dict(d)
        if "conform" in kw and isinstance(kw["conform"], dict):
            base = ConformSettings().to_dict()
            base.update(kw["conform"])
            kw["conform"] = ConformSettings.from_dict(base)
        if "synth" in kw and (kw["synth"] is None or isinstance(kw["synth"], dict)):
            kw["synth"] = SynthConfig.from_dict(kw["synth"])
        if "augment" in kw and isinstance(kw["augment"], dict):
            kw["augment"] = AugmentConfig(**kw["augment"])
        return cls(**kw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then non-None ``overrides``."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            base = cfg.to_dict()
            for k, v in data.items():
                if k in ("conform", "synth") and isinstance(v, dict):
                    base[k] = {**base[k], **v}
                else:
                    base[k] = v
            cfg = TrainConfig.from_dict(base)
        except FileNotFoundError:
            raise QuicknatInputError(path, "config file does not exist") from None
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            raise QuicknatInputError(path, f"invalid config ({str(exc).splitlines()[0]})") from None
    return cfg.with_overrides(**overrides)
