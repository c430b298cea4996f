"""quicknat: fast whole-brain segmentation of T1-weighted MRI with QuickNAT."""

from __future__ import annotations

from .errors import QuicknatError, QuicknatInputError

__version__ = "0.1.0"

__all__ = ["QuicknatError", "QuicknatInputError", "Segmenter", "__version__"]


def __getattr__(name: str):
    # Segmenter pulls in torch and the network; import it lazily so `quicknat --version` is fast.
    if name == "Segmenter":
        from .segment import Segmenter

        return Segmenter
    raise AttributeError(name)
