"""Three-view QuickNAT inference: conform, slice, predict, aggregate, map back, write.

``Segmenter(model).segment(volume)`` runs the whole chain on one scan and returns a
:class:`SegmentationResult` on the scan's own grid; :func:`quicknat.runner.segment_files` runs
it over files and folders and writes the outputs (:func:`quicknat.outputs.write_outputs`).

Aggregation follows QuickNAT: each view's softmax probabilities are added, in place, into one
accumulator with the view's weight (the model's ``model.json``: 0.4 coronal, 0.4 axial, 0.2
sagittal by default, equal for the shipped model, measured by ``bench/view_weights.py``; the
sagittal view's merged left/right classes are copied to both sides first, and the sum is
renormalised to a probability per voxel). Views may run on different grids (checkpoint
conform settings that differ in voxel size and shape only): the scan is conformed to each, a
coarser grid's views are aggregated on the part of it covering the finest grid's head box, and
resampled (trilinear) onto that box before the sum. The network sees whole conformed slices, as in
training, but only slices that cross the head's bounding box are run and only the box is kept;
empty slices add background without running the network. A 2.5D view (``in_channels`` > 1 in its
checkpoint) gets each slice with its neighbours as channels (:func:`quicknat.views.with_context`),
taken from the whole volume, so the box's end slices see their true neighbours.

With ``mc=N`` the chain runs N times with dropout active (batch norm in eval): the segmentation
is the argmax of the mean probability, and per structure the coefficient of variation of its
volume across passes and the IoU of the passes' masks (intersection over union of all N) are
reported, as in Bayesian QuickNAT (Roy et al. 2019). QC volumes are counted in conformed space
(1 mm³ voxels by default); the CV is unit-free either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import Model, load_model
from .cleanup import far_csf, off_brain, to_background
from .conform import ConformPlan, plan_conform
from .device import resolve_device
from .errors import QuicknatInputError
from .io import Volume
from .model import set_mc_dropout
from .qc import mc_dropout_passes
from .resample import bounding_box, covering_box, resample, sub_matrix
from .result import SegmentationResult
from .views import channel_view, get_view, slice_box, slices, with_context

log = logging.getLogger(__name__)

#: Slices whose maximum scaled intensity is below this are treated as empty (background).
EMPTY_SLICE = 0.02
#: Margin (voxels) around the head's bounding box in conformed space.
BOX_MARGIN = 4
#: A segmentation labelling less than this (mL) found no brain: a failure, not a result.
MIN_BRAIN_ML = 1.0


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
class GridInput:
    """One grid's share of a segmentation: its views, its conformed image, the box they run on
    and, for a grid coarser than the model's, the matrix from the finest grid's box voxels to
    this box's voxels."""

    views: list[str]
    image: torch.Tensor
    box: tuple[slice, ...]
    to_grid: np.ndarray | None = None
    covered: torch.Tensor | None = None  # how much of each finest-grid voxel the box covers (made once)


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
        flip: test-time left-right flip averaging; None (the default) takes the model's choice
            (``model.json``'s ``"flip"``, on when it does not say): the coronal and axial views
            also run on their slices mirrored left-right, and the mirrored prediction (sides
            swapped back) is averaged in; the sagittal view, which has no sides, runs once. About
            1.8x the network time (stage v14: 40.4 s against 22.2 s on a 256^3 scan, 2 cores); with
            that model +0.004 mean Dice on the real labelled scan (0.804 -> 0.808), +0.002 on
            held-out synthetic T1 and a median volume error of 7.9 % against 9.0 %
            (``bench/default_model_accuracy.py --variants flip``).
        clean: keep only the brain (on by default): labelled voxels outside the largest connected
            component of the labelled mask, after an opening that cuts thin bridges (see
            :func:`quicknat.cleanup.keep_brain_component`), become background. With the CSF limit below, on held-out
            synthetic whole heads it took the outside-brain share from 1.42 % to 0.99 %
            (``bench/csf_reach.py``); on the real labelled scan and MNI152 (skull-stripped) it
            changed no Dice (``bench/default_model_accuracy.py``).
        csf_reach_mm: CSF (the scheme's class named ``CSF``, if it has one) farther than this from
            every other labelled structure becomes background (:func:`quicknat.cleanup.limit_csf`);
            0 (or less) keeps all.
            The label maps' CSF is the subarachnoid space around the brain, but in some maps it
            also runs down the spinal canal, 20-80 mm from the brain, and a network
            trained on them calls dark head tissue (at the skull base, in the face) CSF: on
            held-out synthetic whole heads 94 % of the labels outside the brain were CSF, over a
            third of them 20 mm or more from it. At 6 mm (``bench/csf_reach.py``, the stage v9 model) the
            outside-brain share there fell from 2.85 % to 1.42 % and CSF Dice rose from 0.532 to
            0.547 (4 mm: 0.78 %, but CSF Dice 0.530); 93 % of the training maps' CSF lies within
            6 mm of another structure.

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
        flip: bool | None = None,
        clean: bool = True,
        csf_reach_mm: float = 6.0,
    ):
        self.model = load_model(model)
        self.progress = False  # tqdm bars over views and MC passes (segment_files sets it on a terminal)
        self.flip = self.model.flip if flip is None else flip
        self.clean = clean
        self.csf_reach_mm = csf_reach_mm
        self.paths = paths
        self.device = resolve_device(device)
        self.swap = torch.as_tensor(self.model.scheme.lr_swap_index(), device=self.device)  # for flip averaging
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
        whole = slices(image, name)  # (N, H, W), whole slices
        stack = whole[along]
        target = channel_view(acc, name)  # (N, C, h, w), shares acc's memory
        context = net.config.context
        if self.paths.skip_empty:  # a slice runs when it or a neighbour its network sees is not empty
            filled = (whole.amax(dim=(1, 2)) > EMPTY_SLICE).float()  # no copy of the strided view
            if context:
                filled = F.max_pool1d(filled[None, None], 2 * context + 1, stride=1, padding=context)[0, 0]
            nonempty = (filled[along] > 0).nonzero().flatten().tolist()
        else:
            nonempty = list(range(stack.shape[0]))
        empty = sorted(set(range(stack.shape[0])) - set(nonempty))
        if empty:
            target[empty, 0] += weight
        expand = self.expand[name]
        for i in range(0, len(nonempty), self.batch_size):
            idx = nonempty[i : i + self.batch_size]
            x = with_context(whole, [along.start + k for k in idx], context)
            x = x.to(self.device, non_blocking=True)
            if self.paths.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = net(x)[:, :, hs, ws]
                mirrored = None
                if self.flip and get_view(name).lateral_in_plane:  # slice rows run along the left-right axis
                    mirrored = net(x.flip(2)).flip(2)[:, :, hs, ws].index_select(1, self.swap)
            p = torch.softmax(logits.float(), dim=1)
            if mirrored is not None:
                p = 0.5 * (p + torch.softmax(mirrored.float(), dim=1))
            if expand is not None:
                p = p.index_select(1, expand)
            run = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == len(idx) else idx
            target[run] += weight * p.to(acc.dtype)  # a plain slice adds in place, no gather/scatter

    def _aggregate(self, grids: list[GridInput], shape: tuple[int, ...]) -> torch.Tensor:
        """The views' weighted probabilities on the model's (finest) grid's box of ``shape``: views
        on a coarser grid are aggregated there and resampled (trilinear) onto it."""
        acc = torch.zeros((self.scheme.num_classes, *shape), dtype=torch.float32, device=self.device)
        for g in grids:
            box_shape = tuple(b.stop - b.start for b in g.box)
            own = acc if g.to_grid is None else torch.zeros((self.scheme.num_classes, *box_shape),
                                                            dtype=torch.float32, device=self.device)
            for name in tqdm(g.views, desc="views", unit="view", leave=False, disable=not self.progress):
                self._view_pass(name, g.image, g.box, own, self.weights[name])
            if g.to_grid is not None:
                self._onto_finest(own, g, shape, sum(self.weights[v] for v in g.views), acc)
        # The sagittal expansion copies a merged pair's probability to both sides, so the sum
        # exceeds 1 there; renormalise (the argmax is unchanged).
        acc /= acc.sum(0, keepdim=True)
        return acc

    def _onto_finest(self, own: torch.Tensor, g: GridInput, shape: tuple[int, ...], weight: float,
                     acc: torch.Tensor) -> None:
        """Add probabilities ``own`` (summing to ``weight``) on coarse grid ``g``'s box into ``acc``
        on the finest grid's box of ``shape`` (trilinear); where the coarse box does not reach,
        its views say background."""
        acc += resample(own.cpu(), g.to_grid, shape, "bilinear").to(acc.device)
        if g.covered is None:  # the same for every view and MC pass
            g.covered = resample(torch.ones(own.shape[1:]), g.to_grid, shape, "bilinear").to(acc.device)
        acc[0] += weight * (1.0 - g.covered)

    def _grid_inputs(self, volume: Volume, plan: ConformPlan, image: torch.Tensor,
                     region: tuple[slice, ...]) -> list[GridInput]:
        """Each grid's conformed image and the box its views run on: the finest grid's is
        ``image`` and ``region``; a coarser grid's covers ``region``, with the matrix from the
        region's voxels to its box's."""
        names = list(self.model.grids.values())
        out = [GridInput(names[0], image, region)]
        for settings, views in list(self.model.grids.items())[1:]:
            coarse = plan_conform(volume, settings)
            to_coarse = np.linalg.inv(coarse.affine) @ plan.affine @ sub_matrix(np.eye(4), [r.start for r in region])
            start, stop = covering_box(to_coarse, [r.stop - r.start for r in region], coarse.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            out.append(GridInput(views, torch.from_numpy(coarse.image(volume.array)), box,
                                 sub_matrix(np.eye(4), -np.asarray(start)) @ to_coarse))
        return out

    def _whole_grids(self, scan: Volume | np.ndarray | torch.Tensor) -> tuple[tuple[int, ...], list[GridInput]]:
        """The finest grid's shape and every grid's input, each covering the whole finest grid:
        ``scan`` is a Volume (conformed to each grid) or, for a one-grid model, an image already
        conformed to it (scaled to [0, 1])."""
        if isinstance(scan, Volume):
            plan = plan_conform(scan, self.settings)
            image = torch.from_numpy(plan.image(scan.array))
            return tuple(image.shape), self._grid_inputs(scan, plan, image, tuple(slice(0, n) for n in image.shape))
        if len(self.model.grids) > 1:
            raise ValueError("the model's views run on several grids: pass the scan (a Volume), which is conformed "
                             "to each")
        image = torch.as_tensor(np.asarray(scan, dtype=np.float32))
        return tuple(image.shape), [GridInput(list(self.nets), image, tuple(slice(0, n) for n in image.shape))]

    @torch.inference_mode()
    def probabilities(self, scan: Volume | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) on the model's (finest) conformed grid, the aggregate of
        the views, without clean-ups or mapping back. ``scan``: see :meth:`view_probabilities`."""
        shape, grids = self._whole_grids(scan)
        for net in self.nets.values():
            set_mc_dropout(net, False)
        return self._aggregate(grids, shape)

    @torch.inference_mode()
    def view_probabilities(self, scan: Volume | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Each view's class probabilities (C, X, Y, Z) on the model's (finest) conformed grid,
        unweighted, as they enter the aggregate (a sagittal merged pair's probability is on both
        sides, unnormalised): :meth:`probabilities` is their weighted sum, normalised. ``scan`` is
        a :class:`~quicknat.io.Volume` (conformed to each view's grid; a view on a coarser grid is
        resampled onto the finest, background where it does not reach), or, for a model on one
        grid, an image already conformed to it. For choosing the view weights
        (``bench/view_weights.py``); it holds one volume of probabilities per view."""
        shape, grids = self._whole_grids(scan)
        out = {}
        for g in grids:
            for name in g.views:
                set_mc_dropout(self.nets[name], False)
                own = torch.zeros((self.scheme.num_classes, *(b.stop - b.start for b in g.box)),
                                  dtype=torch.float32, device=self.device)
                self._view_pass(name, g.image, g.box, own, 1.0)
                if g.to_grid is not None:
                    own, coarse = torch.zeros((self.scheme.num_classes, *shape), device=self.device), own
                    self._onto_finest(coarse, g, shape, 1.0, own)
                out[name] = own
        return out

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
            start, stop = head_box(conformed)
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
        grids = self._grid_inputs(volume, plan, image, region)
        shape = tuple(r.stop - r.start for r in region)
        if mc > 0:
            torch.manual_seed(seed)
            probs, qc = self._mc(grids, shape, passes)
        else:
            probs = self._aggregate(grids, shape)
        timings["network"] = time.perf_counter() - t

        t = time.perf_counter()
        probs_cpu = probs.float().cpu()
        classes = probs_cpu.argmax(0).numpy()  # once: both clean-ups read it, the output is it
        drop = far_csf(classes, self.scheme, self.settings.voxel_size, self.csf_reach_mm)
        classes[drop] = 0
        if self.clean:
            drop |= off_brain(classes, self.settings.voxel_size)
        to_background(probs_cpu, drop)
        classes[drop] = 0
        cls_crop = classes.astype(np.uint8)
        conformed_classes = np.zeros(plan.shape, dtype=np.uint8)
        conformed_classes[region] = cls_crop
        fast = self.paths.fast_resample
        native = sub.probs_to_native(probs_cpu, argmax_only=True, fast=fast)
        labelled_ml = np.count_nonzero(native) * volume.voxel_volume / 1000.0
        if labelled_ml < MIN_BRAIN_ML:
            raise QuicknatInputError(volume.path, f"the segmentation found almost no brain ({labelled_ml:.2f} mL "
                                                  "labelled); is this a T1-weighted head scan?")
        post = sub.probs_to_native(probs_cpu, argmax_only=False, fast=fast) if posteriors else None
        unc = None
        if uncertainty:
            ent = -(probs_cpu.clamp_min(1e-8).log() * probs_cpu).sum(0)
            unc = sub.scalar_to_native(ent, fast)
        timings["back_to_native"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(
            volume, self.scheme, native, plan, conformed, conformed_classes, post, unc, qc, timings
        )

    def _mc(self, grids: list[GridInput], shape: tuple[int, ...], passes: int) -> tuple[torch.Tensor, list[dict]]:
        return mc_dropout_passes(lambda: self._aggregate(grids, shape), passes, self.scheme,
                                 self.settings.voxel_size**3, progress=self.progress)


def head_box(conformed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = bounding_box(conformed > EMPTY_SLICE, BOX_MARGIN)
    return box if box is not None else (np.zeros(3, dtype=int), np.array(conformed.shape))
