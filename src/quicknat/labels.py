"""Label schemes: which label IDs (stored in files) map to which network classes.

A *label* is an integer ID stored in a file (FreeSurfer aseg IDs, FSL FAST tissue values). A
*class* is a network output index 0..N-1. A :class:`LabelScheme` holds the ordered classes, each
with the label ID it decodes to, any further source IDs that encode to it, its name, its colour
and, for lateral structures, its left/right partner. Schemes travel inside checkpoints as plain
dictionaries (:meth:`LabelScheme.to_dict`), so a model never meets the wrong labels.

Built-ins:

``aseg33``
    Background plus the 32 FreeSurfer aseg structures QuickNAT and SynthSeg segment. The old
    thalamus IDs 9/48 encode to thalamus (10/49). Every other ID (non-brain head labels 5xx,
    lesions, vessels, optic chiasm, ...) encodes to background and is counted as unknown.
``tissue``
    OASIS FSL_SEG / FSL FAST: 0 background, 1 CSF, 2 grey matter, 3 white matter.

The sagittal network cannot tell left from right (a sagittal slice looks the same on either
side), so it is trained on :meth:`LabelScheme.merged_lr`, where each left/right pair shares one
class; :meth:`LabelScheme.lr_merge_index` also maps its output back (``full = merged[:, idx]``) to the full scheme.

``aseg33`` merges down to ``tissue`` with :data:`ASEG_TO_TISSUE`: cerebral and cerebellar
cortex and the deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus, amygdala,
accumbens) are grey matter; cerebral and cerebellar white matter, brain stem and ventral DC are
white matter; ventricles and CSF are CSF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import QuicknatInputError


def compact_labels(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)`` of an integer label map, by a lookup table when
    its IDs are small non-negative integers (label maps' are: 0-530): one pass over the map
    instead of a sort (a 256³ map on a busy machine: 7.7 s -> 0.4-0.7 s). Synthesis, overlays
    and evaluation's label resampling share it."""
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if lo < 0 or hi >= 1 << 16:
        uniq, inv = np.unique(ids, return_inverse=True)
        return uniq, inv.reshape(ids.shape)
    present = np.bincount(ids.reshape(-1), minlength=hi + 1) > 0
    uniq = np.flatnonzero(present).astype(ids.dtype)
    lut = np.zeros(hi + 1, dtype=np.int64)
    lut[uniq] = np.arange(len(uniq))
    return uniq, lut[ids]


@dataclass(frozen=True)
class LabelClass:
    """One network class: its name, decoded label ID, extra source IDs, colour and partner."""

    name: str
    label: int
    color: tuple[int, int, int] = (128, 128, 128)
    aliases: tuple[int, ...] = ()
    partner: str | None = None

    @property
    def source_ids(self) -> tuple[int, ...]:
        return (self.label, *self.aliases)


@dataclass(frozen=True)
class LabelScheme:
    """Ordered classes of a segmentation; class 0 is background."""

    name: str
    classes: tuple[LabelClass, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0].label != 0:
            raise ValueError(f"scheme {self.name!r}: class 0 must be background with label 0")
        seen: dict[int, str] = {}
        for c in self.classes:
            for i in c.source_ids:
                if i < 0:
                    raise ValueError(f"scheme {self.name!r}: negative label ID {i}")
                if i in seen:
                    raise ValueError(f"scheme {self.name!r}: label ID {i} in both {seen[i]!r} and {c.name!r}")
                seen[i] = c.name
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"scheme {self.name!r}: duplicate class names")
        for c in self.classes:
            if c.partner is not None:
                if c.partner not in names:
                    raise ValueError(f"scheme {self.name!r}: partner {c.partner!r} of {c.name!r} not found")
                if self.classes[names.index(c.partner)].partner != c.name:
                    raise ValueError(f"scheme {self.name!r}: partners {c.name!r}/{c.partner!r} not mutual")

    # -- basic facts -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def label_ids(self) -> np.ndarray:
        """Label ID each class decodes to, indexed by class."""
        return np.array([c.label for c in self.classes], dtype=np.int64)

    @property
    def colors(self) -> np.ndarray:
        """RGB colours (0..255) indexed by class."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def class_of_label(self, label: int) -> int:
        """Class index of a label ID (KeyError if the scheme does not hold it)."""
        for k, c in enumerate(self.classes):
            if label in c.source_ids:
                return k
        raise KeyError(label)

    @cached_property
    def _lut(self) -> np.ndarray:
        size = max(i for c in self.classes for i in c.source_ids) + 1
        lut = np.full(size, -1, dtype=np.int16)
        for k, c in enumerate(self.classes):
            for i in c.source_ids:
                lut[i] = k
        return lut

    # -- encode / decode ---------------------------------------------------------------------
    def encode(
        self,
        labels: np.ndarray,
        unknown: Literal["background", "raise"] = "background",
        path: str | Path | None = None,
    ) -> tuple[np.ndarray, dict[int, int]]:
        """Label IDs -> class indices (uint8 when it fits).

        Returns the class map and ``{unknown_label_id: voxel_count}``. With ``unknown="raise"``
        an unknown ID raises QuicknatInputError naming ``path``. Non-integer values raise.
        """
        arr = np.asarray(labels)
        if np.issubdtype(arr.dtype, np.floating):
            rounded = np.rint(arr)
            if not np.array_equal(rounded, arr):
                raise QuicknatInputError(path, "label map holds non-integer values")
            arr = rounded
        ids = arr.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise QuicknatInputError(path, f"label map holds negative label ID {int(ids.min())}")
        lut = self._lut
        top = int(ids.max()) if ids.size else 0
        if top >= lut.size:
            lut = np.concatenate([lut, np.full(top + 1 - lut.size, -1, dtype=lut.dtype)])
        classes = lut[ids]
        unknown_counts: dict[int, int] = {}
        bad = classes < 0
        if bad.any():
            vals, counts = np.unique(ids[bad], return_counts=True)
            unknown_counts = {int(v): int(n) for v, n in zip(vals, counts)}
            if unknown == "raise":
                listed = ", ".join(str(v) for v in list(unknown_counts)[:10])
                raise QuicknatInputError(path, f"label IDs not in scheme {self.name!r}: {listed}")
            classes = np.where(bad, 0, classes)
        dtype = np.uint8 if self.num_classes <= 256 else np.int16
        return classes.astype(dtype), unknown_counts

    def decode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices -> label IDs (int16 when the IDs fit, else int32)."""
        ids = self.label_ids
        dtype = np.int16 if ids.max() < 2**15 else np.int32
        return ids.astype(dtype)[np.asarray(classes, dtype=np.int64)]

    # -- left / right ------------------------------------------------------------------------
    def lr_swap_index(self) -> np.ndarray:
        """Class permutation that swaps each left class with its right partner (for flips)."""
        idx = np.arange(self.num_classes)
        names = self.names
        for k, c in enumerate(self.classes):
            if c.partner is not None:
                idx[k] = names.index(c.partner)
        return idx

    @property
    def has_lateral_pairs(self) -> bool:
        return any(c.partner for c in self.classes)

    def _merge_plan(self) -> tuple[list[LabelClass], np.ndarray]:
        merged: list[LabelClass] = []
        index = np.zeros(self.num_classes, dtype=np.int64)
        where: dict[str, int] = {}
        for k, c in enumerate(self.classes):
            if c.partner is not None and c.partner in where:
                index[k] = where[c.partner]
                m = merged[index[k]]
                merged[index[k]] = LabelClass(m.name, m.label, m.color, m.aliases + c.source_ids)
                continue
            name = _strip_side(c.name) if c.partner is not None else c.name
            where[c.name] = len(merged)
            index[k] = len(merged)
            merged.append(LabelClass(name, c.label, c.color, c.aliases))
        return merged, index

    def merged_lr(self) -> LabelScheme:
        """The scheme with each left/right pair merged into one class (the sagittal view's)."""
        if not self.has_lateral_pairs:
            return self
        merged, _ = self._merge_plan()
        return LabelScheme(f"{self.name}-lr-merged", tuple(merged), f"{self.name} with left/right pairs merged")

    def lr_merge_index(self) -> np.ndarray:
        """For each class of this scheme, its class in :meth:`merged_lr`."""
        return self._merge_plan()[1]

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "classes": [
                {
                    "name": c.name,
                    "label": int(c.label),
                    "color": [int(v) for v in c.color],
                    "aliases": [int(a) for a in c.aliases],
                    "partner": c.partner,
                }
                for c in self.classes
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelScheme:
        classes = tuple(
            LabelClass(
                str(c["name"]),
                int(c["label"]),
                tuple(int(v) for v in c.get("color", (128, 128, 128))),  # type: ignore[arg-type]
                tuple(int(a) for a in c.get("aliases", ())),
                c.get("partner"),
            )
            for c in d["classes"]
        )
        return cls(str(d["name"]), classes, str(d.get("description", "")))

    def to_lut(self) -> str:
        """The scheme as a FreeSurfer colour-LUT style text (ID name R G B A)."""
        lines = [f"# quicknat label scheme {self.name}"]
        for c in self.classes:
            r, g, b = c.color
            lines.append(f"{c.label:<6d} {c.name:<40s} {r:3d} {g:3d} {b:3d} 0")
        return "\n".join(lines) + "\n"


_SIDE = re.compile(r"^(Left|Right|lh|rh|L|R)[-_]", re.IGNORECASE)


def _strip_side(name: str) -> str:
    return _SIDE.sub("", name)


def _side(name: str) -> str | None:
    m = _SIDE.match(name)
    if not m:
        return None
    return "L" if m.group(1).lower() in ("left", "lh", "l") else "R"


def _pair_partners(classes: list[LabelClass]) -> tuple[LabelClass, ...]:
    """Set ``partner`` for classes named Left-X/Right-X (or lh-/rh-) that both exist."""
    by_key: dict[tuple[str, str], str] = {}
    for c in classes:
        side = _side(c.name)
        if side:
            by_key[(side, _strip_side(c.name).lower())] = c.name
    out = []
    for c in classes:
        side = _side(c.name)
        partner = None
        if side:
            other = "R" if side == "L" else "L"
            partner = by_key.get((other, _strip_side(c.name).lower()))
        out.append(LabelClass(c.name, c.label, c.color, c.aliases, partner))
    return tuple(out)


def scheme_from_lut(path: str | Path, name: str | None = None) -> LabelScheme:
    """Read a FreeSurfer colour-LUT style file (``ID Name R G B [A]`` per line, ``#`` comments).

    Every listed ID becomes a class, in file order, after background (ID 0, added if absent).
    Classes named ``Left-X``/``Right-X`` (or ``lh-``/``rh-``) become left/right partners.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise QuicknatInputError(path, f"cannot read label table ({exc.strerror})") from None
    classes: list[LabelClass] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            label = int(parts[0])
            cname = parts[1]
            color = tuple(int(v) for v in parts[2:5]) if len(parts) >= 5 else (128, 128, 128)
        except (ValueError, IndexError):
            raise QuicknatInputError(path, f"line {n} is not 'ID Name R G B [A]'") from None
        classes.append(LabelClass(cname, label, color))  # type: ignore[arg-type]
    if not classes:
        raise QuicknatInputError(path, "label table lists no labels")
    if all(c.label != 0 for c in classes):
        classes.insert(0, LabelClass("Unknown", 0, (0, 0, 0)))
    else:
        zero = next(c for c in classes if c.label == 0)
        classes.remove(zero)
        classes.insert(0, zero)
    try:
        return LabelScheme(name or path.stem, _pair_partners(classes), f"from {path.name}")
    except ValueError as exc:
        raise QuicknatInputError(path, str(exc)) from None


# FreeSurfer names and colours (FreeSurferColorLUT.txt) for the aseg33 structures.
_ASEG = [
    (0, "Unknown", (0, 0, 0)),
    (2, "Left-Cerebral-White-Matter", (245, 245, 245)),
    (3, "Left-Cerebral-Cortex", (205, 62, 78)),
    (4, "Left-Lateral-Ventricle", (120, 18, 134)),
    (5, "Left-Inf-Lat-Vent", (196, 58, 250)),
    (7, "Left-Cerebellum-White-Matter", (220, 248, 164)),
    (8, "Left-Cerebellum-Cortex", (230, 148, 34)),
    (10, "Left-Thalamus", (0, 118, 14)),
    (11, "Left-Caudate", (122, 186, 220)),
    (12, "Left-Putamen", (236, 13, 176)),
    (13, "Left-Pallidum", (12, 48, 255)),
    (14, "3rd-Ventricle", (204, 182, 142)),
    (15, "4th-Ventricle", (42, 204, 164)),
    (16, "Brain-Stem", (119, 159, 176)),
    (17, "Left-Hippocampus", (220, 216, 20)),
    (18, "Left-Amygdala", (103, 255, 255)),
    (24, "CSF", (60, 60, 60)),
    (26, "Left-Accumbens-area", (255, 165, 0)),
    (28, "Left-VentralDC", (165, 42, 42)),
    (41, "Right-Cerebral-White-Matter", (245, 245, 245)),
    (42, "Right-Cerebral-Cortex", (205, 62, 78)),
    (43, "Right-Lateral-Ventricle", (120, 18, 134)),
    (44, "Right-Inf-Lat-Vent", (196, 58, 250)),
    (46, "Right-Cerebellum-White-Matter", (220, 248, 164)),
    (47, "Right-Cerebellum-Cortex", (230, 148, 34)),
    (49, "Right-Thalamus", (0, 118, 14)),
    (50, "Right-Caudate", (122, 186, 220)),
    (51, "Right-Putamen", (236, 13, 176)),
    (52, "Right-Pallidum", (13, 48, 255)),
    (53, "Right-Hippocampus", (220, 216, 20)),
    (54, "Right-Amygdala", (103, 255, 255)),
    (58, "Right-Accumbens-area", (255, 165, 0)),
    (60, "Right-VentralDC", (165, 42, 42)),
]
_ASEG_ALIASES = {10: (9,), 49: (48,)}  # Left/Right-Thalamus-Proper in older FreeSurfer

#: aseg33 label ID -> tissue label ID (1 CSF, 2 grey matter, 3 white matter).
ASEG_TO_TISSUE: dict[int, int] = {
    0: 0,
    **{i: 1 for i in (4, 5, 14, 15, 24, 43, 44)},
    **{i: 2 for i in (3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58)},
    **{i: 3 for i in (2, 7, 16, 28, 41, 46, 60)},
}


def _build_aseg33() -> LabelScheme:
    classes = [LabelClass(n, i, c, _ASEG_ALIASES.get(i, ())) for i, n, c in _ASEG]
    return LabelScheme(
        "aseg33",
        _pair_partners(classes),
        "background + 32 FreeSurfer aseg structures (QuickNAT / SynthSeg)",
    )


def _build_tissue() -> LabelScheme:
    return LabelScheme(
        "tissue",
        (
            LabelClass("Background", 0, (0, 0, 0)),
            LabelClass("CSF", 1, (60, 60, 230)),
            LabelClass("Grey-Matter", 2, (205, 62, 78)),
            LabelClass("White-Matter", 3, (80, 160, 255)),
        ),
        "OASIS FSL_SEG / FSL FAST tissue classes",
    )


ASEG33 = _build_aseg33()
TISSUE = _build_tissue()
BUILTIN_SCHEMES: dict[str, LabelScheme] = {"aseg33": ASEG33, "tissue": TISSUE}


def get_scheme(name_or_path: str | Path | LabelScheme) -> LabelScheme:
    """A built-in scheme by name, or a custom one from a colour-LUT file."""
    if isinstance(name_or_path, LabelScheme):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN_SCHEMES:
        return BUILTIN_SCHEMES[key]
    path = Path(key)
    if path.exists():
        return scheme_from_lut(path)
    raise QuicknatInputError(
        path, f"not a built-in scheme ({', '.join(BUILTIN_SCHEMES)}) nor an existing LUT file"
    )


def merge_labels(labels: np.ndarray, mapping: dict[int, int] = ASEG_TO_TISSUE) -> np.ndarray:
    """Map label IDs through ``mapping`` (IDs not listed become 0), e.g. aseg33 -> tissue."""
    ids = np.asarray(labels).astype(np.int64)
    top = max(int(ids.max()) if ids.size else 0, max(mapping)) + 1
    lut = np.zeros(top, dtype=np.int16)
    for k, v in mapping.items():
        lut[k] = v
    return lut[ids]


def checked_label_map(
    labels: np.ndarray, scheme: LabelScheme, path: str | Path | None, *, what: str = "label map",
    allow_empty: bool = False,
) -> tuple[np.ndarray, dict[int, int]]:
    """``scheme.encode`` for a label map read from ``path``, refusing what is not one.

    One-line errors naming ``path`` for: non-integer or negative values; a map with no label at
    all (unless ``allow_empty``); an image rather than a label map (labels are piecewise
    constant: more than half of the labelled voxels differing from their neighbour along the
    first axis is an image, e.g. a T1 passed as a label map); and a map holding no ID of the
    scheme but background (another scheme). IDs outside the scheme (e.g. FreeSurfer's WM
    hypointensities, 77, or non-brain labels of a whole-head map) count as background and are
    returned as ``{id: voxels}`` for the caller to report.
    """
    arr = np.asarray(labels)
    classes, unknown = scheme.encode(arr, path=path)
    labelled = arr != 0
    n_labelled = int(np.count_nonzero(labelled))
    if n_labelled == 0:
        if allow_empty:
            return classes, unknown
        raise QuicknatInputError(path, f"{what} is empty (no voxel carries a label)")
    both = labelled[1:] & labelled[:-1]
    changes = int(np.count_nonzero((arr[1:] != arr[:-1]) & both))
    if changes > 0.5 * max(int(np.count_nonzero(both)), 1):
        raise QuicknatInputError(path, f"is an image, not a {what}: {100 * changes / np.count_nonzero(both):.0f} % "
                                       "of neighbouring labelled voxels differ (labels are piecewise constant)")
    if not classes.any():
        listed = ", ".join(str(v) for v in sorted(unknown)[:5])
        raise QuicknatInputError(path, f"{what} holds no label of scheme {scheme.name!r} (only {listed}"
                                       f"{', ...' if len(unknown) > 5 else ''})")
    return classes, unknown
