"""Manifests: the subjects of a data set, their files and facts, and a split by subject.

``manifest.json`` (paths relative to the manifest's folder)::

    {"format": "quicknat-manifest", "format_version": 1, "dataset": "oasis1", "scheme": "tissue",
     "created": "...", "source": {...},
     "scans": [{"id": "OAS1_0001_MR1", "subject": "OAS1_0001", "image": "nifti/...", "label": "nifti/...",
                "shape": [176, 208, 176], "spacing": [1.0, 1.0, 1.0], "label_values": [0, 1, 2, 3]}],
     "missing": [{"id": "...", "reason": "..."}],
     "split": {"seed": 0, "ratios": [0.8, 0.1, 0.1], "train": [...scan ids], "validation": [...], "test": [...]}}

The split is made once, by *subject* (repeat scans such as OASIS ``MR2`` stay with their
subject), seeded, and is then reused: re-running a preparation with the same scans keeps it; a
different set of subjects or a different seed is an error unless a new split is asked for
explicitly. Every subject lands in exactly one split, for any count (see :func:`split_sizes`):
1 subject -> train only; 2 -> train and validation; 3 or more -> at least one in each.

A manifest is checked when loaded (:func:`load_manifest`): its fields and their types, unique
scan IDs, and split IDs that are among its scans; a bad one is a one-line error naming the file.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QuicknatInputError
from ..io import atomic_write_text
from ..labels import LabelScheme, get_scheme

FORMAT = "quicknat-manifest"
SPLITS = ("train", "validation", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


@dataclass
class Scan:
    id: str
    subject: str
    image: str | None
    label: str | None
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "image": self.image, "label": self.label, **self.facts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scan:
        facts = {k: v for k, v in d.items() if k not in ("id", "subject", "image", "label")}
        return cls(str(d["id"]), str(d.get("subject", d["id"])), d.get("image"), d.get("label"), facts)


@dataclass
class Manifest:
    dataset: str
    scheme: str | dict
    scans: list[Scan]
    split: dict[str, Any] = field(default_factory=dict)
    missing: list[dict] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path(".")

    def resolve(self, rel: str | None) -> Path | None:
        return None if rel is None else (self.root / rel).resolve()

    def label_scheme(self) -> LabelScheme:
        """The scheme of the manifest's labels: a built-in name, a colour-LUT file beside the
        manifest, or the scheme itself."""
        s = self.scheme
        if isinstance(s, dict):
            return LabelScheme.from_dict(s)
        path = Path(str(s))
        if not path.is_absolute() and (self.root / path).exists():
            return get_scheme(self.root / path)
        return get_scheme(str(s))

    def labelled(self, split: str) -> list[tuple[Scan, Path | None, Path]]:
        """(scan, image path or None, label path) of every scan of a split; a scan without a
        label is an error naming the manifest."""
        out = []
        for scan in self.scans_in(split):
            if scan.label is None:
                raise QuicknatInputError(self.path, f"scan {scan.id} has no label")
            out.append((scan, self.resolve(scan.image), self.resolve(scan.label)))
        return out

    def scans_in(self, split: str) -> list[Scan]:
        """The scans of a split ('train', 'validation', 'test' or 'all')."""
        if split == "all":
            return list(self.scans)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all'")
        if not self.split:
            raise QuicknatInputError(self.path, "manifest has no split")
        ids = set(self.split[split])
        return [s for s in self.scans if s.id in ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": 1,
            "dataset": self.dataset,
            "scheme": self.scheme,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": self.source,
            "scans": [s.to_dict() for s in self.scans],
            "missing": self.missing,
            "split": self.split,
        }

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path or "manifest.json")
        self.path = path
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuicknatInputError(path, "manifest does not exist") from None
    except (OSError, ValueError) as exc:
        raise QuicknatInputError(path, f"cannot read manifest ({_first_line(exc)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise QuicknatInputError(path, "not a quicknat manifest (no \"format\": \"quicknat-manifest\")")
    _check_manifest(path, d)
    return Manifest(
        str(d["dataset"]), d["scheme"], [Scan.from_dict(s) for s in d["scans"]], d.get("split") or {},
        d.get("missing") or [], d.get("source") or {}, path,
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_manifest(path: Path, d: dict[str, Any]) -> None:
    """Types, unique IDs and split IDs of a manifest's dict; one-line errors naming the key."""
    def bad(key: str, expected: str) -> QuicknatInputError:
        return QuicknatInputError(path, f"manifest key '{key}': expected {expected}")

    if not isinstance(d.get("dataset"), str):
        raise bad("dataset", "a name (string)")
    if not isinstance(d.get("scheme"), (str, dict)):
        raise bad("scheme", "a label scheme name or table")
    scans = d.get("scans")
    if not isinstance(scans, list):
        raise bad("scans", "a list of scans")
    ids = []
    for i, s in enumerate(scans):
        if not isinstance(s, dict) or not isinstance(s.get("id"), str) or not isinstance(s.get("subject", ""), str):
            raise bad(f"scans[{i}]", "an object with a string 'id' (and 'subject')")
        for k in ("image", "label"):
            if s.get(k) is not None and not isinstance(s[k], str):
                raise bad(f"scans[{i}].{k}", "a file path or null")
        ids.append(s["id"])
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise bad("scans", f"unique scan IDs ({', '.join(dup[:3])} repeated)")
    split = d.get("split") or {}
    if not isinstance(split, dict):
        raise bad("split", "an object")
    known = set(ids)
    for name in SPLITS:
        part = split.get(name, [])
        if not isinstance(part, list) or not all(isinstance(i, str) for i in part):
            raise bad(f"split.{name}", "a list of scan IDs")
        unknown = [i for i in part if i not in known]
        if unknown:
            raise bad(f"split.{name}", f"IDs among the manifest's scans ({', '.join(unknown[:3])} not found)")


def split_sizes(n: int, ratios=DEFAULT_RATIOS) -> tuple[int, int, int]:
    """(train, validation, test) counts for ``n`` subjects that add up to ``n``: 1 -> (1, 0, 0);
    2 -> (1, 1, 0); 3 or more -> at least one in each, the rest by ``ratios`` (rounded)."""
    if n <= 0:
        return 0, 0, 0
    if n < 3:
        return 1, n - 1, 0
    total = float(sum(ratios))
    val = max(1, round(n * ratios[1] / total))
    test = max(1, round(n * ratios[2] / total))
    while n - val - test < 1:  # train keeps at least one
        if val >= test and val > 1:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def split_by_subject(scans: list[Scan], seed: int = 0, ratios=DEFAULT_RATIOS) -> dict[str, Any]:
    """Seeded train/validation/test split of scan IDs, grouped by subject; every subject is in
    exactly one part (sizes from :func:`split_sizes`)."""
    subjects = sorted({s.subject for s in scans})
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    n_train, n_val, _ = split_sizes(len(subjects), ratios)
    parts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]
    out: dict[str, Any] = {"seed": seed, "ratios": list(ratios), "by": "subject"}
    for name, subj in zip(SPLITS, parts):
        chosen = set(subj)
        out[name] = sorted(s.id for s in scans if s.subject in chosen)
    return out


def reuse_or_split(
    scans: list[Scan], previous: Manifest | None, seed: int, resplit: bool, ratios=DEFAULT_RATIOS
) -> dict[str, Any]:
    """The previous split when it still fits these scans; a new one only when asked."""
    if previous is None or not previous.split or resplit:
        return split_by_subject(scans, seed, ratios)
    old_ids = {i for k in SPLITS for i in previous.split.get(k, [])}
    same = old_ids == {s.id for s in scans} and int(previous.split.get("seed", seed)) == seed
    if not same:
        raise QuicknatInputError(
            previous.path,
            "existing split does not match these scans or this seed; pass --resplit to make a new one",
        )
    return previous.split
