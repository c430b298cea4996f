import json

import numpy as np
import pytest
import torch
from helpers import TEST_SCHEME, phantom_files
from scipy import ndimage

from quicknat.conform import ConformSettings
from quicknat.data.intensity import DEPTH_UNIT_MM, T1Priors, cortex_depth, cortex_shift, depth_decay
from quicknat.data.phantom import make_phantom
from quicknat.data.synth import LabelMapSynth, SynthConfig
from quicknat.data.synth_data import SynthSliceDataset
from quicknat.labels import ASEG33, compact_labels
from quicknat.losses import QuickNATLoss

S = ConformSettings(voxel_size=2.0, shape=(80, 80, 80))
QUIET = dict(bias_std=0.0, thick_prob=0.0, blur_max=0.0, noise_max=0.0, gamma_std=0.0, deform_std=0.0,
             rotation=0.0, scaling=0.0, shearing=0.0, translation=0.0)
T1 = dict(random_share=0.0, strip_prob=0.0, flip=0.0)


@pytest.fixture(scope="module")
def head():
    img, lab = make_phantom((120, 120, 120), (1.5, 1.5, 1.5), "LIA", seed=3)
    arr = lab.array.copy()
    arr[(arr == 0) & (img.array > 40)] = 502  # a non-brain head label, as in SynthSeg's maps
    return [(arr, lab.affine)]


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    """A tiny priors folder in SynthSeg's format: 5 intensity classes, tight spreads."""
    d = tmp_path_factory.mktemp("priors")
    labels = np.array([0, 2, 41, 3, 42, 12, 51, 13, 52, 24, 4, 43, 502])
    classes = np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0, 0, 2])
    means = np.array([[5.0, 160, 96, 124, 152], [1, 2, 2, 2, 2]])
    stds = np.array([[2.0, 3, 3, 3, 3], [0.1, 0.1, 0.1, 0.1, 0.1]])
    for name, a in zip(("generation_labels", "generation_classes_contrast_specific", "prior_means_t1",
                        "prior_stds_t1"), (labels, classes, means, stds)):
        np.save(d / f"{name}.npy", a)
    return str(d)


def test_seeded_valid_and_targets_are_distributions(head):
    s = LabelMapSynth(head, ASEG33, S)
    for view in ("coronal", "axial", "sagittal"):
        a_img, a_t = s.sample(view, 7)
        b_img, b_t = s.sample(view, 7)
        c_img, _ = s.sample(view, 8)
        assert a_img.shape == (1, 80, 80) and a_t.shape == (ASEG33.num_classes, 80, 80)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_t, b_t)
        assert not np.array_equal(a_img, c_img)
        assert a_img.min() >= 0 and a_img.max() <= 1
        np.testing.assert_allclose(a_t.sum(0), 1.0, atol=1e-5)


def test_soft_targets_keep_partial_volume():
    # a 1 mm map split into two classes at x = 40.5 (voxel edges): on a 2 mm grid the boundary
    # voxel holds a mix, and the targets' class sums equal the 1 mm volumes (halved per axis)
    arr = np.zeros((96, 96, 96), np.int16)
    arr[10:86, 10:86, 10:86] = 2
    arr[41:86, 10:86, 10:86] = 41
    aff = np.diag([-1.0, 1, 1, 1])
    settings = ConformSettings(voxel_size=2.0, shape=(48, 48, 48), orientation="LIA")
    s = LabelMapSynth([(arr, aff)], ASEG33, settings, SynthConfig(flip=0.0, **QUIET))
    assert s.sub == 2
    _, t = s.sample("coronal", 0, slice_index=24)
    assert ((t > 0.05) & (t < 0.95)).any()  # mixed voxels exist
    hard = LabelMapSynth([(arr, aff)], ASEG33, settings, SynthConfig(flip=0.0, soft=False, **QUIET))
    _, h = hard.sample("coronal", 0, slice_index=24)
    assert set(np.unique(h)) <= {0.0, 1.0}
    wm_l, wm_r = ASEG33.class_of_label(2), ASEG33.class_of_label(41)
    # 1 mm areas in the slab of the 2 mm slice: left 31 x 76, right 45 x 76 (in 1 mm pixels)
    ratio = t[wm_l].sum() / t[wm_r].sum()
    assert abs(ratio - 31 / 45) < 0.03


def test_slices_cover_the_whole_brain(head):
    s = LabelMapSynth(head, ASEG33, S, SynthConfig(head_slices=0.0))
    ext = s.maps[0]["brain_extent"][:, 2] / S.voxel_size + (S.shape[2] - 1) / 2
    g = torch.Generator()
    pos = [s._slice_position(s.maps[0], 2, g.manual_seed(k))[0] for k in range(300)]
    assert min(pos) <= ext[0] + 3 and max(pos) >= ext[1] - 3
    for view in ("coronal", "axial", "sagittal"):
        for seed in range(6):
            _, t = s.sample(view, 100 + seed)
            assert (1 - t[0]).mean() >= 0.002, (view, seed)


def test_t1_priors_per_class_and_skull_removal(head, priors):
    p = T1Priors.load(priors)
    assert p.means.shape == (2, 5)
    t1 = LabelMapSynth(head, ASEG33, S, SynthConfig(priors=priors, **T1, **QUIET))
    img, t = t1.sample("coronal", 1, slice_index=40)
    img = img[0]
    cls = t.argmax(0)
    mean = {lab: img[cls == ASEG33.class_of_label(lab)].mean() for lab in (2, 3, 12, 13)}
    # real T1 contrast from the priors: WM > pallidum > putamen > cortex
    assert mean[2] > mean[13] > mean[12] > mean[3]
    kept = LabelMapSynth(head, ASEG33, S, SynthConfig(priors=priors, **T1, **QUIET))
    stripped = LabelMapSynth(head, ASEG33, S, SynthConfig(priors=priors, random_share=0.0, strip_prob=1.0,
                                                          flip=0.0, **QUIET))
    a, c = kept.sample("coronal", 2, slice_index=45)
    b, _ = stripped.sample("coronal", 2, slice_index=45)
    a, b = a[0], b[0]
    outside = (c[0] == 1) & (a > 0.3)  # scalp: bright, labelled background
    assert outside.sum() > 50 and (b[outside] < 0.1).mean() > 0.95


def test_cortex_depth_and_shift():
    ids = np.zeros((1, 1, 8), np.int64)
    ids[0, 0, :3] = 2  # white matter, then three cortex voxels, then background
    ids[0, 0, 3:6] = 3
    depth = cortex_depth(ids, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(depth[0, 0] * DEPTH_UNIT_MM, [0, 0, 0, 1, 2, 3, 0, 0])
    np.testing.assert_allclose(depth_decay(torch.from_numpy(depth[0, 0, 3:6]), 1.0).numpy(),
                               np.exp([0.0, -1.0, -2.0]), rtol=1e-6)
    assert not cortex_depth(np.full((2, 2, 2), 3), (1.0, 1.0, 1.0)).any()  # no WM: no gradient
    shift = cortex_shift(np.array([0, 2, 3, 41, 42]), torch.tensor([0.0, 160, 96, 150, 100]), 0.5)
    np.testing.assert_allclose(shift.numpy(), [0, 0, 32, 0, 25])
    assert not cortex_shift(np.array([0, 3]), torch.tensor([0.0, 96]), 0.5).any()


def test_cortex_depth_in_its_box_equals_the_whole_map():
    rng = np.random.default_rng(0)
    ids = np.zeros((30, 26, 22), np.int64)  # WM and cortex away from the edges, with other labels around
    ids[8:20, 6:18, 5:15] = rng.choice([2, 3, 41, 42, 17, 0], size=(12, 12, 10), p=[0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    ids[2, 2, 2] = 508  # a non-brain label outside the box
    zooms = (1.0, 1.2, 0.8)
    wm, cortex = np.isin(ids, [2, 41]), np.isin(ids, [3, 42])
    full = ndimage.distance_transform_edt(~wm, sampling=zooms)
    expected = np.where(cortex, np.minimum(np.rint(full / DEPTH_UNIT_MM), 255), 0)
    np.testing.assert_array_equal(cortex_depth(ids, zooms), expected)


@pytest.mark.parametrize("ids", [np.array([[5, 0, 508], [5, 24, 2]]), np.array([-3, 7, 7, 70000]), np.zeros(0, int)])
def test_compact_labels_is_unique_with_inverse(ids):
    uniq, inv = compact_labels(ids)
    ref_uniq, ref_inv = np.unique(ids, return_inverse=True)
    np.testing.assert_array_equal(uniq, ref_uniq)
    np.testing.assert_array_equal(inv.reshape(-1), ref_inv.reshape(-1))
    assert inv.shape == ids.shape


def test_cortex_gradient_brightens_deep_cortex_only(head, priors):
    plain = LabelMapSynth(head, ASEG33, S, SynthConfig(priors=priors, **T1, **QUIET))
    grad = LabelMapSynth(head, ASEG33, S, SynthConfig(priors=priors, cortex_gradient=1.0, cortex_gradient_mm=2.0,
                                                      **T1, **QUIET))
    deep, far, gains = [], [], []
    for seed in range(4):
        a, t = plain.sample("coronal", seed, slice_index=40)
        b, _ = grad.sample("coronal", seed, slice_index=40)
        a, b, cls = a[0], b[0], t.argmax(0)
        wm = np.isin(cls, [ASEG33.class_of_label(x) for x in (2, 41)])
        ctx = np.isin(cls, [ASEG33.class_of_label(x) for x in (3, 42)])
        d = ndimage.distance_transform_edt(~wm) * S.voxel_size
        near, away = ctx & (d <= 2), ctx & (d >= 8)
        assert near.sum() > 20 and away.sum() > 20
        gains.append((b[near].mean() - a[near].mean()) / (a[wm].mean() - a[near].mean()))
        deep.append(b[near].mean() - a[near].mean())
        far.append(abs(b[away].mean() - a[away].mean()))
        assert abs(b[wm].mean() - a[wm].mean()) < 0.02  # white matter as before
    # deep cortex moves towards its white matter, by a seeded share of the contrast up to 1
    assert min(deep) > 0 and 0.1 < max(gains) < 1.0, (deep, far, gains)
    assert max(far) < 0.25 * max(deep), (deep, far, gains)


def test_bad_priors_and_config(tmp_path):
    from quicknat.errors import QuicknatInputError

    with pytest.raises(QuicknatInputError, match="prior"):
        T1Priors.load(tmp_path)
    with pytest.raises(ValueError, match="probability"):
        SynthConfig(strip_prob=2.0)
    with pytest.raises(ValueError, match="probability"):
        SynthConfig(cortex_gradient=1.5)
    with pytest.raises(ValueError, match="positive"):
        SynthConfig(cortex_gradient_mm=0.0)
    with pytest.raises(ValueError, match="unknown synth keys"):
        SynthConfig.from_dict({"nosuch": 1})
    assert SynthConfig.from_dict({"t1_share": 0.8}).random_share == pytest.approx(0.2)


def test_flip_swaps_sides(head):
    no = LabelMapSynth(head, ASEG33, S, SynthConfig(flip=0.0, **QUIET))
    yes = LabelMapSynth(head, ASEG33, S, SynthConfig(flip=1.0, **QUIET))
    a = no.sample("coronal", 3, slice_index=40)[1].argmax(0)
    b = yes.sample("coronal", 3, slice_index=40)[1].argmax(0)
    swap = ASEG33.lr_swap_index()
    assert (b == swap[a[::-1]]).mean() > 0.99
    left = ASEG33.class_of_label(2)
    assert np.argwhere(a == left)[:, 0].mean() > 40 and np.argwhere(b == left)[:, 0].mean() > 40


def test_dataset_soft_target_weights_and_sagittal_merge(head):
    s = LabelMapSynth(head, ASEG33, S)
    ds = SynthSliceDataset(s, "sagittal", np.ones(19, np.float32), 2.0, length=6, seed=1)
    item = ds[0]
    assert item["image"].shape == (1, 80, 80) and item["target"].shape == (19, 80, 80)
    np.testing.assert_allclose(item["target"].sum(0).numpy(), 1.0, atol=1e-5)
    assert torch.equal(item["label"], item["target"].argmax(0))
    assert float(item["weight"].min()) >= 1.0
    assert len(ds) == 6


def test_dataset_crops_around_the_labelled_region(head):
    # without noise and blur every pixel is a function of its position alone, so the rendered
    # window is exactly that window of the whole slice (of each 2.5D channel and of the target)
    s = LabelMapSynth(head, ASEG33, S, SynthConfig(random_share=1.0, std_range=(0.0, 0.0), noise_max=0.0, blur_max=0.0,
                                                   thick_prob=0.0))
    for seed, view in enumerate(("coronal", "axial", "sagittal", "coronal")):
        img, t = s.sample(view, seed, slice_index=40 + seed, context=1)
        win_img, win_t = s.sample(view, seed, slice_index=40 + seed, context=1, crop=48)
        assert win_img.shape == (3, 48, 48) and win_t.shape == (33, 48, 48)
        hits = [(r, c) for r in range(33) for c in range(33)
                if np.allclose(img[:, r:r + 48, c:c + 48], win_img, atol=1e-5)]
        assert len(hits) == 1
        r, c = hits[0]
        np.testing.assert_array_equal(t[:, r:r + 48, c:c + 48], win_t)
        fg = t[0] < 0.5  # the window holds most of the slice's labelled pixels
        assert fg[r:r + 48, c:c + 48].sum() >= 0.6 * fg.sum() > 0
    crop = SynthSliceDataset(s, "coronal", np.ones(33, np.float32), 2.0, length=4, seed=2, crop=48)
    item = crop[1]
    assert item["image"].shape == (1, 48, 48) and item["target"].shape == (33, 48, 48)
    assert item["weight"].shape == (48, 48) and torch.equal(item["label"], item["target"].argmax(0))
    with pytest.raises(ValueError, match="multiple of 16"):
        SynthConfig(crop=40)


def test_loss_soft_target_equals_hard_on_one_hot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 5, 16, 16), generator=g)
    hard = torch.randint(0, 5, (2, 16, 16), generator=g)
    w = torch.rand((2, 16, 16), generator=g)
    onehot = torch.nn.functional.one_hot(hard, 5).permute(0, 3, 1, 2).float()
    a, pa = QuickNATLoss()(logits, hard, w)
    b, pb = QuickNATLoss()(logits, onehot, w)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(pa["dice"], pb["dice"], atol=1e-5)
    soft = 0.5 * onehot + 0.5 * onehot.roll(1, dims=1)
    c, _ = QuickNATLoss()(logits, soft, w)
    assert torch.isfinite(c) and not torch.allclose(a, c)


def test_synthetic_training_path_with_real_validation_scan(tmp_path):
    from helpers import tiny_config

    from quicknat.checkpoint import load_checkpoint
    from quicknat.data.manifest import Manifest, Scan
    from quicknat.train import train

    scans = []
    for n in range(3):
        ip, lp = phantom_files(tmp_path, 60 + n, shape=(64, 64, 64), spacing=(2.5, 2.5, 2.5))
        ip.unlink()
        scans.append(Scan(f"m{n}", f"m{n}", None, lp.name))
    ip, lp = phantom_files(tmp_path, 70, shape=(64, 64, 64), spacing=(2.5, 2.5, 2.5))
    scans.append(Scan("real", "real", ip.name, lp.name))
    m = Manifest("labelmaps", TEST_SCHEME.to_dict(), scans,
                 {"seed": 0, "train": ["m0", "m1"], "validation": ["m2", "real"], "test": []}
                 ).save(tmp_path / "manifest.json")
    cfg = tiny_config(epochs=1, steps_per_epoch=3)
    run = train(m, tmp_path / "run", "axial", cfg, device="cpu")
    ck = load_checkpoint(run / "axial.pt")
    assert ck.provenance["data"]["synthetic"] is True and ck.provenance["data"]["train_scans"] == 2
    hist = json.loads((run / "axial" / "history.json").read_text())
    assert 0 <= hist[0]["val_real_dice_mean"] <= 1 and "val_real_dice/Left-White" in hist[0]


def test_context_channels_are_the_neighbouring_slices(head):
    # no noise, blur, bias or deformation: every pixel is its label's mean, so a slice looks the
    # same whether it is the middle channel or a neighbour, and the channels step along the axis
    # as quicknat.views.with_context steps at inference
    quiet = dict(QUIET, std_range=(0.0, 0.0))
    s = LabelMapSynth(head, ASEG33, S, SynthConfig(random_share=1.0, flip=0.0, soft=False, **quiet))
    for view in ("coronal", "axial", "sagittal"):
        img, t = s.sample(view, 5, slice_index=40, context=2)
        assert img.shape == (5, 80, 80) and t.shape == (ASEG33.num_classes, 80, 80)
        for k, index in enumerate(range(38, 43)):
            alone, t_alone = s.sample(view, 5, slice_index=index)
            np.testing.assert_allclose(img[k], alone[0], atol=1e-6)
            if index == 40:
                np.testing.assert_array_equal(t, t_alone)
        assert not np.allclose(img[0], img[4])
    ds = SynthSliceDataset(s, "coronal", np.ones(33, np.float32), 2.0, length=2, seed=1, crop=48, context=1)
    assert ds[0]["image"].shape == (3, 48, 48) and ds[0]["target"].shape == (33, 48, 48)
