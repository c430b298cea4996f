"""SynthSeg-style training data: T1-like and random-contrast images generated from label maps.

For each sample (Billot et al. 2023; defaults from the published SynthSeg generator):

1. **Spatial**: a random affine (rotation ±15°, scaling ±20 %, shearing ±0.012, translation
   ±20 mm, left-right flip with lateral labels swapped) and a smooth non-linear deformation
   (a random displacement field on a coarse 5³ grid, std 4 voxels, interpolated).
2. **Intensities**: per label group (a structure and its left/right partner share one group)
   a Gaussian with mean ~ U(25, 225) and std ~ U(5, 25); in a share of samples (``t1_share``)
   the means follow T1 ordering instead (WM > deep GM > cortex > CSF) so T1 accuracy
   converges fast. Non-brain head labels get their own random groups.
3. **Skull removal** with probability ``strip_prob``: non-brain labels become background, so
   both whole-head and skull-stripped inputs are covered.
4. **Bias field**: exp of a smooth random field (std 0.7 on a coarse 4³ grid).
5. **Resolution**: with probability ``thick_prob``, a thick-slice acquisition: intensities are
   averaged over several planes along the slice normal (up to ``max_thickness`` mm), plus
   in-plane Gaussian blur; otherwise a mild blur.
6. **Noise**, then **gamma** (log-normal exponent), and robust scaling to [0, 1] as in
   :mod:`quicknat.conform` (percentiles over a sparse 3D sample of the same deformed volume).

Slices are generated directly on the conformed grid of a view: the random 3D transform is only
evaluated at the points of the requested slice (and a few neighbouring planes for thick slices),
so one sample costs a few 2D ``grid_sample`` calls. All of it runs on torch, on CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..conform import ConformSettings, bounding_box, target_rotation
from ..labels import LabelScheme
from ..views import get_view

# label ID groups that get T1-like intensities (mean ranges) in T1 samples
_T1_RANGES = {
    "wm": ((2, 41, 7, 46, 16, 28, 60, 77, 85), (95, 140)),
    "deep": ((10, 49, 9, 48, 13, 52), (80, 105)),
    "gm": ((3, 42, 8, 47, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58, 80, 136, 137, 163, 164), (55, 85)),
    "csf": ((4, 43, 5, 44, 14, 15, 24, 72, 31, 63, 30, 62), (10, 45)),
}


@dataclass(frozen=True)
class SynthConfig:
    rotation: float = 15.0
    scaling: float = 0.2
    shearing: float = 0.012
    translation: float = 20.0
    flip: float = 0.5
    deform_std: float = 4.0
    deform_grid: int = 5
    mean_range: tuple[float, float] = (25.0, 225.0)
    std_range: tuple[float, float] = (5.0, 25.0)
    t1_share: float = 0.5
    strip_prob: float = 0.4
    bias_std: float = 0.7
    bias_grid: int = 4
    thick_prob: float = 0.3
    max_thickness: float = 6.0
    blur_max: float = 1.0
    noise_max: float = 12.0
    gamma_std: float = 0.3


class LabelMapSynth:
    """Generates (image slice, class slice) pairs from whole-head label maps.

    Args:
        label_maps: list of (label IDs array on a 1 mm grid, its affine).
        scheme: the label scheme; IDs outside it become background in the class map.
        settings: the conformed grid the slices are generated on (as ``quicknat segment`` sees).
    """

    def __init__(self, label_maps, scheme: LabelScheme, settings: ConformSettings | None = None,
                 config: SynthConfig | None = None, device: str | torch.device = "cpu"):
        self.scheme = scheme
        self.settings = settings or ConformSettings()
        self.cfg = config or SynthConfig()
        self.device = torch.device(device)
        self.maps = []
        brain_ids = {i for c in scheme.classes[1:] for i in c.source_ids}
        for arr, affine in label_maps:
            ids = np.rint(np.asarray(arr)).astype(np.int64)
            uniq, inv = np.unique(ids, return_inverse=True)
            compact = torch.from_numpy(inv.reshape(ids.shape).astype(np.int16)).to(self.device)
            classes, _ = scheme.encode(uniq)
            box = bounding_box(np.isin(ids, [u for u, c in zip(uniq, classes) if c > 0]))
            centre = (np.array(ids.shape) - 1) / 2.0 if box is None else (box[0] + box[1] - 1) / 2.0
            self.maps.append({
                "centre": centre,  # the brain's bounding-box centre (voxels): slices are placed on it
                "compact": compact.float()[None, None],  # for nearest grid_sample
                "ids": uniq,
                "classes": torch.from_numpy(classes.astype(np.int64)).to(self.device),
                "brain": torch.from_numpy(np.isin(uniq, list(brain_ids))).to(self.device),
                "affine": np.asarray(affine, dtype=np.float64),
                "shape": ids.shape,
            })
        self.swap = torch.from_numpy(scheme.lr_swap_index()).to(self.device)
        self.groups = self._groups()

    def _groups(self) -> dict[int, int]:
        """Label ID -> intensity group (left/right partners share one)."""
        merged = self.scheme.lr_merge_index()
        return {i: int(merged[k]) for k, c in enumerate(self.scheme.classes) for i in c.source_ids}

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

    def sample(self, view: str, seed: int, slice_index: int | None = None, map_index: int | None = None,
               min_foreground: float = 0.002):
        """One (image (H, W) float32 in [0, 1], classes (H, W) int64) pair for ``view``.

        A randomly placed slice with less than ``min_foreground`` labelled pixels is redrawn (up
        to 5 times, seeds derived from ``seed``), as training on real data drops such slices.
        """
        for attempt in range(5):
            img, cls = self._sample(view, seed + attempt * 7919, slice_index, map_index)
            if slice_index is not None or (cls > 0).mean() >= min_foreground:
                break
        return img, cls

    def _sample(self, view: str, seed: int, slice_index: int | None, map_index: int | None):
        g = torch.Generator().manual_seed(int(seed))
        c = self.cfg
        spec = get_view(view)
        lm = self.maps[int(torch.randint(len(self.maps), (1,), generator=g)) if map_index is None else map_index]
        shape = self.settings.shape
        # world -> label-map voxel, through a random world transform about the map's centre
        rot = target_rotation(self.settings)
        centre = lm["affine"][:3, :3] @ lm["centre"] + lm["affine"][:3, 3]
        out_aff = np.eye(4)
        out_aff[:3, :3] = rot
        out_aff[:3, 3] = centre - rot @ ((np.array(shape) - 1) / 2.0)
        shift = np.eye(4)
        shift[:3, 3] = -centre
        warp = np.linalg.inv(shift) @ self._random_affine(g) @ shift
        flip = float(torch.rand(1, generator=g)) < c.flip
        if flip:
            mirror = np.diag([-1.0, 1, 1, 1])
            warp = np.linalg.inv(shift) @ mirror @ shift @ warp
        m = np.linalg.inv(lm["affine"]) @ warp @ out_aff  # conformed voxel -> label voxel

        axis = spec.axis
        if slice_index is None:
            lo, hi = int(0.3 * shape[axis]), int(0.7 * shape[axis])  # around the brain's centre
            slice_index = int(torch.randint(lo, hi, (1,), generator=g))
        thick = float(torch.rand(1, generator=g)) < c.thick_prob
        thickness = float(torch.empty(1).uniform_(2.0, c.max_thickness, generator=g)) if thick else 0.0
        offsets = np.linspace(-thickness / 2, thickness / 2, 5) if thick else np.array([0.0])

        # deformation field on a coarse grid over the conformed volume, in label voxels
        field = torch.randn((1, 3, c.deform_grid, c.deform_grid, c.deform_grid), generator=g) * c.deform_std
        bias = torch.randn((1, 1, c.bias_grid, c.bias_grid, c.bias_grid), generator=g) * c.bias_std

        def points(index_offset: float):
            ii = [torch.arange(s, dtype=torch.float64) for s in shape]
            ii[axis] = torch.tensor([slice_index + index_offset], dtype=torch.float64)
            grid = torch.stack(torch.meshgrid(*ii, indexing="ij"), dim=-1).reshape(-1, 3)  # conformed voxels
            norm = (grid / torch.tensor([s - 1 for s in shape], dtype=torch.float64)) * 2 - 1
            return grid, norm

        def sample_coarse(vol: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
            gg = norm[:, [2, 1, 0]].float().view(1, -1, 1, 1, 3)
            return F.grid_sample(vol, gg, mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0, 0]

        def label_at(grid: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
            vox = grid @ torch.from_numpy(m[:3, :3].T) + torch.from_numpy(m[:3, 3])
            vox = vox + sample_coarse(field, norm).T.double()
            size = torch.tensor([s - 1 for s in lm["shape"]], dtype=torch.float64)
            gg = ((vox / size) * 2 - 1)[:, [2, 1, 0]].float().view(1, -1, 1, 1, 3).to(self.device)
            out = F.grid_sample(lm["compact"], gg, mode="nearest", padding_mode="zeros", align_corners=True)
            return out.view(-1).long()

        # intensities per label group
        nlab = len(lm["ids"])
        t1 = float(torch.rand(1, generator=g)) < c.t1_share
        gmeans = torch.empty(64).uniform_(*c.mean_range, generator=g)
        gstds = torch.empty(64).uniform_(*c.std_range, generator=g)
        means = torch.empty(nlab)
        stds = torch.empty(nlab)
        for n, lab in enumerate(lm["ids"].tolist()):
            grp = self.groups.get(lab, 33 + (lab % 31))
            means[n], stds[n] = gmeans[grp], gstds[grp]
            if t1:
                for _, (ids, (lo, hi)) in _T1_RANGES.items():
                    if lab in ids:
                        gen = torch.Generator().manual_seed(int(seed) * 7 + hash(ids) % 1000)
                        means[n] = float(torch.empty(1).uniform_(lo, hi, generator=gen))
                        stds[n] = float(torch.empty(1).uniform_(3, 10, generator=gen))
        means[0] = 0.0 if float(torch.rand(1, generator=g)) < 0.8 else means[0] * 0.2
        strip = float(torch.rand(1, generator=g)) < c.strip_prob
        if strip:
            means[~lm["brain"].cpu()] = 0.0
            stds[~lm["brain"].cpu()] = 0.0
        means, stds = means.to(self.device), stds.to(self.device)

        planes = []
        classes = None
        for off in offsets:
            grid, norm = points(float(off))
            lab = label_at(grid, norm)
            if off == offsets[len(offsets) // 2]:
                classes = lm["classes"][lab]
            noise = torch.randn(lab.shape, generator=g).to(self.device)
            planes.append(means[lab] + stds[lab] * noise)
        img = torch.stack(planes).mean(0)
        grid, norm = points(0.0)
        img = img * torch.exp(sample_coarse(bias, norm)[0]).to(self.device)
        hw = [s for a, s in enumerate(shape) if a != axis]
        img = img.view(*hw)
        classes = classes.view(*hw)
        if flip:
            classes = self.swap[classes]
        sigma = float(torch.rand(1, generator=g)) * (c.blur_max + (1.0 if thick else 0.0))
        img = _blur2d(img, sigma)
        img = img + torch.randn(img.shape, generator=g).to(self.device) * float(
            torch.empty(1).uniform_(0, c.noise_max, generator=g))
        img = img.clamp_min(0)
        # robust window from a sparse 3D sample of the same (deformed, unbiased) volume
        lo, hi = self._window(m, means, stds, lm, g)
        img = ((img - lo) / (hi - lo)).clamp(0, 1)
        gamma = math.exp(float(torch.randn(1, generator=g)) * c.gamma_std)
        img = img.pow(gamma)
        return img.float().cpu().numpy(), classes.cpu().numpy()

    def _window(self, m, means, stds, lm, g) -> tuple[float, float]:
        idx = torch.stack(torch.meshgrid(*[torch.linspace(0, s - 1, 24) for s in self.settings.shape], indexing="ij"),
                          -1).reshape(-1, 3).double()
        vox = idx @ torch.from_numpy(m[:3, :3].T) + torch.from_numpy(m[:3, 3])
        size = torch.tensor([s - 1 for s in lm["shape"]], dtype=torch.float64)
        gg = ((vox / size) * 2 - 1)[:, [2, 1, 0]].float().view(1, -1, 1, 1, 3).to(self.device)
        lab = F.grid_sample(lm["compact"], gg, mode="nearest", padding_mode="zeros", align_corners=True).view(-1).long()
        vals = means[lab] + stds[lab] * torch.randn(lab.shape, generator=g).to(self.device)
        vals = vals.clamp_min(0).cpu().numpy()
        lo = float(np.percentile(vals, self.settings.percentiles[0]))
        above = vals[vals > lo]
        hi = float(np.percentile(above, self.settings.percentiles[1])) if above.size else lo + 1
        return lo, max(hi, lo + 1e-3)

    def volume(self, seed: int, map_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A whole conformed volume (image, classes), coronal slice by coronal slice, with one
        random draw for the whole volume (for validation on held-out maps)."""
        shape = self.settings.shape
        spec = get_view("coronal")
        img = np.zeros(shape, np.float32)
        cls = np.zeros(shape, np.uint8)
        for k in range(shape[spec.axis]):
            i, c = self.sample("coronal", seed, slice_index=k, map_index=map_index)
            img[:, :, k], cls[:, :, k] = i, c
        return img, cls


def _blur2d(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return img
    r = int(math.ceil(2.5 * sigma))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    t = img[None, None]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return t[0, 0]


class SynthSliceDataset(torch.utils.data.Dataset):
    """Synthetic training slices of one view, seeded by (seed, epoch, index).

    Items match :class:`~quicknat.data.slices.SliceDataset`: image (1, H, W), label (H, W) in
    the view's scheme, and QuickNAT's weight map. ``crop`` takes a random window of that size
    centred on a random foreground pixel (1 mm resolution kept, a fraction of the cost).
    """

    def __init__(self, synth: LabelMapSynth, view: str, class_weights: np.ndarray, edge_weight: float,
                 length: int, seed: int = 0, crop: int | None = None):
        from .slices import weight_map

        self._weight_map = weight_map
        self.synth = synth
        self.spec = get_view(view)
        full = synth.scheme
        self.merge = full.lr_merge_index() if self.spec.merge_lr else np.arange(full.num_classes)
        self.class_weights = np.asarray(class_weights, dtype=np.float32)
        self.edge_weight = edge_weight
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.crop = crop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = (self.seed * 1_000_003 + self.epoch * 100_003 + i) % (2**31)
        img, cls = self.synth.sample(self.spec.name, s)
        cls = self.merge[cls]
        if self.crop:
            rng = np.random.default_rng(s)
            fg = np.argwhere(cls > 0)
            h, w = cls.shape
            c = fg[rng.integers(len(fg))] if len(fg) else np.array([h // 2, w // 2])
            y0 = int(np.clip(c[0] - self.crop // 2, 0, max(0, h - self.crop)))
            x0 = int(np.clip(c[1] - self.crop // 2, 0, max(0, w - self.crop)))
            img, cls = img[y0 : y0 + self.crop, x0 : x0 + self.crop], cls[y0 : y0 + self.crop, x0 : x0 + self.crop]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img))[None],
            "label": torch.from_numpy(np.ascontiguousarray(cls)),
            "weight": torch.from_numpy(self._weight_map(cls, self.class_weights, self.edge_weight)),
        }


class SynthVolumes:
    """Whole synthetic volumes from held-out label maps with fixed seeds (validation set);
    quacks like :class:`~quicknat.data.slices.VolumeCache` for the training engine."""

    def __init__(self, synth: LabelMapSynth, ids: list[str], seeds: list[int]):
        self.scheme = synth.scheme
        self.ids = ids
        self.images, self.classes = [], []
        for k, seed in enumerate(seeds):
            img, cls = synth.volume(seed, map_index=k)
            self.images.append(img)
            self.classes.append(cls)
