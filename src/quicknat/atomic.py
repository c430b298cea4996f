"""The one atomic-write mechanism of quicknat, and the clean-up after an interrupted one.

Every file quicknat writes goes through :func:`atomic_path`: a temporary name beside the target
(``.NAME.HOST-PID.RANDOM.tmpSUFFIX``), renamed onto the target when complete, removed on any
error. A process killed mid-write (kill -9, power loss) leaves its temporary file behind;
:func:`remove_stale_temps` removes those of dead processes of this host when a command next runs
in that folder. :mod:`quicknat.io` re-exports these names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_TEMP_OWNER = f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp(\.[\w.]+)?$")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that an interrupted write (kill -9, power loss) left in
    ``folder``: those :func:`atomic_path` made on this host for a process that no longer runs.
    A write in progress in another process, or from another machine, is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = socket.gethostname().replace(".", "_")
    for p in folder.glob(".*.tmp*"):
        m = _TEMP_NAME.match(p.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted write", folder, len(removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's running process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one atomic-write mechanism of quicknat: yields a temporary path in ``path``'s folder
    (same suffix, so writers that go by the suffix work) for the caller to write; on success it
    takes the umask's mode and is renamed onto ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.{_TEMP_OWNER}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_paths() -> Iterator[Callable[[str | Path], Path]]:
    """Several files at once, all or nothing: yields ``stage(final) -> temporary path``; every
    staged file is renamed onto its final name when the block succeeds, none when it fails."""
    with contextlib.ExitStack() as stack:
        yield lambda final: stack.enter_context(atomic_path(final))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_npy(path: str | Path, array: np.ndarray) -> None:
    """Save an array as ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
