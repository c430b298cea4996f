"""Which files a segmentation run takes, what each output is called, and which share of a cohort
a process runs.

:func:`find_inputs` expands files and folders the way a BIDS or FreeSurfer user expects: in a
BIDS tree only ``*_T1w`` images (never ``derivatives/``); in FreeSurfer subject folders only
``mri/orig.mgz`` (``mri/T1.mgz`` where there is no ``orig.mgz``); elsewhere every image except
quicknat's own outputs; ``pattern`` (a glob) overrides all of this. Every scan gets a name that
is unique in the run (:func:`name_inputs`): the FreeSurfer subject, BIDS ``sub-X[_ses-Y]``, else
the file's stem, made unique by its path below the common folder of the clashing inputs; a clash
that remains is an error before any work. :func:`select_shard` splits a cohort across processes
(``--shard K/N``, or the rank and world size under ``torchrun``) with the same names.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QuicknatInputError
from .io import is_volume_file, stem

#: Stems quicknat writes (plain and BIDS layouts); a folder run never takes them as inputs.
OUTPUT_SUFFIXES = ("_seg", "_tissue", "_posteriors", "_uncertainty", "_dseg", "_probseg", "_map")
#: BIDS folders that hold no raw data.
BIDS_SKIP_DIRS = {"derivatives", "sourcedata", "code"}
FREESURFER_SCANS = ("orig.mgz", "T1.mgz")
_BIDS_ENTITY = re.compile(r"^sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*_[A-Za-z0-9]+$")


@dataclass(frozen=True)
class ScanInput:
    """One input scan: its path, the name its outputs take, and (BIDS) the folder they go in
    relative to the output root (``sub-01/ses-1/anat``), else ``""``."""

    path: Path
    name: str
    subdir: str = ""


@dataclass
class Discovery:
    """Inputs found, and how many files of each kind a folder run passed over."""

    scans: list[ScanInput]
    skipped: Counter = field(default_factory=Counter)
    bids_root: Path | None = None
    bids: bool = False  # outputs named and placed the BIDS way

    def summary(self) -> str:
        """One line: what was found and what was skipped."""
        line = f"found {len(self.scans)} scan(s)"
        if self.skipped:
            line += " (skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) + ")"
        return line


def is_bids_root(folder: Path) -> bool:
    """A BIDS dataset root: ``dataset_description.json`` beside ``sub-*`` folders."""
    return (folder / "dataset_description.json").is_file() and any(folder.glob("sub-*"))


def _bids_name(path: Path) -> tuple[str, str] | None:
    """``sub-01_ses-1_T1w.nii.gz`` -> (``sub-01_ses-1``, ``sub-01/ses-1/anat``); None if not BIDS."""
    s = stem(path)
    if not _BIDS_ENTITY.match(s):
        return None
    entities = s.rsplit("_", 1)[0]
    parts = dict(p.split("-", 1) for p in entities.split("_"))
    subdir = "/".join([f"sub-{parts['sub']}"] + ([f"ses-{parts['ses']}"] if "ses" in parts else []) + ["anat"])
    return entities, subdir


def _freesurfer_subject(path: Path) -> str | None:
    return path.parent.parent.name if path.parent.name == "mri" and path.name in FREESURFER_SCANS else None


def _freesurfer_home(path: Path, root: Path) -> Path | None:
    """The FreeSurfer subject folder (one with ``mri/orig.mgz`` or ``mri/T1.mgz``) that holds
    ``path``, searched up to ``root``."""
    for anc in path.parents:
        if any((anc / "mri" / n).is_file() for n in FREESURFER_SCANS):
            return anc
        if anc == root:
            break
    return None


def _why_skipped(path: Path, root: Path, in_bids: bool) -> str | None:
    """Why a folder run passes over ``path`` (None: it is a scan to segment)."""
    home = _freesurfer_home(path, root)
    if home is not None:
        mri = home / "mri"
        take = mri / "orig.mgz" if (mri / "orig.mgz").is_file() else mri / "T1.mgz"
        return None if path == take else "FreeSurfer files other than mri/orig.mgz"
    if in_bids or _bids_name(path):
        return None if stem(path).endswith("_T1w") else "non-T1w BIDS images"
    if stem(path).endswith(OUTPUT_SUFFIXES):
        return "quicknat outputs"
    return None


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            (exclude is not None and (here / d).resolve() == exclude)
            or (d in BIDS_SKIP_DIRS and is_bids_root(here))))
        files.extend(here / n for n in sorted(names) if not n.startswith(".") and is_volume_file(n))
    return files


def find_inputs(inputs: list[str | Path], *, pattern: str | None = None, exclude: Path | None = None,
                bids: bool = False) -> Discovery:
    """Expand ``inputs`` (files and folders) into named scans; see the module docstring.

    ``exclude`` (the run's output folder) is never searched; ``bids`` names and places outputs
    the BIDS way even when no input folder is a BIDS root.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    skipped: Counter = Counter()
    bids_root = None
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        in_bids = is_bids_root(item)
        bids_root = bids_root or (item if in_bids else None)
        for path in _walk(item, excluded):
            if pattern is not None:
                if path.relative_to(item).match(pattern) or path.match(pattern):
                    found.append(path)
                else:
                    skipped["not matching --pattern"] += 1
            elif (why := _why_skipped(path, item, in_bids)) is None:
                found.append(path)
            else:
                skipped[why] += 1
    if bids and bids_root is None and found:  # files given one by one: the dataset above them
        bids_root = next((a for a in found[0].resolve().parents if is_bids_root(a)), None)
    bids = bids or bids_root is not None
    return Discovery(name_inputs(found, bids=bids), skipped, bids_root, bids)


def name_inputs(paths: list[Path], *, bids: bool = False) -> list[ScanInput]:
    """Unique output names for ``paths`` (FreeSurfer subject, BIDS entities, else the stem made
    unique by the path below the clashing inputs' common folder); a clash that remains, or a
    file given twice, is a :class:`~quicknat.errors.QuicknatInputError`."""
    named: list[ScanInput] = []
    for p in paths:
        b = _bids_name(p)
        subject = _freesurfer_subject(p)
        if subject:
            named.append(ScanInput(p, subject))
        elif b:
            named.append(ScanInput(p, b[0], b[1] if bids else ""))
        else:
            named.append(ScanInput(p, stem(p)))
    counts = Counter(s.name for s in named)
    clashing = [s for s in named if counts[s.name] > 1]
    if clashing:
        root = Path(os.path.commonpath([s.path.parent.resolve() for s in clashing]))
        longer = {}
        for s in clashing:
            rel = s.path.parent.resolve().relative_to(root).parts
            longer[s.path] = "_".join([*rel, s.name])
        named = [ScanInput(s.path, longer.get(s.path, s.name), s.subdir) for s in named]
    seen: dict[str, Path] = {}
    for s in named:
        if s.name in seen:
            raise QuicknatInputError(s.path, f"would write the same outputs ({s.name}_*) as {seen[s.name]}; "
                                     "rename one or segment them into separate folders")
        seen[s.name] = s.path
    return named


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"{text!r} is not K/N with 1 <= K <= N (e.g. 1/4)")
    return int(m.group(1)), int(m.group(2))


def shard_from_env() -> tuple[int, int] | None:
    """Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, world > 1): this process's shard."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None or int(world) <= 1:
        return None
    return int(rank) + 1, int(world)


def select_shard(scans: list[ScanInput], shard: tuple[int, int] | None) -> list[ScanInput]:
    """The K-th of N interleaved shares of ``scans`` (all of them for None)."""
    if shard is None:
        return scans
    k, n = shard
    return scans[k - 1 :: n]


def check_output_folder(outdir: Path) -> None:
    """Before any work: ``outdir`` is a folder (or can become one) that this user can write."""
    if outdir.exists() and not outdir.is_dir():
        raise QuicknatInputError(outdir, "is a file; the output (-o) must be a folder")
    parent = outdir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QuicknatInputError(parent, "is not writable; choose another output folder (-o)")


def plan_run(inputs: list[str | Path], outdir: str | Path | None, *, pattern: str | None = None,
             bids: bool = False, mc: int = 0, uncertainty: bool = False) -> tuple[Discovery, Path]:
    """Everything a segmentation run checks before any work (no model, no voxel read): the
    flags, the inputs found and named, the output folder (default ``quicknat_out``, or
    ``derivatives/quicknat`` of a BIDS dataset). Returns the discovery and the output folder."""
    if uncertainty and mc < 1:
        raise QuicknatInputError(None, "--uncertainty needs --mc N (the entropy over N MC-dropout passes)")
    found = find_inputs(list(inputs), pattern=pattern, bids=bids,
                        exclude=Path(outdir) if outdir is not None else Path("quicknat_out"))
    if inputs and not found.scans:
        raise QuicknatInputError(Path(inputs[0]), "holds no scans to segment; " + found.summary())
    if outdir is None and found.bids and found.bids_root is None:
        raise QuicknatInputError(Path(inputs[0]), "has no BIDS dataset (dataset_description.json) above it; "
                                 "give the derivatives folder with -o")
    if outdir is None:
        outdir = found.bids_root / "derivatives" / "quicknat" if found.bids_root is not None else "quicknat_out"
    check_output_folder(Path(outdir))
    return found, Path(outdir)
