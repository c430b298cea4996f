"""Pictures: a scan with its segmentation in three orthogonal planes (FreeSurfer colours).

Panels are drawn from conformed (LIA) space so every scan looks the same way up: coronal and
axial panels are in radiological convention (the subject's right on the picture's left, marked
R and L), the sagittal panel has anterior on the right.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _io
import json
import logging
from pathlib import Path

import numpy as np

from .conform import ConformSettings, plan_conform
from .errors import QuicknatInputError
from .io import Volume, atomic_write_bytes, atomic_write_text, csv_text, load_volume, same_grid
from .labels import ASEG33, ASEG_TO_TISSUE, TISSUE, LabelScheme, compact_labels, merge_labels
from .views import VIEWS

log = logging.getLogger(__name__)


def _panels(image: np.ndarray, classes: np.ndarray | None, centre: tuple[int, int, int]):
    out = []
    for spec in VIEWS.values():
        k = centre[spec.axis]
        img = spec.display(spec.slice_of(image, k))
        cls = None if classes is None else spec.display(spec.slice_of(classes, k))
        out.append((spec, img, cls))
    return out


def _centre(image: np.ndarray, classes: np.ndarray | None) -> tuple[int, int, int]:
    mask = classes > 0 if classes is not None and (classes > 0).any() else image > 0.1
    if not mask.any():
        return tuple(s // 2 for s in image.shape)  # type: ignore[return-value]
    idx = np.argwhere(mask)
    centre = np.round(idx.mean(0)).astype(int)
    # the sagittal plane through the centre is the interhemispheric fissure: move it into a
    # hemisphere, a sixth of the brain's width off the midline
    width = idx[:, 0].max() - idx[:, 0].min()
    centre[0] = min(image.shape[0] - 1, centre[0] + width // 6)
    return tuple(int(v) for v in centre)  # type: ignore[return-value]


def _compact(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    ids, inv = compact_labels(np.rint(labels).astype(np.int64))
    return inv.astype(np.int16), [int(v) for v in ids]


def render_overlay(
    image: np.ndarray,
    classes: np.ndarray | None,
    colors: np.ndarray,
    names: list[str],
    title: str = "",
) -> bytes:
    """PNG bytes of three planes of a conformed image with a class map over it.

    Uses a bare :class:`~matplotlib.figure.Figure` (no pyplot state), so overlays can be
    rendered in a writer thread while the next scan is segmented.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    centre = _centre(image, classes)
    present = [int(c) for c in np.unique(classes) if c > 0] if classes is not None else []
    ncol = 1 if len(present) <= 24 else 2
    side = [0.5 * ncol + 0.05] if present else []  # the legend's own panel, beside the images
    fig = Figure(figsize=(15 * (3 + sum(side)) / 3, 5.6), facecolor="black")
    axes = fig.subplots(1, 3 + len(side), gridspec_kw={"width_ratios": [1, 1, 1, *side]})
    for ax, (spec, img, cls) in zip(axes, _panels(image, classes, centre)):
        ax.imshow(img, cmap="gray", vmin=0, vmax=max(float(np.percentile(image, 99.5)), 1e-6), interpolation="nearest")
        if cls is not None:
            rgba = np.zeros((*cls.shape, 4), dtype=np.float32)
            rgba[..., :3] = colors[cls] / 255.0
            rgba[..., 3] = np.where(cls > 0, 0.45, 0.0)
            ax.imshow(rgba, interpolation="nearest")
        ax.set_title(spec.name, color="white")
        ax.axis("off")
        if spec.lateral_in_plane:  # at the head's upper corners, radiological: R on the left
            cols = np.flatnonzero(img.max(axis=0) > 0.05 * img.max())
            rows = np.flatnonzero(img.max(axis=1) > 0.05 * img.max())
            x0, x1 = (cols[0], cols[-1]) if cols.size else (0, img.shape[1] - 1)
            y0 = rows[0] if rows.size else 0
            ax.text(x0, y0, "R", color="yellow", fontsize=12, ha="left", va="bottom")
            ax.text(x1, y0, "L", color="yellow", fontsize=12, ha="right", va="bottom")
    if present:
        axes[3].axis("off")
        handles = [Patch(facecolor=colors[c] / 255.0, label=names[c]) for c in present]
        axes[3].legend(handles=handles, loc="center left", fontsize=7, ncol=ncol, facecolor="black",
                       labelcolor="white", frameon=False, borderaxespad=0)
    fig.suptitle(title, color="white")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.02)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor="black")
    return buf.getvalue()


def save_overlay(
    image: Volume | None,
    seg: Volume | None,
    path: str | Path,
    scheme: LabelScheme | None = None,
    conformed: tuple[np.ndarray, np.ndarray] | None = None,
    title: str = "",
) -> Path:
    """Draw a scan (and a label map) in three planes through the brain's centre.

    Either ``conformed=(image, class map)`` already in conformed space with ``scheme``, or a
    native ``image`` and optional ``seg`` label map (any label IDs; names and colours from
    ``scheme``, else from ``tissue`` for maps holding IDs 0-3 only, else from FreeSurfer's aseg)
    that are conformed here (labels through one-hot resampling, never interpolated).
    """
    if conformed is not None:
        img, classes = conformed
        scheme = scheme or ASEG33
        colors, names = scheme.colors, scheme.names
    else:
        assert image is not None
        plan = plan_conform(image, ConformSettings())
        img = plan.image(image.array)
        classes = None
        colors, names = ASEG33.colors, ASEG33.names
        if seg is not None:
            if not same_grid(seg, image):
                raise QuicknatInputError(seg.path, "segmentation and image are on different grids")
            compact, ids = _compact(seg.array)
            classes = plan.classes(compact, len(ids))
            scheme = scheme or (TISSUE if max(ids) <= 3 else ASEG33)  # tissue maps hold 0-3 only
            known = {c.label: c for c in scheme.classes}
            cmap = _fallback_colors(len(ids))
            colors = np.array([known[i].color if i in known else cmap[n] for n, i in enumerate(ids)], dtype=np.uint8)
            names = [known[i].name if i in known else f"label {i}" for i in ids]
    png = render_overlay(img, classes, colors, names, title)
    atomic_write_bytes(path, png)
    return Path(path)


def _fallback_colors(n: int) -> np.ndarray:
    import matplotlib

    cm = matplotlib.colormaps["tab20"]
    return (np.array([cm(i % 20)[:3] for i in range(n)]) * 255).astype(np.uint8)


# -- HTML report ---------------------------------------------------------------------------
def _png_tag(png: bytes, alt: str, width: str = "100%") -> str:
    return f'<img alt="{alt}" style="max-width:{width}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(history: list[dict], view: str) -> bytes:
    """Training curves of one view (loss and its parts, validation Dice per class and mean, lr)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="total")
    ax[0].plot(ep, [h["train_dice_loss"] for h in history], "--", label="soft Dice")
    ax[0].plot(ep, [h["train_ce"] for h in history], ":", label="weighted CE")
    ax[0].set_title(f"{view}: training loss")
    ax[0].legend()
    keys = [k for k in history[0] if k.startswith("val_dice/") and not k.endswith("/Unknown")]
    for k in keys:
        vals = [h.get(k) for h in history]
        ax[1].plot(ep, [np.nan if v is None else v for v in vals], lw=0.7, alpha=0.7)
    ax[1].plot(ep, [h["val_dice_mean"] for h in history], "k-", lw=2, label="mean (foreground)")
    if any("val_real_dice_mean" in h for h in history):
        ax[1].plot(ep, [h.get("val_real_dice_mean", np.nan) for h in history], "r--", lw=2, label="real scans (mean)")
    ax[1].set_ylim(0, 1)
    ax[1].set_title(f"{view}: validation Dice per class (3D)")
    ax[1].legend()
    ax[2].semilogy(ep, [h["lr"] for h in history])
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("epoch")
    return _fig_png(fig)


def _boxplot_png(rows: list[dict], metric: str = "dice") -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data: dict[str, list[float]] = {}
    colors: dict[str, tuple] = {}
    known = {c.name: c.color for c in ASEG33.classes}
    for r in rows:
        if r["metric"] != metric or r["status"] in ("absent", "background"):
            continue
        v = float(r["value"])
        if np.isfinite(v):
            data.setdefault(r["structure"], []).append(v)
            colors[r["structure"]] = tuple(np.array(known.get(r["structure"], (100, 140, 200))) / 255)
    names = list(data)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    if names:
        bp = ax.boxplot([data[n] for n in names], patch_artist=True)
        for patch, n in zip(bp["boxes"], names):
            patch.set_facecolor(colors[n])
        ax.set_xticks(range(1, len(names) + 1), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(metric)
    ax.set_title(f"test {metric} per structure")
    return _fig_png(fig)


def _table_html(summary: list[dict], metrics=("dice", "iou", "hd95", "assd", "volume_similarity")) -> str:
    by = {(r["structure"], r["metric"]): r for r in summary}
    structures = list(dict.fromkeys(r["structure"] for r in summary))
    head = "".join(f"<th>{m}<br>mean ± std (median)</th>" for m in metrics)
    body = []
    for s in structures:
        cells = []
        for m in metrics:
            r = by.get((s, m))
            if r is None or not r["n"] or not np.isfinite(float(r["mean"])):
                cells.append("<td>—</td>")
            else:
                cells.append(f"<td>{float(r['mean']):.3f} ± {float(r['std']):.3f} ({float(r['median']):.3f})</td>")
        body.append(f"<tr><td>{s}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>structure</th>{head}</tr>{''.join(body)}</table>"


def build_report(folder: str | Path, out: str | Path, title: str | None = None) -> Path:
    """A self-contained HTML page for a training run and/or an evaluation folder.

    Training run (``VIEW/history.json``): loss, per-class Dice and learning-rate curves. Evaluation
    (``metrics.csv``, ``summary.csv``, ``eval.json``): box plot of test Dice per structure, the
    table of numbers, overlays of the best, median and worst subjects, and MC-dropout QC tables.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QuicknatInputError(folder, "is not a run or evaluation folder")
    parts = [f"<h1>{html.escape(title or 'quicknat report: ' + folder.name)}</h1>"]
    found = False
    for view in VIEWS:
        hp = folder / view / "history.json"
        if hp.exists():
            history = json.loads(hp.read_text())
            if history:
                found = True
                best = max(h["val_dice_mean"] for h in history)
                parts.append(f"<h2>Training: {view}</h2><p>{len(history)} epochs, best validation Dice "
                             f"{best:.3f}</p>{_png_tag(curves_png(history, view), view + ' curves')}")
    metrics_csv = folder / "metrics.csv"
    if metrics_csv.exists():
        found = True
        with open(metrics_csv) as f:
            rows = list(csv.DictReader(f))
        with open(folder / "summary.csv") as f:
            summary = list(csv.DictReader(f))
        parts.append("<h2>Evaluation</h2>" + _png_tag(_boxplot_png(rows), "Dice box plot", "1100px"))
        parts.append(_table_html(summary))
        info = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else None
        if info:
            scheme = LabelScheme.from_dict(info["scheme"])
            per_subject: dict[str, list[float]] = {}
            for r in rows:
                if r["metric"] == "dice" and r["status"] not in ("absent", "background"):
                    per_subject.setdefault(r["subject"], []).append(float(r["value"]))
            ranked = sorted(per_subject, key=lambda s: float(np.mean(per_subject[s])))
            picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
            scans = {s["id"]: s for s in info["scans"]}
            parts.append("<h2>Subjects (best, median, worst mean Dice)</h2>")
            for label, sid in reversed(list(picks.items())):
                s = scans[sid]
                img, pred = load_volume(s["image"]), load_volume(s["pred"])
                if info.get("merged_to_tissue"):
                    pred = pred.with_array(merge_labels(pred.array, ASEG_TO_TISSUE))
                png = _overlay_png(img, pred, scheme, f"{label}: {sid} (mean Dice {np.mean(per_subject[sid]):.3f})")
                parts.append(_png_tag(png, f"{label} subject", "1100px"))
                if s.get("qc"):
                    with open(s["qc"]) as f:
                        qc = list(csv.DictReader(f))
                    cells = "".join(f"<tr><td>{q['structure']}</td><td>{float(q['cv']):.4f}</td>"
                                    f"<td>{float(q['iou']):.4f}</td></tr>" for q in qc)
                    parts.append(f"<h3>MC-dropout QC: {sid}</h3><table><tr><th>structure</th><th>CV of volume</th>"
                                 f"<th>IoU of passes</th></tr>{cells}</table>")
    if not found:
        raise QuicknatInputError(folder, "holds neither training history nor evaluation results")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} td:first-child{text-align:left}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>quicknat report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_bytes(out, page.encode("utf-8"))
    return Path(out)


def _overlay_png(image: Volume, seg: Volume, scheme: LabelScheme, title: str) -> bytes:
    plan = plan_conform(image, ConformSettings())
    img = plan.image(image.array)
    classes, _ = scheme.encode(seg.array)
    conf = plan.classes(classes, scheme.num_classes)
    return render_overlay(img, conf, scheme.colors, scheme.names, title)


def write_history(history: list[dict], vdir: Path) -> None:
    """A view's training history as ``history.json`` and ``history.csv``."""
    atomic_write_text(vdir / "history.json", json.dumps(history, indent=1) + "\n")
    keys = list(dict.fromkeys(k for h in history for k in h))
    atomic_write_text(vdir / "history.csv", csv_text(history, keys))


def plot_history(rundir: str | Path) -> list[Path]:
    """Redraw the curves of every view of a run (on demand)."""
    out = []
    for v in VIEWS:
        hp = Path(rundir) / v / "history.json"
        if hp.exists():
            atomic_write_bytes(hp.with_name("curves.png"), curves_png(json.loads(hp.read_text()), v))
            out.append(hp.with_name("curves.png"))
    return out
