"""Training configuration: frozen dataclasses with a YAML round trip.

Precedence: defaults < config file (``--config``) < command-line flags. Every run writes its
resolved configuration to ``RUNDIR/config.yaml``.

A config is checked against the dataclasses' own type hints before anything is written: unknown
keys at every level (``conform:``, ``augment:``, ``synth:`` too), value types (``epochs: "2"``
is refused, not coerced) and allowed values (:meth:`TrainConfig.__post_init__`). A bad config
is one :class:`QuicknatInputError` line naming the file, the key and what was expected.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .conform import ConformSettings
from .data.slices import AugmentConfig
from .data.synth import SynthConfig
from .errors import QuicknatInputError
from .model.blocks import SE_TYPES


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-3`` as a number (YAML 1.2), not a string (YAML 1.1)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} " + ("integers" if args[0] is int else "numbers")
    if is_dataclass(tp):
        return "a mapping of keys"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type hint ``tp`` (ints are accepted as floats, lists as
    tuples); ValueError naming ``key`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            if is_dataclass(a) and isinstance(value, dict):
                return _convert(value, a, key)  # its own, more precise error
            try:
                return _convert(value, a, key)
            except ValueError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_convert(v, a, key) for v, a in zip(value, args))
    elif is_dataclass(tp):
        if isinstance(value, dict):
            return tp(**check_section(tp, value, f"{key}."))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ValueError(f"key '{key}': expected {_expected(tp)}, got {value!r}")


def check_section(cls: type, d: Any, prefix: str = "") -> dict[str, Any]:
    """The keys of one config section (a dict for dataclass ``cls``), each checked against its
    type hint; unknown keys are an error. Returns the converted values (not yet range-checked:
    that is the dataclass's own ``__post_init__``)."""
    if not isinstance(d, dict):
        raise ValueError(f"key '{prefix.rstrip('.') or '(top level)'}': expected a mapping of keys, got {d!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(f.name for f in fields(cls))})")
    return {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in d.items()}


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow the QuickNAT paper (SGD, lr 0.1 / 10 every 10 epochs, momentum 0.95,
    weight decay 1e-4); batch size 8 where the paper used 1 for GPU memory reasons."""

    # network
    num_filters: int = 64
    kernel_size: int = 5
    se: str = "none"
    dropout: float = 0.2
    context: int = 0  # neighbouring slices on each side as extra input channels (2.5D, as FastSurfer)
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
    weight_power: float = 1.0  # class weights (median f / f_c) ** power: 1 QuickNAT's, 0 none
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

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"key '{key}': expected {what}, got {getattr(self, key)!r}")

        need(self.optimizer in ("sgd", "adam"), "optimizer", "'sgd' or 'adam'")
        need(self.se in SE_TYPES, "se", " or ".join(repr(t) for t in SE_TYPES))
        for key in ("num_filters", "epochs", "batch_size", "lr_step", "val_batch_size"):
            need(getattr(self, key) >= 1, key, "an integer >= 1")
        need(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "an odd integer >= 1")
        need(self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch", "null or an integer >= 1")
        need(self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(0 <= self.context <= 5, "context", "an integer from 0 to 5")
        need(self.lr > 0, "lr", "a number > 0")
        need(0 < self.lr_gamma <= 1, "lr_gamma", "a number in (0, 1]")
        need(0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        need(0 <= self.min_foreground < 1, "min_foreground", "a number in [0, 1)")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "null or a number > 0")
        for key in ("momentum", "weight_decay", "dice_weight", "ce_weight", "edge_weight", "weight_cap",
                    "weight_power"):
            need(getattr(self, key) >= 0, key, "a number >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conform"] = self.conform.to_dict()
        d["synth"] = self.synth.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from its dict (a YAML file's or a checkpoint's), checked key by key; partial
        ``conform:`` and ``synth:`` sections are completed from the defaults."""
        d = dict(d) if isinstance(d, dict) else d
        if isinstance(d, dict):
            if isinstance(d.get("conform"), dict):
                d["conform"] = {**ConformSettings().to_dict(), **d["conform"]}
            if isinstance(d.get("synth"), dict) and "t1_share" in d["synth"]:
                d["synth"] = SynthConfig.from_dict(d["synth"]).to_dict()  # older key, mapped
            if d.get("synth", {}) is None:
                d["synth"] = {}
        return cls(**check_section(cls, d))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _config_keys(path: Path, keys: dict[str, Any], seen: set[Path]) -> dict[str, Any]:
    """``keys`` updated by the YAML file at ``path``; a file's ``base:`` (a path relative to it)
    is read first, so a recipe can say only what it changes."""
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise QuicknatInputError(path, "config file does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise QuicknatInputError(path, f"cannot read the config ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"expected a mapping of keys at the top level, got {type(data).__name__}")
    data = dict(data or {})
    if "base" in data:
        seen = seen | {path.resolve()}
        base = path.parent / str(data.pop("base"))
        if base.resolve() in seen:
            raise ValueError(f"base {base} includes itself")
        keys = _config_keys(base, keys, seen)
    for k, v in data.items():
        keys[k] = {**keys[k], **v} if k in ("conform", "synth") and isinstance(v, dict) and k in keys else v
    return keys


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then non-None ``overrides`` (command-line flags)."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            cfg = TrainConfig.from_dict(_config_keys(path, cfg.to_dict(), set()))
        except (ValueError, TypeError) as exc:
            raise QuicknatInputError(path, f"invalid config: {str(exc).splitlines()[0]}") from None
    try:
        return cfg.with_overrides(**overrides)
    except (ValueError, TypeError) as exc:
        raise QuicknatInputError(None, f"invalid option: {str(exc).splitlines()[0]}") from None
