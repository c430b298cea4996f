"""SynthSeg-style training data: T1-like and random-contrast images generated from label maps.

For each training slice (Billot et al. 2023; defaults from the published SynthSeg generator):

1. **Spatial**: a random affine (rotation ±15°, scaling ±20 %, shearing ±0.012, translation
   ±20 mm, left-right flip with lateral labels swapped) and a smooth non-linear deformation
   (a random displacement field on a coarse 5³ grid, std 4 voxels, interpolated).
2. **Slice position**: uniform over the brain's extent along the view's axis (plus a margin),
   so the poles, the vertex and the bottom of the cerebellum are trained on as often as the
   centre; a share ``head_slices`` of slices is drawn anywhere in the head instead, kept even
   when they hold no brain, so the network learns that scalp, skull, eyes and neck are
   background (``quicknat segment`` runs every slice that crosses the head).
3. **Intensities**, per sample one of two modes:

   * *T1* (share ``1 - random_share``): with SynthSeg's T1 priors (``priors``: a folder holding
     SynthSeg's ``generation_labels.npy``, ``generation_classes_contrast_specific.npy``,
     ``prior_means_t1.npy`` and ``prior_stds_t1.npy``), each intensity class (for example
     putamen, pallidum, thalamus, cortex, each non-brain head tissue) draws its own mean from
     ``N(means[0, c], means[1, c])`` and its own std from ``N(stds[0, c], stds[1, c])``, as
     SynthSeg does. Without a priors folder, coarse built-in T1 ranges are used (WM > deep
     grey > cortex > CSF), each structure drawn on its own within its range.
   * *random contrast*: per structure (a left/right pair shares one) mean ~ U(25, 225) and
     std ~ U(5, 25); each non-brain head tissue its own.

   Optionally (``cortex_gradient``) cortex is brighter near its white matter, as the deeper,
   more myelinated layers of real cortex are: a share of the WM - cortex contrast that decays
   with the voxel's distance to white matter.

   Non-brain head tissues are present in all samples but a share ``strip_prob`` (skull
   removed: they become background, zero or background-like noise) and are always labelled
   background.
4. **Partial volume and soft targets**: on a conformed grid coarser than the label maps
   (``quicknat segment`` at 2 mm), every conformed voxel is the average of ``k³`` sub-samples
   at the label maps' resolution (``k`` = voxel size in mm, at most 3): the image averages their
   intensities and the target is their class histogram (a probability per class), so a network
   at 2 mm is trained towards the posteriors that best reproduce the 1 mm labels.
5. **Bias field**: exp of a smooth random field (std ~ U(0, 0.7) on a coarse 4³ grid).
6. **Resolution**: with probability ``thick_prob``, a thick-slice acquisition (intensities
   averaged over planes across up to ``max_thickness`` mm along the slice normal, plus in-plane
   blur); otherwise a mild blur.
7. **Noise**, then **gamma** (log-normal exponent), and robust scaling to [0, 1] as in
   :func:`quicknat.conform.intensity_window` (percentiles over a sparse 3D sample of the same
   deformed volume).

Slices are generated directly on the conformed grid of a view: the random 3D transform is only
evaluated at the points of the requested slice, so one sample costs a few gathers of a 2D set
of points. All of it runs on torch, on CPU or GPU. For a 2.5D network (``context`` > 0) the
neighbouring slices are rendered from the same random volume (same geometry, intensities, bias
field, blur, noise level, window and gamma) as further image channels; the target is the middle
slice's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..conform import ConformSettings, intensity_window, target_rotation
from ..labels import LabelScheme, compact_labels
from ..resample import bounding_box
from ..views import get_view
from .intensity import T1Priors, cortex_depth, cortex_shift, depth_decay, sample_intensities
from .synth_config import SynthConfig
from .synth_fields import blur2d, sample_coarse

__all__ = ["LabelMapSynth", "SynthConfig"]


class LabelMapSynth:
    """Generates (image slice, class target) pairs from whole-head label maps.

    Args:
        label_maps: list of (label IDs array on a 1 mm grid, its affine).
        scheme: the label scheme; IDs outside it become background in the targets.
        settings: the conformed grid the slices are generated on (as ``quicknat segment`` sees).
        config: the generator's settings.
    """

    def __init__(self, label_maps, scheme: LabelScheme, settings: ConformSettings | None = None,
                 config: SynthConfig | None = None, device: str | torch.device = "cpu"):
        self.scheme = scheme
        self.settings = settings or ConformSettings()
        self.cfg = config or SynthConfig()
        self.device = torch.device(device)
        self.priors = T1Priors.load(self.cfg.priors) if self.cfg.priors else None
        brain_ids = {i for c in scheme.classes[1:] for i in c.source_ids}
        self.maps = [self._prepare_map(arr, affine, brain_ids) for arr, affine in label_maps]
        self.swap = torch.from_numpy(scheme.lr_swap_index()).to(self.device)
        merged = scheme.lr_merge_index()
        # intensity group of a brain label in random-contrast mode (left/right partners share one)
        self.groups = {i: int(merged[k]) for k, c in enumerate(scheme.classes) for i in c.source_ids}
        label_vox = min(float(np.linalg.norm(m["affine"][:3, :3], axis=0).min()) for m in self.maps) \
            if self.maps else 1.0
        k = int(round(self.settings.voxel_size / label_vox)) if self.cfg.soft else 1
        self.sub = max(1, min(3, k))

    def _prepare_map(self, arr, affine, brain_ids) -> dict[str, Any]:
        # C order once: nibabel's arrays are Fortran-ordered, and every flat view below would copy
        ids = np.ascontiguousarray(np.rint(np.asarray(arr)), dtype=np.int64)
        uniq, inv = compact_labels(ids)
        classes, _ = self.scheme.encode(uniq)
        brain = np.isin(uniq, list(brain_ids))
        affine = np.asarray(affine, dtype=np.float64)
        brain_box = bounding_box((classes > 0)[inv])
        head_box = bounding_box(ids > 0)
        if brain_box is None:
            brain_box = head_box if head_box is not None else (np.zeros(3), np.array(ids.shape))
        if head_box is None:
            head_box = brain_box
        centre_vox = (brain_box[0] + brain_box[1] - 1) / 2.0
        centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
        unit = target_rotation(self.settings) / self.settings.voxel_size  # conformed axes, unit length

        def extent(box) -> np.ndarray:  # (2, 3): min/max offset from the centre along conformed axes, mm
            edges = np.stack([box[0] - 0.5, box[1] - 0.5])  # voxel edges (stop is exclusive)
            pts = np.array([[edges[(n >> a) & 1][a] for a in range(3)] for n in range(8)])
            world = pts @ affine[:3, :3].T + affine[:3, 3]
            local = (world - centre) @ unit
            return np.stack([local.min(0), local.max(0)])

        depth = None
        if self.cfg.cortex_gradient > 0:  # cortex depth below its white surface, per label-map voxel
            zooms = np.linalg.norm(affine[:3, :3], axis=0)
            depth = torch.from_numpy(cortex_depth(ids, zooms).reshape(-1)).to(self.device)
        return {
            "ids": uniq,
            "flat": torch.from_numpy(inv.reshape(-1).astype(np.int16)).to(self.device),
            "depth": depth,
            "shape": ids.shape,
            "classes": torch.from_numpy(classes.astype(np.int64)).to(self.device),
            "brain": torch.from_numpy(brain),
            "affine": affine,
            "centre": centre,
            "brain_extent": extent(brain_box),
            "head_extent": extent(head_box),
        }

    # -- geometry ------------------------------------------------------------------------
    def _random_affine(self, g: torch.Generator) -> np.ndarray:
        c = self.cfg

        def u(lo, hi):
            return float(torch.empty(1).uniform_(lo, hi, generator=g))

        ax, ay, az = (math.radians(u(-c.rotation, c.rotation)) for _ in range(3))
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        scale = np.diag([1 + u(-c.scaling, c.scaling) for _ in range(3)])
        shear = np.eye(3) + np.array([[0, u(-c.shearing, c.shearing), u(-c.shearing, c.shearing)],
                                      [u(-c.shearing, c.shearing), 0, u(-c.shearing, c.shearing)],
                                      [u(-c.shearing, c.shearing), u(-c.shearing, c.shearing), 0]])
        m = np.eye(4)
        m[:3, :3] = rz @ ry @ rx @ scale @ shear
        m[:3, 3] = [u(-c.translation, c.translation) for _ in range(3)]
        return m

    def _voxel_map(self, lm: dict, g: torch.Generator) -> tuple[np.ndarray, bool]:
        """Conformed voxel -> label-map voxel through a random world transform about the brain's
        centre (which lands on the conformed grid's centre); and whether it flips left-right."""
        shape = self.settings.shape
        rot = target_rotation(self.settings)
        out_aff = np.eye(4)
        out_aff[:3, :3] = rot
        out_aff[:3, 3] = lm["centre"] - out_aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
        shift = np.eye(4)
        shift[:3, 3] = -lm["centre"]
        warp = np.linalg.inv(shift) @ self._random_affine(g) @ shift
        flip = float(torch.rand(1, generator=g)) < self.cfg.flip
        if flip:
            warp = np.linalg.inv(shift) @ np.diag([-1.0, 1, 1, 1]) @ shift @ warp
        return np.linalg.inv(lm["affine"]) @ warp @ out_aff, flip

    def _slice_position(self, lm: dict, axis: int, g: torch.Generator) -> tuple[float, bool]:
        """A random slice index along ``axis``: over the brain's extent (5 % margin), or with
        probability ``head_slices`` anywhere over the head's; and whether it is a head slice."""
        n = self.settings.shape[axis]
        head = float(torch.rand(1, generator=g)) < self.cfg.head_slices
        ext = lm["head_extent" if head else "brain_extent"][:, axis] / self.settings.voxel_size
        margin = 0.0 if head else 0.05 * (ext[1] - ext[0])
        lo = max(0.0, (n - 1) / 2.0 + ext[0] - margin)
        hi = min(n - 1.0, (n - 1) / 2.0 + ext[1] + margin)
        return round(float(torch.empty(1).uniform_(lo, max(lo, hi), generator=g))), head

    # -- one sample ----------------------------------------------------------------------
    def sample(self, view: str, seed: int, slice_index: int | None = None, map_index: int | None = None,
               min_foreground: float = 0.002, context: int = 0, crop: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One (image (2 * context + 1, H, W) float32 in [0, 1], target (C, H, W) float32) pair for
        ``view``: the slice and its ``context`` neighbours on each side, from the same random
        volume (a 2.5D network's input, as :func:`quicknat.views.with_context` builds it at
        inference), and the target of the middle slice.

        The target holds a probability per class of the full scheme (one-hot when the grid is
        not coarser than the maps). A slice placed in the brain with less than
        ``min_foreground`` foreground is redrawn (up to 5 times, seeds derived from ``seed``),
        as training on real data drops such slices; head slices are kept as they are.

        With ``crop`` (pixels, 0 for the whole slice) only a ``crop`` x ``crop`` window is
        rendered: centred on the slice's labelled region (found on one label sample per pixel),
        moved by up to a quarter of the window, kept inside the slice. Without noise and blur it
        is that window of the whole slice; rendering it costs about its share of the pixels.
        """
        for attempt in range(5):
            img, target, head = self._sample(view, seed + attempt * 7919, slice_index, map_index, context, crop)
            if slice_index is not None or head or (1.0 - target[0]).mean() >= min_foreground:
                break
        return img, target

    def _sample(self, view: str, seed: int, slice_index: int | None, map_index: int | None, context: int,
                crop: int = 0):
        g = torch.Generator().manual_seed(int(seed))
        c = self.cfg
        axis = get_view(view).axis
        lm = self.maps[int(torch.randint(len(self.maps), (1,), generator=g)) if map_index is None else map_index]
        m, flip = self._voxel_map(lm, g)
        head = False
        if slice_index is None:
            slice_index, head = self._slice_position(lm, axis, g)
        thick = float(torch.rand(1, generator=g)) < c.thick_prob
        thickness = float(torch.empty(1).uniform_(2.0, c.max_thickness, generator=g)) if thick else 0.0
        field = torch.randn((1, 3, c.deform_grid, c.deform_grid, c.deform_grid), generator=g) * c.deform_std
        bias_std = float(torch.rand(1, generator=g)) * c.bias_std
        bias = torch.randn((1, 1, c.bias_grid, c.bias_grid, c.bias_grid), generator=g) * bias_std
        means, stds = sample_intensities(lm["ids"], lm["brain"], self.groups, self.cfg, self.priors, g)
        means, stds = means.to(self.device), stds.to(self.device)
        sigma = float(torch.rand(1, generator=g)) * (c.blur_max + (1.0 if thick else 0.0))
        noise_level = float(torch.empty(1).uniform_(0, c.noise_max, generator=g))
        lo, hi = self._window(lm, m, means, stds, g)
        gamma = math.exp(float(torch.randn(1, generator=g)) * c.gamma_std)
        shift = None
        if c.cortex_gradient > 0:
            shift = cortex_shift(lm["ids"], means, float(torch.rand(1, generator=g)) * c.cortex_gradient)

        k = self.sub
        sub = (torch.arange(k, dtype=torch.float32) + 0.5) / k - 0.5  # sub-voxel offsets (conformed voxels)
        window = self._crop_window(lm, m, field, slice_index, axis, crop, g) if crop else None
        hw = [n for _, n in window] if window else [self.settings.shape[a] for a in range(3) if a != axis]
        # image sub-samples: k x k in plane; through plane k, or the slice thickness when thick
        depth = torch.linspace(-0.5, 0.5, 5) * thickness / self.settings.voxel_size if thick else sub
        images, target = [], None
        for d in range(-context, context + 1):
            index = slice_index + d
            norm = self._normalised(self._points(index, axis, torch.zeros(1), torch.zeros(1), window)[0])
            disp = sample_coarse(field, norm).T  # the deformation in label voxels, once per pixel
            pts = self._points(index, axis, sub, depth, window)
            voxels = self._voxels(lm, m, disp, pts)
            img_lab = self._gather(lm, "flat", voxels)  # (n_sub, H*W)
            if d == 0:  # the target: the class histogram of the k^3 label sub-samples of each pixel
                lab = img_lab if not thick else self._lookup(lm, m, disp, self._points(index, axis, sub, sub, window))
                target = self._histogram(lm["classes"][lab], flip)
            img = means[img_lab] + stds[img_lab] * torch.randn(img_lab.shape, generator=g).to(self.device)
            if shift is not None:  # deep cortex brighter (towards its white matter)
                img = img + shift[img_lab] * depth_decay(self._gather(lm, "depth", voxels), c.cortex_gradient_mm)
            img = img.mean(0)
            img = (img * torch.exp(sample_coarse(bias, norm)[0]).to(self.device)).view(*hw)
            img = blur2d(img, sigma) + torch.randn(hw, generator=g).to(self.device) * noise_level
            images.append(((img.clamp_min(0) - lo) / (hi - lo)).clamp(0, 1).pow(gamma))
        img = torch.stack(images)
        return img.float().cpu().numpy(), target.view(-1, *hw).cpu().numpy(), head

    def _histogram(self, classes: torch.Tensor, flip: bool) -> torch.Tensor:
        """(n_sub, P) class indices -> (C, P) share of each class (a soft target)."""
        if flip:
            classes = self.swap[classes]
        target = torch.zeros((self.scheme.num_classes, classes.shape[1]), dtype=torch.float32, device=self.device)
        return target.scatter_add_(0, classes, torch.full(classes.shape, 1.0 / classes.shape[0], device=self.device))

    def _crop_window(self, lm: dict, m: np.ndarray, field: torch.Tensor, index: int, axis: int, crop: int,
                     g: torch.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, size) along the two in-plane axes of a ``crop`` window around the slice's
        labelled region (one label sample per pixel), moved by up to a quarter of the window."""
        pts = self._points(index, axis, torch.zeros(1), torch.zeros(1))
        lab = self._lookup(lm, m, sample_coarse(field, self._normalised(pts[0])).T, pts)
        hw = [self.settings.shape[a] for a in range(3) if a != axis]
        fg = (lm["classes"][lab[0]] > 0).view(*hw).cpu().numpy()
        window = []
        for a, n in enumerate(hw):
            jitter = float(torch.empty(1).uniform_(-crop / 4, crop / 4, generator=g))
            hits = np.flatnonzero(fg.any(axis=1 - a))
            centre = (hits[0] + hits[-1]) / 2.0 if hits.size else (n - 1) / 2.0
            window.append((int(min(max(round(centre + jitter - crop / 2), 0), n - crop)), crop) if crop < n else (0, n))
        return window[0], window[1]

    def _points(self, index: float, axis: int, in_plane_offsets: torch.Tensor, depth_offsets: torch.Tensor,
                window: tuple[tuple[int, int], tuple[int, int]] | None = None):
        """Conformed voxel coordinates (n_sub, H*W, 3) of a slice's sub-samples (of the in-plane
        ``window``'s pixels, (start, size) per in-plane axis, when given)."""
        shape = self.settings.shape
        in_plane = [a for a in range(3) if a != axis]
        ranges = dict(zip(in_plane, window or [(0, shape[a]) for a in in_plane]))
        axes = [torch.tensor([float(index)]) if a == axis
                else torch.arange(ranges[a][0], ranges[a][0] + ranges[a][1], dtype=torch.float32) for a in range(3)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        offs = []
        for d in depth_offsets.tolist():
            for o1 in in_plane_offsets.tolist():
                for o2 in in_plane_offsets.tolist():
                    o = [0.0, 0.0, 0.0]
                    o[axis], o[in_plane[0]], o[in_plane[1]] = d, o1, o2
                    offs.append(o)
        return grid[None] + torch.tensor(offs)[:, None]

    def _normalised(self, pts: torch.Tensor) -> torch.Tensor:
        size = torch.tensor([s - 1 for s in self.settings.shape], dtype=torch.float32)
        return (pts.reshape(-1, 3) / size) * 2 - 1

    def _lookup(self, lm: dict, m: np.ndarray, disp: torch.Tensor | None, pts: torch.Tensor) -> torch.Tensor:
        """Compact label indices at conformed points (n, P, 3) -> (n, P) (see :meth:`_voxels`)."""
        return self._gather(lm, "flat", self._voxels(lm, m, disp, pts))

    def _voxels(self, lm: dict, m: np.ndarray, disp: torch.Tensor | None, pts: torch.Tensor):
        """Label-map voxels at conformed points (n, P, 3): the affine ``m``, plus the deformation
        ``disp`` (P, 3) in label voxels, nearest voxel, as (flat index (n, P), outside the map)."""
        vox = pts @ torch.from_numpy(m[:3, :3].T).float() + torch.from_numpy(m[:3, 3]).float()
        if disp is not None:
            vox = vox + disp
        # rounded and bounds-checked in float, indexed in int32: about twice as fast as int64
        vox = torch.round(vox)
        hi = torch.tensor([s - 1 for s in lm["shape"]], dtype=torch.float32)
        inside = ((vox >= 0) & (vox <= hi)).all(-1)
        idx = torch.minimum(vox.clamp_min(0), hi).to(torch.int32)
        _, d1, d2 = lm["shape"]
        lin = (idx[..., 0] * d1 + idx[..., 1]) * d2 + idx[..., 2]
        return lin.to(self.device), ~inside.to(self.device)

    def _gather(self, lm: dict, key: str, voxels) -> torch.Tensor:
        """A per-voxel array of the map (``flat`` compact labels, ``depth`` cortex depths) at
        :meth:`_voxels`; 0 outside the map."""
        lin, outside = voxels
        return lm[key].index_select(0, lin.reshape(-1)).view(lin.shape).masked_fill(outside, 0).long()

    def _window(self, lm, m, means, stds, g) -> tuple[float, float]:
        """The robust intensity window of the whole (deformation-free, unbiased) volume,
        estimated on a sparse 24³ sample, as :func:`quicknat.conform.intensity_window`."""
        idx = torch.stack(torch.meshgrid(*[torch.linspace(0, s - 1, 24) for s in self.settings.shape],
                                         indexing="ij"), -1).reshape(1, -1, 3)
        lab = self._lookup(lm, m, None, idx)[0]
        vals = means[lab] + stds[lab] * torch.randn(lab.shape, generator=g).to(self.device)
        return intensity_window(vals.clamp_min(0).cpu().numpy(), self.settings.percentiles)

    def volume(self, seed: int, map_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A whole conformed volume (image, classes) with one random draw for the whole volume
        (for validation on held-out maps); classes are the targets' most likely class."""
        shape = self.settings.shape
        spec = get_view("coronal")
        img = np.zeros(shape, np.float32)
        cls = np.zeros(shape, np.uint8)
        for k in range(shape[spec.axis]):
            i, t = self.sample("coronal", seed, slice_index=k, map_index=map_index)
            spec.slice_of(img, k)[...] = i[0]
            spec.slice_of(cls, k)[...] = t.argmax(0)
        return img, cls

