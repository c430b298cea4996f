"""Every speed change of the segmentation path agrees with the reference path (issue 8):
Dice >= 0.999 per structure, or the same files. Timings live in bench/segment_speed.py."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TEST_SCHEME, dice_per_class, phantom_files

from quicknat.data.phantom import make_phantom, phantom_affine
from quicknat.resample import (
    argmax_resample,
    axis_aligned,
    prob_argmax_resample,
    resample,
    resample_grid,
)
from quicknat.runner import segment_files
from quicknat.segment import Segmenter, SpeedPaths


def axis_aligned_matrix(rng, scales) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = 0
    perm = rng.permutation(3)
    for k in range(3):
        m[perm[k], k] = rng.choice([-1.0, 1.0]) * scales[k]
    m[:3, 3] = rng.uniform(-3, 30, 3)
    return m


def oblique_matrix(scale: float, degrees) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = phantom_affine((1, 1, 1), (scale,) * 3, "RAS", degrees)[:3, :3]
    m[:3, 3] = [2.0, -1.5, 3.0]
    return m


def smooth_probs(shape, classes: int, seed: int) -> torch.Tensor:
    """Softmax of smoothed noise: probabilities with realistic, blobby class regions."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, classes, *(s // 4 + 2 for s in shape)), generator=g) * 4
    up = torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=False)[0]
    return torch.softmax(up, 0)


def reference_argmax(src: torch.Tensor, m: np.ndarray, out_shape) -> np.ndarray:
    """Every channel resampled over the whole output grid by grid_sample, then argmax."""
    r = resample_grid(src.float(), m, out_shape, "bilinear")
    best, arg = r.max(0)
    arg[best <= 0] = 0
    return arg.numpy()


def assert_agree(got: np.ndarray, ref: np.ndarray, min_dice: float = 0.999) -> None:
    assert got.shape == ref.shape
    dice = dice_per_class(got, ref, np.unique(ref))
    worst = min(dice, key=dice.get)
    assert dice[worst] >= min_dice, (worst, dice[worst], (got != ref).mean())


@pytest.mark.parametrize("scales", [(0.5, 0.5, 0.5), (2.0, 2.0, 2.0), (0.4, 1.0, 1.3), (1.0, 1.0, 3.0)])
def test_separable_resampling_equals_grid_sample(scales):
    rng = np.random.default_rng(int(sum(scales) * 10))
    src = torch.rand(3, 21, 26, 17)
    for _ in range(3):
        m = axis_aligned_matrix(rng, scales)
        assert axis_aligned(m) is not None
        out_shape = (23, 19, 30)
        fast = resample(src, m, out_shape, "bilinear")
        ref = resample_grid(src, m, out_shape, "bilinear")
        assert torch.allclose(fast, ref, atol=1e-5), float((fast - ref).abs().max())
    assert axis_aligned(oblique_matrix(1.0, (10, 0, 0))) is None


@pytest.mark.parametrize("kind", ["axis_aligned", "oblique"])
def test_probability_argmax_with_class_selection_equals_reference(kind):
    probs = smooth_probs((30, 34, 28), 9, seed=3)
    rng = np.random.default_rng(4)
    m = axis_aligned_matrix(rng, (0.5, 0.5, 0.5)) if kind == "axis_aligned" else oblique_matrix(0.5, (12, -8, 20))
    out_shape = (70, 60, 64)
    fast = prob_argmax_resample(probs, m, out_shape)
    slow = prob_argmax_resample(probs, m, out_shape, fast=False)
    ref = reference_argmax(probs, m, out_shape)
    assert (ref > 0).mean() > 0.1  # the source covers a real part of the output grid
    assert_agree(fast, ref)
    assert_agree(slow, ref)


def test_probability_argmax_when_a_tile_touches_only_the_last_input_voxel():
    # 9 input voxels at 8x finer output spacing: the output's last row maps onto the input's last
    # voxel centre, so the tile holding it reads a one-voxel box (which once divided by zero)
    probs = smooth_probs((9, 9, 9), 4, seed=1)
    m = np.eye(4)
    m[:3, :3] = np.diag([0.125] * 3) @ np.array([[1, 0, 0], [0, 1, 1e-7], [0, -1e-7, 1]])  # not axis-aligned
    out_shape = (65, 65, 65)
    assert np.array_equal(prob_argmax_resample(probs, m, out_shape), reference_argmax(probs, m, out_shape))


def test_class_map_resampling_equals_one_hot_reference():
    cls = smooth_probs((30, 34, 28), 7, seed=5).argmax(0).numpy().astype(np.uint8)
    m = oblique_matrix(0.6, (5, 10, -7))
    out_shape = (50, 50, 48)
    got = argmax_resample(cls, 7, m, out_shape)
    onehot = torch.from_numpy(cls).long()[None] == torch.arange(7)[:, None, None, None]
    assert_agree(got, reference_argmax(onehot.float(), m, out_shape))


@pytest.fixture(scope="module")
def phantoms():
    # axis-aligned 1 mm in another orientation (separable back-mapping from the 2.5 mm test grid)
    # and an oblique scan (grid_sample back-mapping)
    return [make_phantom((110, 120, 100), (1.0, 1.0, 1.0), "RAS", seed=21)[0],
            make_phantom((80, 90, 70), (1.5, 1.5, 1.5), "LPS", (10, -5, 8), seed=22)[0]]


@pytest.fixture(scope="module")
def fast_classes(tiny_model, phantoms):
    """The default (all speed paths on) segmentation of each phantom, computed once."""
    fast = Segmenter(tiny_model, device="cpu", flip=False)
    return [fast.segment(vol).classes for vol in phantoms]


@pytest.mark.parametrize("off", [f.name for f in dataclasses.fields(SpeedPaths)] + ["all"])
def test_each_speed_path_agrees_with_the_reference(tiny_model, phantoms, fast_classes, off):
    paths = SpeedPaths.reference() if off == "all" else dataclasses.replace(SpeedPaths(), **{off: False})
    slow = Segmenter(tiny_model, device="cpu", batch_size=1, paths=paths, flip=False)
    for vol, a in zip(phantoms, fast_classes):
        b = slow.segment(vol).classes
        assert len(np.unique(b)) == TEST_SCHEME.num_classes  # a real segmentation to compare
        assert_agree(a, b)


def test_streamed_cohort_writes_what_one_at_a_time_writes(tmp_path, tiny_model):
    seg = Segmenter(tiny_model, device="cpu", flip=False)
    scans = [phantom_files(tmp_path / "in", s, shape=(70, 70, 70), spacing=(2.0, 2.0, 2.0))[0] for s in (31, 32)]
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    inputs = [scans[0], bad, scans[1]]
    streamed = segment_files(inputs, tmp_path / "a", segmenter=seg, overlay=False).outcomes
    serial = segment_files(inputs, tmp_path / "b", segmenter=seg, overlay=False, stream=False).outcomes
    assert [o.error is None for o in streamed] == [o.error is None for o in serial] == [True, False, True]
    assert "broken.nii.gz" in streamed[1].error
    for a, b in zip(streamed, serial):
        assert [p.name for p in a.outputs] == [p.name for p in b.outputs]
        for pa, pb in zip(a.outputs, b.outputs):
            if pa.suffix in (".csv", ".json"):
                assert pa.read_text() == pb.read_text()
            else:
                assert np.array_equal(np.asarray(nib.load(str(pa)).dataobj), np.asarray(nib.load(str(pb)).dataobj))
        if a.error is None:
            assert {"load", "conform", "network", "back_to_native", "write"} <= set(a.timings)
