"""Three-view QuickNAT inference: conform, slice, predict, aggregate, map back, write.

``Segmenter(model).segment(volume)`` runs the whole chain on one scan and returns a
:class:`SegmentationResult` on the scan's own grid; :func:`segment_files` runs it over files
and folders and writes the outputs (see :func:`write_outputs` for the files and columns).

Aggregation follows QuickNAT: each view's softmax probabilities are added, in place, into one
accumulator with the view's weight (0.4 coronal, 0.4 axial, 0.2 sagittal; the sagittal view's
merged left/right classes are copied to both sides first, and the sum is renormalised to a
probability per voxel). The network sees whole conformed slices, as in
training, but only slices that cross the head's bounding box are run and only the box is kept;
empty slices add background without running the network.

With ``mc=N`` the chain runs N times with dropout active (batch norm in eval): the segmentation
is the argmax of the mean probability, and per structure the coefficient of variation of its
volume across passes and the IoU of the passes' masks (intersection over union of all N) are
reported, as in Bayesian QuickNAT (Roy et al. 2019). QC volumes are counted in conformed space
(1 mm³ voxels by default); the CV is unit-free either way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Model, load_model
from .conform import ConformPlan, bounding_box, plan_conform
from .errors import QuicknatError, QuicknatInputError
from .io import Volume, csv_text, is_volume_file, load_volume, stem
from .labels import ASEG_TO_TISSUE, LabelScheme, merge_labels
from .model import set_mc_dropout
from .views import channel_view, get_view, slice_box, slices

log = logging.getLogger(__name__)

#: Slices whose maximum scaled intensity is below this are treated as empty (background).
EMPTY_SLICE = 0.02
#: Margin (voxels) around the head's bounding box in conformed space.
BOX_MARGIN = 4


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuicknatInputError(None, "--device cuda was asked for, but no CUDA device is available")
    return dev


@dataclass(frozen=True)
class SpeedPaths:
    """The speed choices of :class:`Segmenter`, each of which can be turned off to get the
    reference path back (``tests/test_speed_paths.py`` checks that every one leaves the
    segmentation unchanged: Dice >= 0.999 per structure against the reference)."""

    crop: bool = True  # keep only the head's bounding box (slices crossing it, whole in-plane)
    skip_empty: bool = True  # empty slices add background without running the network
    channels_last: bool = True  # NHWC convolutions (oneDNN on CPU, cuDNN on GPU)
    fast_resample: bool = True  # separable trilinear back-mapping of the classes present only

    @classmethod
    def reference(cls) -> SpeedPaths:
        return cls(False, False, False, False)


@dataclass
class SegmentationResult:
    """A scan's segmentation on its own grid, plus what the outputs and QC need."""

    volume: Volume
    scheme: LabelScheme
    classes: np.ndarray  # native grid, class indices
    plan: ConformPlan
    conformed_image: np.ndarray
    conformed_classes: np.ndarray
    posteriors: np.ndarray | None = None  # native grid, (C, X, Y, Z) float32
    uncertainty: np.ndarray | None = None  # native grid, entropy of the mean probability
    qc: list[dict] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """Label IDs of the scheme, on the input's grid."""
        return self.scheme.decode(self.classes)

    def volumes(self) -> list[dict]:
        """Volume (mm³) of every structure of the scheme, from the native voxel size."""
        counts = np.bincount(self.classes.reshape(-1).astype(np.int64), minlength=self.scheme.num_classes)
        vv = self.volume.voxel_volume
        rows = [
            {
                "structure": c.name,
                "label": c.label,
                "voxels": int(counts[k]),
                "volume_mm3": round(float(counts[k]) * vv, 3),
            }
            for k, c in enumerate(self.scheme.classes)
            if k != 0
        ]
        total = int(counts[1:].sum())
        rows.append({"structure": "Total", "label": "", "voxels": total, "volume_mm3": round(total * vv, 3)})
        return rows


class Segmenter:
    """Segments volumes with a QuickNAT model (three views or fewer).

    Args:
        model: a :class:`~quicknat.checkpoint.Model`, a model folder/checkpoint path, an
            installed model name, or None for the default model.
        device: "auto", "cpu", "cuda" or a torch device.
        batch_size: slices per forward pass (default 4 on CPU, 64 on CUDA: measured best by
            ``bench/segment_speed.py``).
        amp: bfloat16 autocast. Off by default: with the shipped model it changed 0.1 % of
            the voxels and cost a structure up to 0.12 Dice (``bench/segment_speed.py --amp``),
            and quicknat never trades accuracy for speed silently.

    Speed choices that leave results unchanged (each checked against the reference path in
    ``tests/test_speed_paths.py``): channels-last convolutions, the head's bounding box only,
    empty slices skipped, probabilities accumulated in place, separable back-mapping.
    """

    def __init__(
        self,
        model: Model | str | Path | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        amp: bool = False,
        paths: SpeedPaths = SpeedPaths(),
    ):
        self.model = load_model(model)
        self.paths = paths
        self.device = resolve_device(device)
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 4)
        self.amp = amp
        self.scheme = self.model.scheme
        self.settings = self.model.conform
        self.nets = {}
        self.expand = {}
        for name, ck in self.model.views.items():
            fmt = torch.channels_last if paths.channels_last else torch.contiguous_format
            self.nets[name] = ck.build().to(self.device, memory_format=fmt)
            idx = get_view(name).expand_index(self.scheme)
            self.expand[name] = None if idx is None else torch.as_tensor(idx, device=self.device)
        total = sum(self.model.weights.values())
        self.weights = {v: w / total for v, w in self.model.weights.items()}

    # -- core --------------------------------------------------------------------------------
    def _view_pass(self, name: str, image: torch.Tensor, box: tuple[slice, ...], acc: torch.Tensor,
                   weight: float) -> None:
        """Add ``weight`` x this view's softmax probabilities inside ``box`` into ``acc``.

        The network always sees whole conformed slices, as in training (cutting slices to the
        head's box changes what a convolutional network predicts near the cut); only the slices
        that cross the box are run, and only the box is kept.
        """
        net = self.nets[name]
        along, (hs, ws) = slice_box(box, name)
        stack = slices(image, name)[along]  # (N, H, W), whole slices
        target = channel_view(acc, name)  # (N, C, h, w), shares acc's memory
        if self.paths.skip_empty:
            nonempty = (stack.reshape(stack.shape[0], -1).amax(1) > EMPTY_SLICE).nonzero().flatten().tolist()
        else:
            nonempty = list(range(stack.shape[0]))
        empty = sorted(set(range(stack.shape[0])) - set(nonempty))
        if empty:
            target[empty, 0] += weight
        expand = self.expand[name]
        for i in range(0, len(nonempty), self.batch_size):
            idx = nonempty[i : i + self.batch_size]
            x = stack[idx].unsqueeze(1).to(self.device, non_blocking=True)
            if self.paths.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = net(x)[:, :, hs, ws]
            p = torch.softmax(logits.float(), dim=1)
            if expand is not None:
                p = p.index_select(1, expand)
            run = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == len(idx) else idx
            target[run] += weight * p.to(acc.dtype)  # a plain slice adds in place, no gather/scatter

    def _aggregate(self, image: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
        shape = tuple(b.stop - b.start for b in box)
        acc = torch.zeros((self.scheme.num_classes, *shape), dtype=torch.float32, device=self.device)
        for name in self.nets:
            self._view_pass(name, image, box, acc, self.weights[name])
        # The sagittal expansion copies a merged pair's probability to both sides, so the sum
        # exceeds 1 there; renormalise (the argmax is unchanged).
        acc /= acc.sum(0, keepdim=True)
        return acc

    @torch.inference_mode()
    def segment(
        self,
        volume: Volume,
        mc: int = 0,
        posteriors: bool = False,
        uncertainty: bool = False,
        seed: int = 0,
    ) -> SegmentationResult:
        """Segment one scan; the result lies on the scan's own grid."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        plan = plan_conform(volume, self.settings)
        conformed = plan.image(volume.array)
        timings["conform"] = time.perf_counter() - t0

        if self.paths.crop:
            start, stop = _head_box(conformed)
        else:
            start, stop = np.zeros(3, dtype=int), np.array(conformed.shape)
        sub = plan.crop(start, stop)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        image = torch.from_numpy(conformed)

        t = time.perf_counter()
        qc = None
        passes = max(1, mc)
        for net in self.nets.values():
            set_mc_dropout(net, mc > 0)
        if mc > 0:
            torch.manual_seed(seed)
            probs, qc = self._mc(image, region, passes)
        else:
            probs = self._aggregate(image, region)
        timings["network"] = time.perf_counter() - t

        t = time.perf_counter()
        probs_cpu = probs.float().cpu()
        cls_crop = probs_cpu.argmax(0).to(torch.uint8).numpy()
        conformed_classes = np.zeros(plan.shape, dtype=np.uint8)
        conformed_classes[region] = cls_crop
        fast = self.paths.fast_resample
        native = sub.probs_to_native(probs_cpu, argmax_only=True, fast=fast)
        post = sub.probs_to_native(probs_cpu, argmax_only=False, fast=fast) if posteriors else None
        unc = None
        if uncertainty:
            ent = -(probs_cpu.clamp_min(1e-8).log() * probs_cpu).sum(0)
            unc = _scalar_to_native(sub, ent, fast)
        timings["back_to_native"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(
            volume, self.scheme, native, plan, conformed, conformed_classes, post, unc, qc, timings
        )

    def _mc(self, image: torch.Tensor, box: tuple[slice, ...], passes: int) -> tuple[torch.Tensor, list[dict]]:
        c = self.scheme.num_classes
        shape = tuple(b.stop - b.start for b in box)
        mean = torch.zeros((c, *shape), dtype=torch.float32, device=self.device)
        volumes = torch.zeros((passes, c), dtype=torch.float64)
        seen = torch.zeros(shape, dtype=torch.int64, device=self.device)  # bit c: some pass said c
        first = agree = None
        for k in range(passes):
            p = self._aggregate(image, box)
            mean += p
            lab = p.argmax(0)
            volumes[k] = torch.bincount(lab.flatten(), minlength=c).double().cpu()
            seen |= torch.bitwise_left_shift(torch.ones_like(seen), lab)
            if first is None:
                first, agree = lab, torch.ones_like(lab, dtype=torch.bool)
            else:
                agree &= lab == first
        mean /= passes
        inter = torch.bincount(first[agree].flatten(), minlength=c).double().cpu()
        union = torch.stack([((seen >> k) & 1).sum() for k in range(c)]).double().cpu()
        vox = self.settings.voxel_size**3
        rows = []
        for k, cl in enumerate(self.scheme.classes):
            if k == 0:
                continue
            v = volumes[:, k] * vox
            m = float(v.mean())
            sd = float(v.std(unbiased=True)) if passes > 1 else 0.0
            rows.append({
                "structure": cl.name,
                "label": cl.label,
                "mean_volume_mm3": round(m, 3),
                "std_volume_mm3": round(sd, 3),
                "cv": round(sd / m, 5) if m > 0 else float("nan"),
                "iou": round(float(inter[k] / union[k]), 5) if union[k] > 0 else float("nan"),
                "passes": passes,
            })
        return mean, rows


def _head_box(conformed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = bounding_box(conformed > EMPTY_SLICE, BOX_MARGIN)
    return box if box is not None else (np.zeros(3, dtype=int), np.array(conformed.shape))


def _scalar_to_native(plan: ConformPlan, values: torch.Tensor, fast: bool = True) -> np.ndarray:
    from .conform import _map, _resample

    if plan.exact:
        return _map(values.numpy().astype(np.float32), plan.from_native, plan.native_shape, True)
    return _resample(values.float(), plan.from_native, plan.native_shape, "bilinear", separable=fast).numpy()


# -- outputs -------------------------------------------------------------------------------
class _Staged:
    """Writes files under temporary names and renames them all at the end (all or nothing)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp{suffix}")
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        return [f for _, f in self.pending]

    def abort(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)


def write_outputs(
    result: SegmentationResult,
    outdir: str | Path,
    name: str,
    tissue: bool = False,
    overlay: bool = True,
) -> list[Path]:
    """Write one scan's outputs; returns the paths. Files (``<name>`` = the scan's stem):

    * ``<name>_seg.nii.gz``: label IDs, int16, the input's shape, affine and header.
    * ``<name>_volumes.csv``: structure, label, voxels, volume_mm3 (every class, then Total).
    * ``<name>_qc.csv`` (MC dropout): structure, label, mean/std volume, cv, iou, passes.
    * ``<name>_overlay.png``: the scan and segmentation in three planes.
    * ``<name>_tissue.nii.gz`` (``tissue``): aseg33 merged to 1 CSF, 2 GM, 3 WM.
    * ``<name>_posteriors.nii.gz``: class probabilities, 4D (X, Y, Z, C), float32.
    * ``<name>_uncertainty.nii.gz``: voxel-wise entropy of the mean probability (nats).
    """
    from .io import save_volume
    from .report import save_overlay

    outdir = Path(outdir)
    vol = result.volume
    stage = _Staged()
    try:
        labels = result.labels
        save_volume(labels, vol.affine, stage.path(outdir / f"{name}_seg.nii.gz"), header=vol.header, dtype=np.int16)
        (stage.path(outdir / f"{name}_volumes.csv")).write_text(csv_text(result.volumes()))
        if result.qc is not None:
            stage.path(outdir / f"{name}_qc.csv").write_text(csv_text(result.qc))
        if tissue:
            if result.scheme.name != "aseg33":
                raise QuicknatError(f"--tissue needs an aseg33 model, not {result.scheme.name!r}")
            save_volume(merge_labels(labels, ASEG_TO_TISSUE), vol.affine, stage.path(outdir / f"{name}_tissue.nii.gz"),
                        header=vol.header, dtype=np.int16)
        if result.posteriors is not None:
            post = np.moveaxis(result.posteriors, 0, -1).astype(np.float32, copy=False)  # a view, no 2nd copy
            save_volume(post, vol.affine, stage.path(outdir / f"{name}_posteriors.nii.gz"), dtype=np.float32)
        if result.uncertainty is not None:
            unc_path = stage.path(outdir / f"{name}_uncertainty.nii.gz")
            save_volume(result.uncertainty, vol.affine, unc_path, header=vol.header, dtype=np.float32)
        if overlay:
            save_overlay(
                None, None, stage.path(outdir / f"{name}_overlay.png"), scheme=result.scheme,
                conformed=(result.conformed_image, result.conformed_classes), title=name,
            )
        return stage.commit()
    except BaseException:
        stage.abort()
        raise


def find_scans(inputs: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """Expand files and folders into (scan path, came from a folder) pairs, sorted per folder."""
    out: list[tuple[Path, bool]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_volume_file(q) and not q.name.startswith("."))
            out.extend((q, True) for q in found)
        else:
            out.append((p, False))
    return out


def example_scan() -> Path:
    """The bundled example: nilearn's MNI152 2009 T1 template (1 mm), shipped with nilearn."""
    from nilearn.datasets import load_mni152_template

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quicknat"
    path = cache / "mni152_t1_1mm.nii.gz"
    if not path.exists():
        img = load_mni152_template(resolution=1)
        from .io import save_volume

        save_volume(np.asarray(img.get_fdata(), dtype=np.float32), img.affine, path, dtype=np.float32)
    return path


@dataclass
class ScanOutcome:
    path: Path
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    from_folder: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def segment_files(
    inputs: Sequence[str | Path],
    outdir: str | Path | None = None,
    *,
    model: Model | str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    mc: int = 0,
    tissue: bool = False,
    posteriors: bool = False,
    uncertainty: bool = False,
    overlay: bool = True,
    amp: bool = False,
    progress: bool = False,
    segmenter: Segmenter | None = None,
    stream: bool = True,
) -> list[ScanOutcome]:
    """Segment scans (files or folders); a scan that fails is recorded and skipped.

    The model is loaded before any scan is read, so a missing model fails once, up front.
    With ``stream`` (the default), I/O overlaps compute: the next scan is read in one thread and
    the previous scan's outputs are written in another while the current scan is segmented; at
    most one scan is read ahead and one result waits to be written. ``stream=False`` does one
    thing at a time (the reference: both write the same files).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    seg = segmenter or Segmenter(model, device=device, batch_size=batch_size, amp=amp)
    if not inputs:
        inputs = [example_scan()]
    outdir = Path(outdir) if outdir is not None else Path("quicknat_out")
    scans = find_scans(inputs)
    outcomes = [ScanOutcome(path, from_folder=from_folder) for path, from_folder in scans]

    def load(path: Path) -> tuple[Volume, float]:
        t = time.perf_counter()
        return load_volume(path), time.perf_counter() - t

    def write(oc: ScanOutcome, res: SegmentationResult) -> None:
        t = time.perf_counter()
        oc.outputs = write_outputs(res, outdir, stem(oc.path), tissue=tissue, overlay=overlay)
        res.timings["write"] = time.perf_counter() - t
        oc.timings = res.timings

    def settle(oc: ScanOutcome, job: Callable[[], object]) -> object:
        """Run ``job``; a failure becomes the scan's error (and None is returned)."""
        try:
            return job()
        except (QuicknatInputError, QuicknatError) as exc:
            oc.error = str(exc)
        except Exception as exc:  # one bad scan must not stop a cohort
            log.debug("failure on %s", oc.path, exc_info=True)
            oc.error = f"{oc.path}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        return None

    def finish(oc: ScanOutcome, job: Future | None) -> None:
        if job is not None:
            settle(oc, job.result)
        log.info("%s: %s", oc.path, oc.error or f"wrote {len(oc.outputs)} files")

    def compute(reading: Future) -> SegmentationResult:
        vol, seconds = reading.result()
        res = seg.segment(vol, mc=mc, posteriors=posteriors, uncertainty=uncertainty and mc > 0)
        res.timings["load"] = seconds
        return res

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:

        def submit(pool: ThreadPoolExecutor, fn, *args) -> Future:
            if stream:
                return pool.submit(fn, *args)
            done: Future = Future()  # one thing at a time: run it now
            try:
                done.set_result(fn(*args))
            except Exception as exc:
                done.set_exception(exc)
            return done

        reading = submit(reader, load, outcomes[0].path) if outcomes else None
        writing: tuple[ScanOutcome, Future] | None = None
        for i, oc in enumerate(tqdm(outcomes, desc="segment", unit="scan", disable=not progress)):
            current = reading
            reading = submit(reader, load, outcomes[i + 1].path) if i + 1 < len(outcomes) else None
            res = settle(oc, lambda current=current: compute(current))
            if writing is not None:  # at most one result waits to be written
                finish(*writing)
                writing = None
            if res is not None:
                writing = (oc, submit(writer, write, oc, res))
            else:
                finish(oc, None)
        if writing is not None:
            finish(*writing)
    return outcomes
