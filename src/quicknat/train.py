"""The training engine: one view or all three, QuickNAT's loss and schedule, checkpoints,
exact resume, best model by validation Dice, logs and curves, fine-tuning, and DDP.

Run folder (``RUNDIR``)::

    config.yaml  split.json  model.json          resolved config, the manifest's split, the model
    coronal.pt   axial.pt    sagittal.pt         best weights per view (the model's checkpoints)
    VIEW/last.pt VIEW/best.pt                    full state (optimiser, scheduler, RNG) / best
    VIEW/history.csv VIEW/history.json           per epoch: losses, lr, validation Dice per class
    VIEW/curves.png  VIEW/tensorboard/           curves; TensorBoard scalars when installed

The engine in parts: :func:`_setup` (data, network, optimiser), :func:`_resume` (state from
``last``), :func:`_train_epoch`, :func:`_validate` and :func:`_checkpoint`. Training data comes
from :mod:`quicknat.data` through one explicit switch: a manifest whose training scans have no
image trains on images synthesised from its label maps
(:func:`quicknat.data.synth.synthetic_training_data`), otherwise on the scans themselves
(:func:`quicknat.data.slices.real_training_data`).

Each epoch trains over the view's training slices, then validates with 3D Dice per class on
whole volumes (the view's network run over every slice) and checkpoints ``last`` atomically.
``best`` is kept by the mean validation Dice over foreground classes of the last validation set:
for synthetic training with real labelled scans in the validation split, those real scans.
``resume`` continues from ``last`` exactly: model, optimiser, scheduler and every RNG state are
restored, and each epoch's shuffling and augmentation are seeded by (seed, epoch).

Under ``torchrun --nproc-per-node N`` the same call trains with DistributedDataParallel (gloo
on CPU, NCCL on GPU) and a DistributedSampler; only rank 0 validates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import load_checkpoint, load_init, make_checkpoint, save_checkpoint, save_model
from .config import TrainConfig
from .data.manifest import Manifest, load_manifest
from .data.slices import TrainingData, real_training_data
from .data.synth_data import synthetic_training_data
from .device import barrier, dist_setup, is_main, resolve_device, rng_state, set_rng_state, sync_buffers
from .errors import QuicknatInputError
from .io import atomic_write_bytes, atomic_write_text, remove_stale_temps
from .labels import LabelScheme
from .losses import QuickNATLoss
from .model import QuickNAT, QuickNATConfig
from .report import curves_png, write_history
from .validation import validate_view
from .views import VIEW_NAMES, get_view

log = logging.getLogger(__name__)


# -- the parts -------------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything one view's training holds."""

    view: str
    cfg: TrainConfig
    scheme: LabelScheme
    data: TrainingData
    net: QuickNAT
    model: torch.nn.Module  # the network, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: Any
    dev: torch.device
    rank: int
    world: int
    rundir: Path
    provenance: dict[str, Any]
    epoch: int = 0  # epochs completed
    best: float = -1.0
    history: list[dict] = field(default_factory=list)
    steps: int = 0  # steps taken in this call

    @property
    def vdir(self) -> Path:
        return self.rundir / self.view

    @property
    def use_amp(self) -> bool:
        return self.cfg.amp and self.dev.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.cfg.channels_last and self.dev.type == "cuda"


def training_data(manifest: Manifest, view: str, cfg: TrainConfig) -> TrainingData:
    """The explicit switch: synthetic images when no training scan has one, else the scans."""
    if not manifest.scans_in("train"):
        raise QuicknatInputError(manifest.path, "the train split holds no scans")
    scheme = manifest.label_scheme()
    common = dict(settings=cfg.conform, weight_cap=cfg.weight_cap, weight_power=cfg.weight_power,
                  edge_weight=cfg.edge_weight, seed=cfg.seed, context=cfg.context)
    if all(s.image is None for s in manifest.scans_in("train")):
        return synthetic_training_data(manifest, scheme, view, synth=cfg.synth,
                                       length=(cfg.steps_per_epoch or 500) * cfg.batch_size,
                                       cache_dir=cfg.cache_dir, **common)
    return real_training_data(manifest, scheme, view, cache_dir=cfg.cache_dir, min_foreground=cfg.min_foreground,
                              augment=cfg.augment, **common)


def _setup(view: str, manifest: Manifest, rundir: Path, cfg: TrainConfig, device, init, reset_classifier: bool,
           resume: bool) -> _Run:
    """Device and process group, seeds, data, network (from ``init``), optimiser, schedule."""
    spec = get_view(view)
    dev = resolve_device(device)
    rank, world = dist_setup(dev)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    scheme = manifest.label_scheme()
    data = training_data(manifest, view, cfg)
    if len(data.dataset) == 0:
        raise QuicknatInputError(manifest.path, f"no {view} training slices with enough foreground")
    net = QuickNAT(QuickNATConfig(num_classes=spec.scheme(scheme).num_classes, num_filters=cfg.num_filters,
                                  kernel_size=cfg.kernel_size, se=cfg.se, dropout=cfg.dropout,
                                  in_channels=2 * cfg.context + 1))
    if init is not None and not resume:
        load_init(net, init, view, scheme, reset_classifier)
    net = net.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: torch.nn.Module = net
    if world > 1:
        if dev.type == "cuda":  # batch statistics over all ranks (SyncBatchNorm runs on GPUs only)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    provenance = {
        "data": {"manifest": str(manifest.path), "dataset": manifest.dataset, **data.facts,
                 **({"source": manifest.source} if manifest.source else {})},
        "config": cfg.to_dict(),
        "quicknat_version": __version__,
        "world_size": world,
    }
    return _Run(view, cfg, scheme, data, net, model, opt, sched, dev, rank, world, rundir, provenance)


def _resume(run: _Run) -> None:
    """Restore network, optimiser, schedule, history and RNG from ``VIEW/last.pt``."""
    last = run.vdir / "last.pt"
    if not last.exists():
        raise QuicknatInputError(last, "nothing to resume (no last checkpoint)")
    ck = load_checkpoint(last)
    st = ck.training_state or {}
    if "optimizer" not in st:
        raise QuicknatInputError(last, "holds no training state to resume from")
    run.net.load_state_dict(ck.state_dict, strict=True)
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    run.epoch, run.best = int(st["epoch"]) + 1, float(st["best"])
    run.history = json.loads(st["history"])
    set_rng_state(st["rng"])
    log.info("%s: resuming after %d completed epoch(s)", run.view, run.epoch)


def _loader(run: _Run, epoch: int) -> DataLoader:
    cfg, data = run.cfg, run.data.dataset
    data.set_epoch(epoch)
    if run.world > 1:
        sampler = DistributedSampler(data, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        n = None if cfg.steps_per_epoch is None else cfg.steps_per_epoch * cfg.batch_size
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        sampler = RandomSampler(data, replacement=n is not None and n > len(data), num_samples=n, generator=gen)
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=run.dev.type == "cuda", drop_last=len(data) >= cfg.batch_size)


def _train_epoch(run: _Run, epoch: int, loss_fn: QuickNATLoss, progress: bool,
                 stop_after_steps: int | None) -> dict[str, float]:
    """One epoch of training; returns the mean losses. Soft targets are used when the data
    gives them (synthetic training), class indices otherwise."""
    cfg = run.cfg
    run.model.train()
    sums = {"loss": 0.0, "dice": 0.0, "ce": 0.0}
    nb = 0
    bar = tqdm(_loader(run, epoch), desc=f"{run.view} epoch {epoch + 1}/{cfg.epochs}",
               disable=not (progress and is_main()))
    for step, batch in enumerate(bar):
        if cfg.steps_per_epoch is not None and step >= cfg.steps_per_epoch:
            break
        x = batch["image"].to(run.dev, non_blocking=True)
        y = batch["target" if "target" in batch else "label"].to(run.dev, non_blocking=True)
        w = batch["weight"].to(run.dev, non_blocking=True)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.dev.type, dtype=torch.bfloat16, enabled=run.use_amp):
            logits = run.model(x)
        loss, parts = loss_fn(logits, y, w)  # bf16 autocast needs no gradient scaling
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_clip)
        run.opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{run.view}: loss became {value} at epoch {epoch + 1}")
        sums["loss"] += value
        sums["dice"] += float(parts["dice"])
        sums["ce"] += float(parts["ce"])
        nb += 1
        bar.set_postfix(loss=f"{sums['loss'] / nb:.3f}")
        run.steps += 1
        if stop_after_steps is not None and run.steps >= stop_after_steps:
            raise KeyboardInterrupt
    return {k: v / max(nb, 1) for k, v in sums.items()}


def _validate(run: _Run) -> tuple[float, dict[str, Any], dict[str, float | None]]:
    """Dice per class on every validation set; returns the selection score (the last set's mean
    over its scored foreground classes), the record's validation fields and the last set's
    Dice per class."""
    names = get_view(run.view).scheme(run.scheme).names
    rec: dict[str, Any] = {}
    score, per_class = 0.0, {}
    for vs in run.data.validation:
        scores = validate_view(run.net, vs.volumes, run.view, run.dev, run.cfg.val_batch_size, run.use_amp)
        scored = [k for k, n in enumerate(names) if k > 0 and n not in vs.unscored]
        score = float(np.nanmean(scores[scored])) if np.isfinite(scores[scored]).any() else 0.0
        key = "val_dice" if vs.name == "validation" else f"val_{vs.name}_dice"
        per_class = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, scores)}
        rec[f"{key}_mean"] = score
        rec.update({f"{key}/{n}": v for n, v in per_class.items()})
    return score, rec, per_class


def _checkpoint(run: _Run, score: float, per_class: dict[str, float | None]) -> bool:
    """Write ``last`` (with the full training state), and ``best`` when ``score`` improved."""
    improved = score > run.best
    run.best = max(run.best, score)
    prov = {**run.provenance, "epochs": run.epoch, "best_val_dice": run.best, "val_dice_per_class": per_class}
    ck = make_checkpoint(run.net, run.view, run.scheme, run.cfg.conform, prov)
    if improved:
        save_checkpoint(ck, run.vdir / "best.pt")
        save_checkpoint(ck, run.rundir / f"{run.view}.pt")
    ck.training_state = {
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "epoch": run.epoch - 1,
        "best": run.best, "history": json.dumps(run.history), "rng": rng_state(),
    }
    save_checkpoint(ck, run.vdir / "last.pt")
    write_history(run.history, run.vdir)
    return improved


def _tensorboard(run: _Run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("no tensorboard/ folder: install the tensorboard extra (pip install 'quicknat[tensorboard]')")
        return None
    return SummaryWriter(str(run.vdir / "tensorboard"))


def train_view(
    view: str,
    manifest: Manifest,
    rundir: str | Path,
    cfg: TrainConfig,
    *,
    init: str | Path | None = None,
    reset_classifier: bool = False,
    resume: bool = False,
    device: str | torch.device = "auto",
    progress: bool = False,
    stop_after_steps: int | None = None,
    on_end=None,
) -> Path:
    """Train one view; returns the path of its best checkpoint (``RUNDIR/VIEW.pt``).

    ``stop_after_steps`` interrupts training (as Ctrl-C would) after that many steps in total
    within this call; used to test resume. ``on_end(net)`` is called on every rank with the
    trained network (e.g. to check that DDP replicas agree).
    """
    run = _setup(view, manifest, Path(rundir), cfg, device, init, reset_classifier, resume)
    if resume:
        _resume(run)
    writer = None
    if is_main():
        run.vdir.mkdir(parents=True, exist_ok=True)
        for folder in (run.rundir, run.vdir):  # what a killed run's half-written files left
            remove_stale_temps(folder)
        atomic_write_text(run.rundir / "config.yaml", cfg.to_yaml())
        atomic_write_text(run.rundir / "split.json", json.dumps(manifest.split, indent=1) + "\n")
        writer = _tensorboard(run)
    loss_fn = QuickNATLoss(cfg.dice_weight, cfg.ce_weight)
    try:
        for epoch in range(run.epoch, cfg.epochs):
            t0 = time.perf_counter()
            losses = _train_epoch(run, epoch, loss_fn, progress, stop_after_steps)
            lr = run.opt.param_groups[0]["lr"]
            run.sched.step()  # per epoch, not per batch
            sync_buffers(run.net)
            run.epoch = epoch + 1
            if is_main():
                score, fields, per_class = _validate(run)
                rec = {"epoch": run.epoch, "lr": lr, "train_loss": losses["loss"],
                       "train_dice_loss": losses["dice"], "train_ce": losses["ce"], **fields,
                       "seconds": round(time.perf_counter() - t0, 2)}
                run.history.append(rec)
                if writer is not None:
                    for k in [k for k in rec if k != "epoch" and "/" not in k and isinstance(rec[k], float)]:
                        writer.add_scalar(f"{view}/{k}", rec[k], run.epoch)
                    writer.flush()
                improved = _checkpoint(run, score, per_class)
                log.info("%s epoch %d: loss %.4f, validation Dice %.4f%s", view, run.epoch, rec["train_loss"],
                         score, " (best)" if improved else "")
            barrier()
    except KeyboardInterrupt:
        log.warning("%s: interrupted; %s holds the last completed epoch", view, run.vdir / "last.pt")
        raise
    finally:
        if writer is not None:
            writer.close()
    if is_main() and run.history:
        atomic_write_bytes(run.vdir / "curves.png", curves_png(run.history, view))
    if on_end is not None:
        on_end(run.net)
    return run.rundir / f"{view}.pt"


def _finished(rundir: Path, view: str, epochs: int) -> bool:
    last = rundir / view / "last.pt"
    if not last.exists() or not (rundir / f"{view}.pt").exists():
        return False
    st = load_checkpoint(last).training_state or {}
    return int(st.get("epoch", -1)) + 1 >= epochs


def train(
    manifest: str | Path | Manifest,
    rundir: str | Path,
    view: str = "all",
    cfg: TrainConfig | None = None,
    *,
    init: str | Path | None = None,
    reset_classifier: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> Path:
    """Train one view or all three (one after another) and write the model (``model.json``)."""
    cfg = cfg or TrainConfig()
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    views = list(VIEW_NAMES) if view == "all" else [get_view(view).name]
    rundir = Path(rundir)
    for v in views:
        if resume and _finished(rundir, v, cfg.epochs):
            continue
        train_view(v, m, rundir, cfg, init=init, reset_classifier=reset_classifier,
                   resume=resume and (rundir / v / "last.pt").exists(), device=device, progress=progress)
    if is_main():
        save_model(rundir, {v: rundir / f"{v}.pt" for v in VIEW_NAMES if (rundir / f"{v}.pt").exists()})
    return rundir
