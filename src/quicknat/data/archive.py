"""Downloading with checksum and resume, and archive extraction that cannot escape its folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..errors import QuicknatInputError

log = logging.getLogger(__name__)


def md5sum(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | Path, md5: str | None = None, progress: bool = False, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` where the server allows.

    An existing ``dest`` with the right checksum is kept (nothing is downloaded). A checksum
    mismatch removes the download and raises QuicknatInputError.
    """
    dest = Path(dest)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5.lower():
            log.info("%s: already downloaded", dest)
            return dest
        log.warning("%s: checksum mismatch, downloading again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing more to send: the part may be complete
            resp = None
        else:
            raise QuicknatInputError(url, f"download failed (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise QuicknatInputError(url, f"download failed ({getattr(exc, 'reason', exc)})") from None
    if resp is not None:
        with resp:
            resumed = have and resp.status == 206
            mode = "ab" if resumed else "wb"
            total = resp.headers.get("Content-Length")
            total = int(total) + (have if resumed else 0) if total else None
            with open(part, mode) as f, tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                                             desc=dest.name, disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    if md5 is not None:
        got = md5sum(part)
        if got != md5.lower():
            part.unlink(missing_ok=True)
            raise QuicknatInputError(url, f"checksum mismatch (md5 {got}, expected {md5.lower()}); download removed")
    os.replace(part, dest)
    return dest


def _check_member(member: tarfile.TarInfo, root: Path, archive: Path) -> None:
    name = member.name
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise QuicknatInputError(archive, f"refusing absolute path in archive: {name}")
    if ".." in p.parts:
        raise QuicknatInputError(archive, f"refusing path that leaves the target folder: {name}")
    if member.issym() or member.islnk():
        raise QuicknatInputError(archive, f"refusing link in archive: {name}")
    if not (member.isfile() or member.isdir()):
        raise QuicknatInputError(archive, f"refusing special file in archive: {name}")
    target = (root / name).resolve()
    if root != target and root not in target.parents:
        raise QuicknatInputError(archive, f"refusing path that leaves the target folder: {name}")


def safe_extract(archive: str | Path, root: str | Path) -> list[str]:
    """Extract a tar(.gz) archive into ``root``; every member is checked before anything is
    written (no absolute paths, no ``..``, no links or special files), then tarfile's ``data``
    filter is applied too where this Python has it. Returns member names."""
    archive = Path(archive)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, root, archive)
            tmp = root / f".extract-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: belt and braces
                    tar.extractall(tmp, members=members, filter="data")
                else:  # every member was validated above
                    tar.extractall(tmp, members=members)  # noqa: S202
                for item in tmp.iterdir():
                    dest = root / item.name
                    if dest.exists():
                        _merge_move(item, dest)
                    else:
                        os.replace(item, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise QuicknatInputError(archive, f"cannot extract archive ({exc})") from None
    return [m.name for m in members]


def _merge_move(src: Path, dest: Path) -> None:
    if src.is_dir() and dest.is_dir():
        for item in src.iterdir():
            target = dest / item.name
            if target.exists():
                _merge_move(item, target)
            else:
                os.replace(item, target)
    else:
        os.replace(src, dest)
