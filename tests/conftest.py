import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny three-view QuickNAT fitted to phantoms (shared by the segmentation tests)."""
    from helpers import fit_tiny_model

    return fit_tiny_model(tmp_path_factory.mktemp("tiny_model"))
