import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quicknat.labels import LabelClass, LabelScheme
from quicknat.metrics import dice, dice_onehot, evaluate_pair, foreground_mean, iou, surface_distances

SCHEME = LabelScheme("t", (LabelClass("bg", 0), LabelClass("A", 1), LabelClass("B", 5), LabelClass("C", 7)))


def cube(shape, lo, n):
    a = np.zeros(shape, dtype=np.int16)
    a[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n] = 1
    return a


@pytest.mark.parametrize("n", [4, 6, 10])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_shift_of_a_cube(n, axis):
    ref = cube((20, 20, 20), (5, 5, 5), n)
    shift = [5, 5, 5]
    shift[axis] += 1
    pred = cube((20, 20, 20), shift, n)
    assert dice(pred, ref, 1) == pytest.approx((n - 1) / n)
    assert iou(pred, ref, 1) == pytest.approx((n - 1) / (n + 1))
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.0  # the shift is along a 2 mm axis
    hd, asd = surface_distances(pred == 1, ref == 1, spacing)
    assert hd == pytest.approx(2.0)
    assert 0 < asd <= 2.0


def test_concentric_spheres_distances():
    zz, yy, xx = np.mgrid[:41, :41, :41] - 20
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    small, big = r <= 10, r <= 13
    hd, asd = surface_distances(small, big, (1.0, 1.0, 1.0))
    assert hd == pytest.approx(3.0, abs=0.5)
    assert asd == pytest.approx(3.0, abs=0.5)
    hd2, _ = surface_distances(small, big, (0.5, 0.5, 0.5))
    assert hd2 == pytest.approx(hd / 2, rel=1e-6)


def test_perfect_prediction_scores_exactly_one_and_absent_is_absent():
    ref = np.zeros((12, 12, 12), np.int16)
    ref[2:6, 2:6, 2:6] = 1
    ref[7:10, 7:10, 7:10] = 5
    scores = {s.structure: s for s in evaluate_pair(ref, ref, SCHEME, (1, 1, 2))}
    for name in ("A", "B"):
        assert scores[name].dice == 1.0 and scores[name].iou == 1.0 and scores[name].status == "ok"
        assert scores[name].hd95 == 0.0 and scores[name].volume_similarity == 1.0
    assert scores["A"].volume_ref == 4 * 4 * 4 * 2
    assert scores["C"].status == "absent" and math.isnan(scores["C"].dice)
    assert scores["bg"].status == "background"
    assert foreground_mean(list(scores.values())) == 1.0  # C is not in the mean, nor background


def test_present_in_one_only_is_zero():
    ref = np.zeros((8, 8, 8), np.int16)
    ref[1:3, 1:3, 1:3] = 1
    pred = ref.copy()
    pred[5:7, 5:7, 5:7] = 7  # C only in prediction
    scores = {s.structure: s for s in evaluate_pair(pred, ref, SCHEME)}
    assert scores["C"].status == "missing_in_ref" and scores["C"].dice == 0.0
    assert scores["C"].volume_similarity == 0.0 and math.isnan(scores["C"].hd95)
    assert foreground_mean(list(scores.values())) == pytest.approx(0.5)


def test_class_index_maps_cannot_pass_as_one_hot():
    # the source tutorial fed class-index maps to a one-hot Dice and reported Dice > 1
    labels = torch.randint(0, 4, (1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="one-hot"):
        dice_onehot(labels.float(), labels.float())
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    d = dice_onehot(onehot, onehot)
    assert torch.all(d == 1.0)
    with pytest.raises(ValueError, match="not a label map"):
        evaluate_pair(np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), SCHEME)


def test_monai_dice_agrees_with_ours():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (10, 10, 10))
    b = np.where(rng.random((10, 10, 10)) < 0.8, a, rng.integers(0, 3, (10, 10, 10)))
    oa = torch.nn.functional.one_hot(torch.from_numpy(a), 3).permute(3, 0, 1, 2)[None].float()
    ob = torch.nn.functional.one_hot(torch.from_numpy(b), 3).permute(3, 0, 1, 2)[None].float()
    monai = dice_onehot(oa, ob, include_background=True)[0].numpy()
    ours = [dice(a, b, c) for c in range(3)]
    np.testing.assert_allclose(monai, ours, rtol=1e-6)


label_maps = arrays(np.int8, (5, 5, 4), elements=st.integers(0, 2))


@settings(max_examples=60, deadline=None)
@given(label_maps, label_maps)
def test_dice_properties(a, b):
    for c in (1, 2):
        d1, d2 = dice(a, b, c), dice(b, a, c)
        if math.isnan(d1):
            assert math.isnan(d2) and not (a == c).any() and not (b == c).any()
            continue
        assert d1 == pytest.approx(d2)
        assert 0.0 <= d1 <= 1.0
        assert iou(a, b, c) == pytest.approx(d1 / (2 - d1))
        if (a == c).any():
            assert dice(a, a, c) == 1.0
