"""Exceptions quicknat raises on purpose.

`QuicknatInputError` is the one a user sees for bad input: its message names the file and the
problem in one line, and the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class QuicknatError(Exception):
    """Base class of quicknat's own errors."""


class QuicknatInputError(QuicknatError, ValueError):
    """An input file (scan, label map, checkpoint, manifest) cannot be used.

    Args:
        path: the offending file (may be None when no file is involved).
        problem: what is wrong, as a short phrase.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ModelNotFoundError(QuicknatError):
    """No model is installed or the named model does not exist."""
