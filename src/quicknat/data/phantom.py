"""Seeded brain-like phantoms with aseg33 labels and a T1-like image, on any grid.

The anatomy is defined in world coordinates (RAS, mm, centred on the grid's centre): a head
(scalp, skull), outer CSF, a cortex-like shell split into hemispheres, white matter, ventricles,
deep grey nuclei, brain stem and cerebellum as randomly deformed ellipsoids. Because it lives in
world space, the same phantom can be sampled on any shape, voxel size, orientation or oblique
affine: what a test of geometry needs. Intensities are T1-like (WM > GM > CSF) with a smooth
bias field and Gaussian noise.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from ..io import Volume

# (left ID, right ID or None, centre (x, y, z), radii (x, y, z)) in units of the brain's
# semi-axes; x is mirrored for the right structure. Order matters: later ones overwrite.
_STRUCTURES = [
    (8, 47, (0.28, -0.62, -0.55), (0.26, 0.24, 0.22)),  # cerebellum cortex
    (7, 46, (0.26, -0.60, -0.52), (0.12, 0.12, 0.10)),  # cerebellum white matter
    (16, None, (0.0, -0.30, -0.55), (0.12, 0.12, 0.30)),  # brain stem
    (28, 60, (0.10, -0.18, -0.28), (0.07, 0.09, 0.07)),  # ventral DC
    (4, 43, (0.12, 0.02, 0.18), (0.07, 0.36, 0.11)),  # lateral ventricle
    (5, 44, (0.33, -0.12, -0.22), (0.03, 0.12, 0.035)),  # inferior lateral ventricle
    (14, None, (0.0, -0.05, -0.02), (0.03, 0.16, 0.10)),  # 3rd ventricle
    (15, None, (0.0, -0.42, -0.42), (0.06, 0.06, 0.07)),  # 4th ventricle
    (10, 49, (0.11, -0.12, 0.0), (0.08, 0.14, 0.10)),  # thalamus
    (11, 50, (0.19, 0.26, 0.12), (0.05, 0.13, 0.08)),  # caudate
    (12, 51, (0.30, 0.10, 0.0), (0.06, 0.17, 0.11)),  # putamen
    (13, 52, (0.235, 0.06, -0.04), (0.035, 0.09, 0.06)),  # pallidum
    (17, 53, (0.30, -0.22, -0.30), (0.07, 0.20, 0.07)),  # hippocampus
    (18, 54, (0.30, 0.06, -0.32), (0.07, 0.07, 0.07)),  # amygdala
    (26, 58, (0.13, 0.33, -0.12), (0.045, 0.05, 0.045)),  # accumbens
]

#: Mean T1-like intensity per label ID (before jitter, bias field and noise).
T1_INTENSITY = {
    0: 0.0, 1: 65.0, 1000: 12.0,  # 1: scalp, 1000: skull (image only; labelled 0)
    2: 110.0, 41: 110.0, 3: 72.0, 42: 72.0, 4: 25.0, 43: 25.0, 5: 28.0, 44: 28.0,
    7: 105.0, 46: 105.0, 8: 70.0, 47: 70.0, 10: 90.0, 49: 90.0, 11: 80.0, 50: 80.0,
    12: 85.0, 51: 85.0, 13: 100.0, 52: 100.0, 14: 25.0, 15: 25.0, 16: 100.0,
    17: 74.0, 53: 74.0, 18: 76.0, 54: 76.0, 24: 28.0, 26: 80.0, 58: 80.0, 28: 96.0, 60: 96.0,
}


def phantom_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    orientation: str = "RAS",
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """An affine with the given axis codes, voxel sizes and extra rotation, centred on 0."""
    ornt = nib.orientations.axcodes2ornt(tuple(orientation))
    rot = np.zeros((3, 3))
    for axis, (world_axis, sign) in enumerate(ornt):
        rot[int(world_axis), axis] = sign * spacing[axis]
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx @ rot
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ ((np.array(shape) - 1) / 2.0)
    return affine


def _place_structures(labels: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> None:
    """Draw the deep structures (ellipsoids, mirrored for left/right pairs) into ``labels``.

    Only the points inside the box that holds every possible ellipsoid (largest centre offset
    and radius the jitter allows) are tested: the same labels, a fraction of the work."""
    c_all, r_all = np.array([s[2] for s in _STRUCTURES]), np.array([s[3] for s in _STRUCTURES])
    reach = (np.abs(c_all) + 0.015 + r_all * 1.35 * 1.1).max(0) + 1e-3
    near = np.flatnonzero((np.abs(v) <= reach.astype(np.float32)[:, None]).all(0))
    vn, sub = v[:, near], labels[near]
    for left_id, right_id, c, r in _STRUCTURES:
        c = np.array(c) + rng.uniform(-0.015, 0.015, 3)
        r = np.array(r) * 1.35 * rng.uniform(0.9, 1.1, 3)
        sides = [(left_id, 0.0)] if right_id is None else [(left_id, -1.0), (right_id, 1.0)]
        for lab, sx in sides:
            cx = np.array([c[0] * sx, c[1], c[2]], dtype=np.float32)
            d = (vn - cx[:, None]) / r.astype(np.float32)[:, None]
            sub[(d**2).sum(0) < 1.0] = lab
    labels[near] = sub


def _render(image_key: np.ndarray, world: np.ndarray, radius: float, rng: np.random.Generator, bias: float,
            noise: float) -> np.ndarray:
    """T1-like intensities of the tissue keys, with a smooth bias field and Rician-like noise."""
    means = {k: m * rng.uniform(0.95, 1.05) for k, m in T1_INTENSITY.items()}
    lut = np.zeros(max(means) + 1, dtype=np.float32)
    for k, m in means.items():
        lut[k] = m
    img = lut[image_key]
    if bias:
        img *= np.exp(bias * np.sin(world[0] / radius * 1.3 + rng.uniform(0, 6)) * np.cos(world[2] / radius))
    if noise:
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        img[image_key == 0] = np.abs(img[image_key == 0]) * 0.3
    return img


def make_phantom(
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    orientation: str = "RAS",
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    affine: np.ndarray | None = None,
    seed: int = 0,
    head_radius: float | None = None,
    noise: float = 3.0,
    bias: float = 0.15,
    skull: bool = True,
) -> tuple[Volume, Volume]:
    """A seeded phantom: (T1-like image, aseg33 label map) on the given grid.

    Args:
        head_radius: head semi-axis (mm) along anterior-posterior; by default 44 % of the
            smallest physical extent of the grid, so the head fits any grid.
        skull: include scalp and skull (whole-head) or not (skull-stripped).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if affine is None:
        affine = phantom_affine(shape, spacing, orientation, rotation_deg)  # type: ignore[arg-type]
    affine = np.asarray(affine, dtype=np.float64)
    extent = np.array(shape) * np.sqrt((affine[:3, :3] ** 2).sum(0))
    radius = head_radius if head_radius is not None else 0.44 * float(extent.min())

    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    centre_vox = (np.array(shape, dtype=np.float64) - 1) / 2.0
    centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    world = (affine[:3, :3].astype(np.float32) @ idx) + (affine[:3, 3] - centre).astype(np.float32)[:, None]
    world += rng.uniform(-0.03, 0.03, 3).astype(np.float32)[:, None] * radius

    head_axes = radius * np.array([0.80, 1.0, 0.86]) * rng.uniform(0.95, 1.05, 3)
    brain_axes = head_axes * 0.84
    u = world / head_axes.astype(np.float32)[:, None]
    v = world / brain_axes.astype(np.float32)[:, None]

    def wobble(p: np.ndarray, amp: float) -> np.ndarray:
        k = rng.normal(0, 2.5, (3, 3))
        ph = rng.uniform(0, 2 * np.pi, 3)
        a = rng.uniform(0.5, 1.0, 3) * amp
        k, ph, a = k.astype(np.float32), ph.astype(np.float32), a.astype(np.float32)  # float32: 2x faster
        return 1.0 + sum(a[n] * np.sin(k[n] @ p + ph[n]) for n in range(3))

    rho_head = np.sqrt((u**2).sum(0)) * wobble(u, 0.02)
    rho = np.sqrt((v**2).sum(0)) * wobble(v, 0.03)
    x = world[0]

    labels = np.zeros(idx.shape[1], dtype=np.int16)
    image_key = np.zeros(idx.shape[1], dtype=np.int16)
    if skull:
        image_key[rho_head < 1.0] = 1
        image_key[rho_head < 0.94] = 1000
    inside = rho < 1.06
    labels[inside] = 24
    left = x < 0
    cortex = rho < 1.0
    labels[cortex] = np.where(left[cortex], 3, 42)
    wm = rho < 0.86
    labels[wm] = np.where(left[wm], 2, 41)
    gap = cortex & (np.abs(x) < 0.012 * radius + 0.6) & (v[2] > -0.2)
    labels[gap] = 24

    _place_structures(labels, v, rng)
    image_key = np.where(labels > 0, labels, image_key)
    img = _render(image_key, world, radius, rng, bias, noise)
    image = Volume(img.reshape(shape).astype(np.float32), affine.copy())
    label = Volume(labels.reshape(shape), affine.copy())
    return image, label
