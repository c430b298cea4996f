"""Devices, the distributed-training helpers that inference and training share, and the RNG
states a resumable run saves."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import QuicknatInputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise QuicknatInputError(None, f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuicknatInputError(None, "--device cuda was asked for, but no CUDA device is available")
    return dev


def dist_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group under ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0, and in a process that is not distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sync_buffers(net: torch.nn.Module) -> None:
    """Make every rank's batch-norm running statistics rank 0's.

    DDP broadcasts buffers *before* each forward pass, so after the last step of an epoch each
    rank holds statistics updated by its own batch; this aligns them, so all replicas are equal.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in net.buffers():
            dist.broadcast(b.data, src=0)


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and Python, as plain containers (a
    checkpoint loads with ``weights_only=True``)."""
    s = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]),
        "python": json.dumps(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (resuming a run where it stopped)."""
    torch.set_rng_state(state["torch"])
    s = json.loads(state["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
