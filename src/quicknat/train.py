"""The training engine: one view or all three, QuickNAT's loss and schedule, checkpoints,
exact resume, best model by validation Dice, logs and curves, fine-tuning, and DDP.

Run folder (``RUNDIR``)::

    config.yaml  split.json  model.json          resolved config, the manifest's split, the model
    coronal.pt   axial.pt    sagittal.pt         best weights per view (the model's checkpoints)
    VIEW/last.pt VIEW/best.pt                    full state (optimiser, scheduler, RNG) / best
    VIEW/history.csv VIEW/history.json           per epoch: losses, lr, validation Dice per class
    VIEW/curves.png  VIEW/tensorboard/           curves; TensorBoard scalars when installed

Each epoch trains over the view's training slices, then validates on the validation scans with
3D Dice per class on whole volumes (the view's network run over every slice), and checkpoints
``last`` atomically. ``best`` is kept by the mean validation Dice over foreground classes.
``resume`` continues from ``last`` exactly: model, optimiser, scheduler, scaler and every RNG
state are restored, and each epoch's shuffling and augmentation are seeded by (seed, epoch).

Under ``torchrun --nproc-per-node N`` the same call trains with DistributedDataParallel (gloo
on CPU, NCCL on GPU) and a DistributedSampler; only rank 0 validates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import __version__
from .checkpoint import ViewCheckpoint, load_checkpoint, make_checkpoint, save_checkpoint, save_model
from .config import TrainConfig
from .data.manifest import Manifest, load_manifest
from .data.slices import SliceDataset, VolumeCache, median_frequency_weights, volume_slices
from .errors import QuicknatInputError
from .io import atomic_write_bytes, atomic_write_text, csv_text
from .labels import LabelScheme, get_scheme
from .losses import QuickNATLoss
from .model import QuickNAT, QuickNATConfig
from .segment import resolve_device
from .views import VIEW_NAMES, VIEWS, get_view

log = logging.getLogger(__name__)


# -- distributed helpers -------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def manifest_scheme(manifest: Manifest) -> LabelScheme:
    s = manifest.scheme
    if isinstance(s, dict):
        return LabelScheme.from_dict(s)
    path = Path(str(s))
    if not path.is_absolute() and (manifest.root / path).exists():
        return get_scheme(manifest.root / path)
    return get_scheme(str(s))


def _scan_paths(manifest: Manifest, split: str):
    out = []
    for scan in manifest.scans_in(split):
        if scan.label is None:
            raise QuicknatInputError(manifest.path, f"scan {scan.id} has no label")
        out.append((scan, manifest.resolve(scan.image), manifest.resolve(scan.label)))
    return out


# -- validation ----------------------------------------------------------------------------
def dice_3d(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice per class on whole volumes; NaN where a class is absent from both."""
    p = pred.reshape(-1).astype(np.int64)
    r = ref.reshape(-1).astype(np.int64)
    inter = np.bincount(p[p == r], minlength=num_classes).astype(np.float64)
    sp = np.bincount(p, minlength=num_classes).astype(np.float64)
    sr = np.bincount(r, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sp + sr > 0, 2 * inter / (sp + sr), np.nan)


@torch.inference_mode()
def validate_view(net: torch.nn.Module, cache: VolumeCache, view: str, device: torch.device,
                  batch_size: int = 16, amp: bool = False) -> np.ndarray:
    """Mean over validation volumes of 3D Dice per class (the view's scheme)."""
    spec = get_view(view)
    merge = cache.scheme.lr_merge_index() if spec.merge_lr else np.arange(cache.scheme.num_classes)
    num_classes = spec.scheme(cache.scheme).num_classes
    net.eval()
    scores = []
    for image, classes in zip(cache.images, cache.classes):
        stack = torch.from_numpy(volume_slices(image, view))
        pred = torch.zeros(stack.shape, dtype=torch.uint8)
        for i in range(0, len(stack), batch_size):
            x = stack[i : i + batch_size, None].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                pred[i : i + batch_size] = net(x).argmax(1).to(torch.uint8).cpu()
        ref = np.moveaxis(merge[np.asarray(classes)], spec.axis, 0)
        scores.append(dice_3d(pred.numpy(), ref, num_classes))
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(scores), axis=0) if scores else np.full(num_classes, np.nan)


# -- one view ------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_np_state()),
        "python": json.dumps(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    s = json.loads(state["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _build_net(cfg: TrainConfig, num_classes: int) -> QuickNAT:
    return QuickNAT(QuickNATConfig(num_classes=num_classes, num_filters=cfg.num_filters,
                                   kernel_size=cfg.kernel_size, se=cfg.se, dropout=cfg.dropout))


def _load_init(net: QuickNAT, init: str | Path, view: str, scheme: LabelScheme, reset_classifier: bool) -> None:
    """Start from a pre-trained checkpoint of the same architecture (fine-tuning)."""
    path = Path(init)
    if path.is_dir():
        path = path / f"{view}.pt"
    ck = load_checkpoint(path)
    if ck.view != view:
        raise QuicknatInputError(path, f"holds the {ck.view} view, not {view}")
    ours = replace(net.config, num_classes=ck.config.num_classes, dropout=ck.config.dropout)
    if ours != ck.config:
        raise QuicknatInputError(path, "architecture differs from this run's (filters, kernel, SE or depth)")
    if ck.scheme != scheme and not reset_classifier:
        raise QuicknatInputError(
            path, f"label scheme {ck.scheme.name!r} differs from the data's {scheme.name!r}; "
            "pass --reset-classifier to re-initialise the classifier"
        )
    state = dict(ck.state_dict)
    if ck.scheme != scheme:
        own = net.state_dict()
        for k in ("classifier.weight", "classifier.bias"):
            state[k] = own[k]
    net.load_state_dict(state, strict=True)


def _plot_curves(history: list[dict], path: Path, view: str) -> None:
    from .report import curves_png

    atomic_write_bytes(path, curves_png(history, view))


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
    from tqdm.auto import tqdm

    spec = get_view(view)
    rundir = Path(rundir)
    vdir = rundir / view
    dev = resolve_device(device)
    rank, world = _dist_setup(dev)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    scheme = manifest_scheme(manifest)
    vscheme = spec.scheme(scheme)
    merge = scheme.lr_merge_index() if spec.merge_lr else np.arange(scheme.num_classes)
    synthetic = all(s.image is None for s in manifest.scans_in("train"))
    if synthetic:
        data, val_cache, n_train = _synthetic_data(manifest, scheme, view, cfg, merge, vscheme.num_classes)
    else:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        train_cache = VolumeCache(_scan_paths(manifest, "train"), scheme, cfg.conform, cache_dir)
        val_cache = VolumeCache(_scan_paths(manifest, "validation"), scheme, cfg.conform, cache_dir)
        if train_cache.unknown and _is_main():
            log.warning("label IDs not in scheme %s (set to background): %s", scheme.name,
                        dict(sorted(train_cache.unknown.items())[:10]))
        counts = np.bincount(merge, weights=train_cache.class_counts(), minlength=vscheme.num_classes)
        class_weights = median_frequency_weights(counts, cfg.weight_cap)
        data = SliceDataset(train_cache, view, class_weights, cfg.edge_weight, cfg.min_foreground, cfg.augment,
                            cfg.seed)
        n_train = len(train_cache.ids)
    if len(data) == 0:
        raise QuicknatInputError(manifest.path, f"no {view} training slices with enough foreground")

    net = _build_net(cfg, vscheme.num_classes)
    if init is not None and not resume:
        _load_init(net, init, view, scheme, reset_classifier)
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
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 autocast needs no scaling
    loss_fn = QuickNATLoss(cfg.dice_weight, cfg.ce_weight)

    start_epoch, best, history = 0, -1.0, []
    last_path = vdir / "last.pt"
    if resume:
        if not last_path.exists():
            raise QuicknatInputError(last_path, "nothing to resume (no last checkpoint)")
        ck = load_checkpoint(last_path)
        net.load_state_dict(ck.state_dict, strict=True)
        st = ck.training_state or {}
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        start_epoch, best = int(st["epoch"]) + 1, float(st["best"])
        history = json.loads(st["history"])
        _set_rng_state(st["rng"])
        log.info("%s: resuming after epoch %d", view, start_epoch - 1)

    if _is_main():
        vdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rundir / "config.yaml", cfg.to_yaml())
        atomic_write_text(rundir / "split.json", json.dumps(manifest.split, indent=1) + "\n")
    writer = None
    if _is_main():
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(vdir / "tensorboard"))
        except ImportError:
            writer = None

    provenance_base = {
        "data": {"manifest": str(manifest.path), "dataset": manifest.dataset,
                 "train_scans": n_train, "validation_scans": len(val_cache.ids), "synthetic": synthetic,
                 **({"source": manifest.source} if manifest.source else {})},
        "config": cfg.to_dict(),
        "quicknat_version": __version__,
        "world_size": world,
    }
    steps_done = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            data.set_epoch(epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            if world > 1:
                sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
                sampler.set_epoch(epoch)
            else:
                n = None if cfg.steps_per_epoch is None else cfg.steps_per_epoch * cfg.batch_size
                sampler = RandomSampler(data, replacement=n is not None and n > len(data), num_samples=n,
                                        generator=gen)
            loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                pin_memory=dev.type == "cuda", drop_last=len(data) >= cfg.batch_size,
                                persistent_workers=False)
            model.train()
            sums = {"loss": 0.0, "dice": 0.0, "ce": 0.0}
            nb = 0
            bar = tqdm(loader, desc=f"{view} epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and _is_main()))
            for step, batch in enumerate(bar):
                if cfg.steps_per_epoch is not None and step >= cfg.steps_per_epoch:
                    break
                x = batch["image"].to(dev, non_blocking=True)
                y = batch["label"].to(dev, non_blocking=True)
                w = batch["weight"].to(dev, non_blocking=True)
                if dev.type == "cuda" and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
                loss, parts = loss_fn(logits, y, w)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"{view}: loss became {loss_value} at epoch {epoch + 1}")
                sums["loss"] += loss_value
                sums["dice"] += float(parts["dice"])
                sums["ce"] += float(parts["ce"])
                nb += 1
                bar.set_postfix(loss=f"{sums['loss'] / nb:.3f}")
                steps_done += 1
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    raise KeyboardInterrupt
            lr = opt.param_groups[0]["lr"]
            sched.step()  # per epoch, not per batch
            _sync_buffers(net)
            if _is_main():
                scores = validate_view(net, val_cache, view, dev, cfg.val_batch_size, use_amp)
                fg = scores[1:]
                mean = float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0
                rec = {
                    "epoch": epoch + 1, "lr": lr, "train_loss": sums["loss"] / max(nb, 1),
                    "train_dice_loss": sums["dice"] / max(nb, 1), "train_ce": sums["ce"] / max(nb, 1),
                    "val_dice_mean": mean, "seconds": round(time.perf_counter() - t0, 2),
                }
                per_class = {n: (None if np.isnan(v) else float(v)) for n, v in zip(vscheme.names, scores)}
                rec.update({f"val_dice/{n}": v for n, v in per_class.items()})
                history.append(rec)
                if writer is not None:
                    for k in ("train_loss", "train_dice_loss", "train_ce", "val_dice_mean", "lr"):
                        writer.add_scalar(f"{view}/{k}", rec[k], epoch + 1)
                    writer.flush()
                improved = mean > best
                best = max(best, mean)
                prov = {**provenance_base, "epochs": epoch + 1, "best_val_dice": best,
                        "val_dice_per_class": per_class}
                ck = make_checkpoint(net, view, scheme, cfg.conform, prov)
                if improved:
                    save_checkpoint(ck, vdir / "best.pt")
                    save_checkpoint(ck, rundir / f"{view}.pt")
                ck.training_state = {
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "best": best, "history": json.dumps(history), "rng": _rng_state(),
                }
                save_checkpoint(ck, last_path)
                _write_history(history, vdir)
                log.info("%s epoch %d: loss %.4f, validation Dice %.4f%s", view, epoch + 1, rec["train_loss"], mean,
                         " (best)" if improved else "")
            _barrier()
    except KeyboardInterrupt:
        log.warning("%s: interrupted; %s holds the last completed epoch", view, last_path)
        raise
    finally:
        if writer is not None:
            writer.close()
    if _is_main() and history:
        _plot_curves(history, vdir / "curves.png", view)
    if on_end is not None:
        on_end(net)
    return rundir / f"{view}.pt"


def _synthetic_data(manifest: Manifest, scheme: LabelScheme, view: str, cfg: TrainConfig, merge, num_classes):
    """Training slices generated from the training label maps; validation volumes synthesised
    from the validation maps with fixed seeds (the same every epoch and run)."""
    from .data.synth import LabelMapSynth, SynthConfig, SynthSliceDataset, SynthVolumes
    from .io import load_volume

    def maps(split):
        out = []
        for _scan, _, label in _scan_paths(manifest, split):
            v = load_volume(label)
            out.append((v.array, v.affine))
        return out

    train_maps = maps("train")
    counts = np.zeros(scheme.num_classes)
    for arr, _ in train_maps:
        cls, _ = scheme.encode(arr)
        counts += np.bincount(cls.reshape(-1), minlength=scheme.num_classes)
    class_weights = median_frequency_weights(np.bincount(merge, weights=counts, minlength=num_classes), cfg.weight_cap)
    synth = LabelMapSynth(train_maps, scheme, cfg.conform, SynthConfig(**cfg.synth))
    length = (cfg.steps_per_epoch or 500) * cfg.batch_size
    data = SynthSliceDataset(synth, view, class_weights, cfg.edge_weight, length, cfg.seed, cfg.crop)
    val_scans = manifest.scans_in("validation")
    val_synth = LabelMapSynth(maps("validation"), scheme, cfg.conform)
    val = SynthVolumes(val_synth, [s.id for s in val_scans], [10_000 + k for k in range(len(val_scans))])
    return data, val, len(train_maps)


def _sync_buffers(net: torch.nn.Module) -> None:
    """Make every rank's batch-norm running statistics rank 0's.

    DDP broadcasts buffers *before* each forward pass, so after the last step of an epoch each
    rank holds statistics updated by its own batch; this aligns them, so all replicas are equal.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in net.buffers():
            dist.broadcast(b.data, src=0)


def _write_history(history: list[dict], vdir: Path) -> None:
    atomic_write_text(vdir / "history.json", json.dumps(history, indent=1) + "\n")
    keys = list(dict.fromkeys(k for h in history for k in h))
    atomic_write_text(vdir / "history.csv", csv_text(history, keys))


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
    done: dict[str, Path] = {}
    for v in views:
        if resume and (rundir / v / "last.pt").exists():
            st = (load_checkpoint(rundir / v / "last.pt").training_state or {})
            if int(st.get("epoch", -1)) + 1 >= cfg.epochs and (rundir / f"{v}.pt").exists():
                done[v] = rundir / f"{v}.pt"
                continue
            done[v] = train_view(v, m, rundir, cfg, init=init, reset_classifier=reset_classifier, resume=True,
                                 device=device, progress=progress)
        else:
            done[v] = train_view(v, m, rundir, cfg, init=init, reset_classifier=reset_classifier, device=device,
                                 progress=progress)
    if _is_main():
        existing = {v: rundir / f"{v}.pt" for v in VIEWS if (rundir / f"{v}.pt").exists()}
        save_model(rundir, existing)
    return rundir


def plot_history(rundir: str | Path) -> list[Path]:
    """Redraw the curves of every view of a run (on demand)."""
    out = []
    for v in VIEWS:
        hp = Path(rundir) / v / "history.json"
        if hp.exists():
            _plot_curves(json.loads(hp.read_text()), Path(rundir) / v / "curves.png", v)
            out.append(Path(rundir) / v / "curves.png")
    return out


def export_model(rundir: str | Path, out: str | Path, half: bool = True) -> Path:
    """Copy a run's best view checkpoints (weights only, float16 by default) into a model folder."""
    rundir, out = Path(rundir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for v in VIEWS:
        src = rundir / f"{v}.pt"
        if src.exists():
            ck: ViewCheckpoint = load_checkpoint(src)
            ck.training_state = None
            paths[v] = save_checkpoint(ck, out / f"{v}.pt", half=half)
    if not paths:
        raise QuicknatInputError(rundir, "no view checkpoints to export")
    spec = json.loads((rundir / "model.json").read_text()) if (rundir / "model.json").exists() else None
    weights = {v: spec["views"][v]["weight"] for v in paths} if spec else None
    save_model(out, paths, weights)
    if (rundir / "config.yaml").exists():
        shutil.copy(rundir / "config.yaml", out / "config.yaml")
    return out
