"""Checkpoints that describe themselves, and models made of three view checkpoints.

A view checkpoint is one ``torch.save`` file of plain containers and tensors, loadable with
``torch.load(weights_only=True)`` (no pickled code is ever executed)::

    {"format": "quicknat-checkpoint", "format_version": 1, "quicknat_version": "...",
     "view": "coronal", "arch": {...QuickNATConfig...}, "scheme": {...full LabelScheme...},
     "conform": {...ConformSettings...}, "provenance": {...}, "state_dict": {...},
     "training_state": {...optional: optimiser, scheduler, scaler, RNG, epoch...}}

``scheme`` is always the *full* scheme; the sagittal network's classes are the scheme with
left/right pairs merged (see :mod:`quicknat.views`), and loading checks the classifier's size
against that.

A *model* is a folder with ``model.json``::

    {"format": "quicknat-model", "format_version": 1,
     "views": {"coronal": {"file": "coronal.pt", "weight": 0.4}, ...}, "flip": true}

(a folder of ``coronal.pt``/``axial.pt``/``sagittal.pt`` without ``model.json`` works too, with
the default weights), or a single view checkpoint file. Loading refuses views whose label schemes
or conform settings disagree; only the grid (voxel size and shape) may differ between views, and
:class:`quicknat.segment.Segmenter` aggregates them on the finest. :mod:`quicknat.export` writes
models for shipping.
"""

from __future__ import annotations

import datetime as _dt
import io as _io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .conform import ConformSettings
from .errors import ModelNotFoundError, QuicknatInputError
from .io import atomic_write_bytes, atomic_write_text
from .labels import LabelScheme
from .model import QuickNAT, QuickNATConfig, widen_filters, widen_input
from .views import VIEWS, get_view

log = logging.getLogger(__name__)

FORMAT = "quicknat-checkpoint"
MODEL_FORMAT = "quicknat-model"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "view", "arch", "scheme", "conform", "state_dict")


@dataclass
class ViewCheckpoint:
    """One view's network with everything needed to use it correctly."""

    view: str
    config: QuickNATConfig
    scheme: LabelScheme
    conform: ConformSettings
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    quicknat_version: str = __version__
    training_state: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def view_scheme(self) -> LabelScheme:
        return get_view(self.view).scheme(self.scheme)

    def build(self) -> QuickNAT:
        """The network with these weights, loaded strictly, in eval mode."""
        net = QuickNAT(self.config)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()

    def to_dict(self, half: bool = False) -> dict[str, Any]:
        sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in self.state_dict.items()}
        d: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "quicknat_version": self.quicknat_version,
            "view": self.view,
            "arch": self.config.to_dict(),
            "scheme": self.scheme.to_dict(),
            "conform": self.conform.to_dict(),
            "provenance": self.provenance,
            "state_dict": sd,
        }
        if self.training_state is not None:
            d["training_state"] = self.training_state
        return d


def save_checkpoint(ckpt: ViewCheckpoint, path: str | Path, half: bool = False) -> Path:
    """Write a view checkpoint atomically (``half``: float16 weights, for shipping)."""
    path = Path(path)
    buf = _io.BytesIO()
    torch.save(ckpt.to_dict(half=half), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def make_checkpoint(
    net: QuickNAT,
    view: str,
    scheme: LabelScheme,
    conform: ConformSettings,
    provenance: dict[str, Any] | None = None,
) -> ViewCheckpoint:
    """Wrap a network for saving; checks its classifier fits the view's scheme."""
    spec = get_view(view)
    expected = spec.scheme(scheme).num_classes
    if net.config.num_classes != expected:
        raise ValueError(f"{view} network has {net.config.num_classes} classes; scheme needs {expected}")
    prov = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
    sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return ViewCheckpoint(view, net.config, scheme, conform, sd, prov)


def _load_problem(exc: BaseException) -> str:
    """torch.load's failure in our words: its advice to pass ``weights_only=False`` (run the
    file's pickled code) is exactly what a user must not do, so it is never quoted."""
    text = str(exc)
    if "weights_only" in text or "Unpickler" in text:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        why = f": {detail.group(1).strip()[:100]}" if detail else ""
        return f"the weights-only loader refused it{why}; quicknat never runs code from a checkpoint"
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return "truncated or not a torch file"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first.split(". ")[0][:160]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ViewCheckpoint:
    """Load and validate a view checkpoint (weights_only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise QuicknatInputError(path, "checkpoint does not exist")
    try:
        with warnings.catch_warnings():  # torch's protocol notes are not for our users
            warnings.simplefilter("ignore", UserWarning)
            d = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise QuicknatInputError(path, f"not a loadable quicknat checkpoint ({_load_problem(exc)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or any(k not in d for k in _REQUIRED):
        raise QuicknatInputError(path, "not a quicknat checkpoint (missing format fields)")
    if int(d["format_version"]) > FORMAT_VERSION:
        raise QuicknatInputError(path, f"checkpoint format {d['format_version']} is newer than this quicknat")
    try:
        view = get_view(str(d["view"])).name
        config = QuickNATConfig.from_dict(d["arch"])
        scheme = LabelScheme.from_dict(d["scheme"])
        conform = ConformSettings.from_dict(d["conform"])
    except (KeyError, TypeError, ValueError) as exc:
        raise QuicknatInputError(path, f"invalid checkpoint metadata ({exc})") from None
    ck = ViewCheckpoint(
        view, config, scheme, conform, dict(d["state_dict"]), dict(d.get("provenance") or {}),
        str(d.get("quicknat_version", "?")), d.get("training_state"), path,
    )
    if config.num_classes != ck.view_scheme.num_classes:
        raise QuicknatInputError(
            path, f"{view} network has {config.num_classes} classes but scheme {scheme.name!r} needs "
            f"{ck.view_scheme.num_classes}"
        )
    try:
        QuickNAT(config).load_state_dict(ck.state_dict, strict=True)
    except RuntimeError as exc:
        raise QuicknatInputError(path, f"weights do not match the architecture ({str(exc).splitlines()[0]})") from None
    return ck


@dataclass
class Model:
    """The view checkpoints of one model and their aggregation weights."""

    views: dict[str, ViewCheckpoint]
    weights: dict[str, float]
    path: Path | None = None
    flip: bool = True  # test-time left-right flip averaging unless the caller says otherwise

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a model needs at least one view")
        first = next(iter(self.views.values()))
        for name, ck in self.views.items():
            where = ck.path or name
            if ck.view != name:
                raise QuicknatInputError(where, f"holds the {ck.view} view, listed as {name}")
            if ck.scheme != first.scheme:
                raise QuicknatInputError(where, f"label scheme {ck.scheme.name!r} disagrees with {first.view}'s")
            if replace(ck.conform, voxel_size=first.conform.voxel_size, shape=first.conform.shape) != first.conform:
                raise QuicknatInputError(where, f"conform settings disagree with {first.view}'s (only the grid's "
                                                "voxel size and shape may differ)")

    @property
    def scheme(self) -> LabelScheme:
        return next(iter(self.views.values())).scheme

    @property
    def conform(self) -> ConformSettings:
        """The finest grid of the model's views: where their probabilities are aggregated."""
        return min((ck.conform for ck in self.views.values()), key=lambda c: c.voxel_size)

    @property
    def grids(self) -> dict[ConformSettings, list[str]]:
        """The views grouped by the grid they run on, the finest (:attr:`conform`) first."""
        out: dict[ConformSettings, list[str]] = {self.conform: []}
        for name, ck in self.views.items():
            out.setdefault(ck.conform, []).append(name)
        return out


def load_init(net: QuickNAT, init: str | Path, view: str, scheme: LabelScheme, reset_classifier: bool) -> None:
    """Load a pre-trained view checkpoint (a file, or a model folder's ``VIEW.pt``) into ``net``
    (fine-tuning); with ``reset_classifier`` a checkpoint of another label scheme gives all but
    the classifier."""
    path = Path(init)
    if path.is_dir():
        path = path / f"{view}.pt"
    ck = load_checkpoint(path)
    if ck.view != view:
        raise QuicknatInputError(path, f"holds the {ck.view} view, not {view}")
    ours = replace(net.config, num_classes=ck.config.num_classes, dropout=ck.config.dropout,
                   in_channels=ck.config.in_channels, num_filters=ck.config.num_filters)
    if (ours != ck.config or ck.config.in_channels > net.config.in_channels
            or ck.config.num_filters > net.config.num_filters):
        raise QuicknatInputError(path, "architecture differs from this run's (kernel, SE, depth, more filters "
                                       "or more input slices)")
    if ck.scheme != scheme and not reset_classifier:
        raise QuicknatInputError(
            path, f"label scheme {ck.scheme.name!r} differs from the data's {scheme.name!r}; "
            "pass --reset-classifier to re-initialise the classifier"
        )
    state = dict(ck.state_dict)
    if ck.config.num_filters != net.config.num_filters:  # a narrow network warm-starts a wider one
        wide = replace(net.config, num_classes=ck.config.num_classes, in_channels=ck.config.in_channels)
        own = net.state_dict() if wide == net.config else QuickNAT(wide).state_dict()
        try:
            state = widen_filters(state, own, wide, ck.config.num_filters)
        except ValueError as exc:
            raise QuicknatInputError(path, f"architecture differs from this run's: {exc}") from None
    if ck.config.in_channels != net.config.in_channels:  # a 2D view warm-starts a 2.5D one
        state = widen_input(state, net.state_dict(), ck.config.in_channels, net.config.in_channels)
    if ck.scheme != scheme:
        own = net.state_dict()
        for k in ("classifier.weight", "classifier.bias"):
            state[k] = own[k]
    net.load_state_dict(state, strict=True)


def save_model(folder: str | Path, checkpoints: dict[str, str | Path], weights: dict[str, float] | None = None,
               flip: bool = True) -> Path:
    """Write ``model.json`` in ``folder`` naming view checkpoint files (relative to it), their
    aggregation weights and whether the model runs with test-time flip averaging by default."""
    folder = Path(folder)
    weights = weights or {v: VIEWS[v].weight for v in checkpoints}
    spec = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "views": {
            v: {"file": os.path.relpath(Path(p), folder), "weight": float(weights[v])} for v, p in checkpoints.items()
        },
        "flip": bool(flip),
    }
    atomic_write_text(folder / "model.json", json.dumps(spec, indent=2) + "\n")
    return folder / "model.json"


def check_weights(weights: dict[str, float], views: Iterable[str], where: str | Path) -> dict[str, float]:
    """View aggregation weights, checked: views of the model, finite and non-negative."""
    views = set(views)
    for v, w in weights.items():
        if v not in views:
            raise QuicknatInputError(where, f"a weight for the {v} view, which the model does not hold "
                                            f"(views: {', '.join(sorted(views))})")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise QuicknatInputError(where, f"the {v} view's weight must be a number >= 0, not {w!r}")
    if weights and sum(weights.values()) <= 0:
        raise QuicknatInputError(where, "the view weights sum to 0")
    return {v: float(w) for v, w in weights.items()}


def installed_models() -> dict[str, Path]:
    """Models shipped inside the package (``quicknat/models/NAME/model.json``)."""
    root = Path(str(resources.files("quicknat"))) / "models"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "model.json").is_file()}


DEFAULT_MODEL = "default"


def load_model(model: str | Path | Model | None = None) -> Model:
    """Load a model by installed name, folder, or single view checkpoint file."""
    if isinstance(model, Model):
        return model
    installed = installed_models()
    if model is None:
        if DEFAULT_MODEL not in installed:
            raise ModelNotFoundError(
                "no model is installed; train one with 'quicknat train' and pass --model RUNDIR "
                "(a model folder or a view checkpoint .pt)"
            )
        model = installed[DEFAULT_MODEL]
    elif str(model) in installed and not Path(model).exists():
        model = installed[str(model)]
    path = Path(model)
    if not path.exists():
        names = ", ".join(installed) or "none installed"
        raise ModelNotFoundError(f"{path}: no such model folder or checkpoint (installed models: {names})")
    if path.is_file():
        ck = load_checkpoint(path)
        return Model({ck.view: ck}, {ck.view: 1.0}, path)
    spec_path = path / "model.json"
    flip = True
    if spec_path.is_file():
        entries, flip = read_model_spec(spec_path)
    else:
        entries = {v: (path / f"{v}.pt", VIEWS[v].weight) for v in VIEWS if (path / f"{v}.pt").is_file()}
        if not entries:
            raise ModelNotFoundError(f"{path}: folder holds no model.json and no coronal/axial/sagittal.pt")
    views = {v: load_checkpoint(p) for v, (p, _) in entries.items()}
    for v in views:
        get_view(v)
    return Model(views, {v: w for v, (_, w) in entries.items()}, path, flip)


def read_model_spec(spec_path: Path) -> tuple[dict[str, tuple[Path, float]], bool]:
    """A model folder's ``model.json``: view -> (checkpoint file, weight), the weights checked;
    and the model's default for test-time flip averaging (``"flip"``, on when absent)."""
    try:
        spec = json.loads(spec_path.read_text())
        entries = {v: (spec_path.parent / e["file"], float(e["weight"])) for v, e in spec["views"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise QuicknatInputError(spec_path, f"invalid model description ({exc})") from None
    if spec.get("format") != MODEL_FORMAT:
        raise QuicknatInputError(spec_path, "not a quicknat model description")
    flip = spec.get("flip", True)
    if not isinstance(flip, bool):
        raise QuicknatInputError(spec_path, f"invalid model description (flip must be true or false, not {flip!r})")
    check_weights({v: w for v, (_, w) in entries.items()}, entries, spec_path)
    return entries, flip
