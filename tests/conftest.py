import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).parent))
# One thread per test process: the tests' tensors are small, and a second thread spends more CPU
# time waiting than it saves (the suite's CPU time is its budget; QUICKNAT_TEST_THREADS overrides).
torch.set_num_threads(max(1, int(os.environ.get("QUICKNAT_TEST_THREADS", "1"))))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny three-view QuickNAT trained on phantoms with quicknat's own training engine
    (shared by the segmentation, training and evaluation tests)."""
    from helpers import phantom_manifest, tiny_config

    from quicknat.train import train

    root = tmp_path_factory.mktemp("tiny_model")
    manifest = phantom_manifest(root / "data")
    return train(manifest, root / "run", "all", tiny_config(), device="cpu")
