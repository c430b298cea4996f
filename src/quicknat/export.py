"""Shipping a model: ``quicknat export`` gathers view checkpoints into a model folder (weights
only, float16 by default, the model card merged into each view's provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import (
    Model,
    ViewCheckpoint,
    check_weights,
    load_checkpoint,
    read_model_spec,
    save_checkpoint,
    save_model,
)
from .errors import QuicknatInputError
from .views import VIEWS


def export_model(sources: list[str | Path], out: str | Path, *, provenance: dict[str, Any] | None = None,
                 half: bool = True, weights: dict[str, float] | None = None, flip: bool | None = None) -> Path:
    """Gather view checkpoints into a model folder for shipping: weights only (float16 by
    default), without training state, ``provenance`` merged into each view's provenance.

    ``sources`` are checkpoint files or run/model folders (their ``VIEW.pt`` files); each
    checkpoint says which view it holds, and a later source's view replaces an earlier one's.
    A view's aggregation weight is, in order of precedence: ``weights``; the weight the first
    source's ``model.json`` gives it when that source is a model folder (the model being updated:
    replacing its views keeps its weights); the view's default (:data:`quicknat.views.VIEWS`).
    ``flip``, the model's default for test-time flip averaging, likewise: given, else the first
    source model's, else on.
    """
    out = Path(out)
    found: dict[str, ViewCheckpoint] = {}
    base_spec = Path(sources[0]) / "model.json"
    inherited, base_flip = read_model_spec(base_spec) if base_spec.is_file() else ({}, True)
    inherited = {v: w for v, (_, w) in inherited.items()}
    for src in map(Path, sources):
        files = [src / f"{v}.pt" for v in VIEWS if (src / f"{v}.pt").exists()] if src.is_dir() else [src]
        if not files:
            raise QuicknatInputError(src, "holds no view checkpoint (coronal.pt, axial.pt, sagittal.pt)")
        for f in files:
            ck = load_checkpoint(f)
            found[ck.view] = ck
    views = {v: found[v] for v in VIEWS if v in found}
    chosen = check_weights({v: VIEWS[v].weight for v in views} | inherited | (weights or {}), views, out)
    model = Model(views, chosen, out, base_flip if flip is None else flip)  # schemes and conform settings agree
    paths = {}
    for view, ck in views.items():
        ck.training_state = None
        ck.provenance = {**ck.provenance, **(provenance or {})}
        paths[view] = save_checkpoint(ck, out / f"{view}.pt", half=half)
    save_model(out, paths, model.weights, model.flip)
    return out


def read_provenance(path: Path) -> dict[str, Any]:
    """A model card (a JSON object) for :func:`export_model`'s ``provenance``, checked."""
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QuicknatInputError(path, f"cannot read provenance JSON ({exc})") from None
    if not isinstance(card, dict):
        raise QuicknatInputError(path, "provenance must be a JSON object")
    return card


def parse_view_weights(items: list[str]) -> dict[str, float]:
    """``["coronal=1", "axial=0.5"]`` -> ``{"coronal": 1.0, "axial": 0.5}`` (the CLI's ``--weights``)."""
    weights = {}
    for item in items:
        view, _, value = item.partition("=")
        try:
            weights[view] = float(value)
        except ValueError:
            raise QuicknatInputError(None, f"--weights {item!r}: expected VIEW=NUMBER") from None
    return weights
