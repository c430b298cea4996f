import nibabel as nib
import numpy as np
import pytest
from helpers import dice_per_class

from quicknat.conform import ConformSettings, conform, intensity_window, plan_conform
from quicknat.data.phantom import make_phantom, phantom_affine
from quicknat.io import Volume, load_volume, save_volume
from quicknat.labels import ASEG33

SMALL = ConformSettings(shape=(160, 160, 160))


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "LIA", "LPS", "PIR"])
def test_axis_aligned_1mm_is_exact(orientation):
    img, lab = make_phantom((100, 110, 90), (1, 1, 1), orientation, seed=1)
    plan = plan_conform(img, SMALL)
    assert plan.exact
    cls, _ = ASEG33.encode(lab.array)
    conf = plan.classes(cls, 33)
    assert nib.aff2axcodes(plan.affine) == ("L", "I", "A")
    back = plan.classes_to_native(conf, 33)
    assert np.array_equal(back, cls)  # exact: index operations only
    # the image is only permuted/flipped/padded: same values
    ci = plan.image(img.array)
    assert ci.shape == SMALL.shape
    assert np.isclose(np.sort(ci[ci > 0])[-100:].mean(), np.sort(plan.image(img.array).ravel())[-100:].mean())


def test_golden_orientation():
    # a marker at a known world position lands where LIA says it must
    shape = (40, 50, 30)
    affine = phantom_affine(shape, (1, 1, 1), "RAS")
    data = np.zeros(shape, np.float32)
    data[5:35, 5:45, 5:25] = 50  # "head" so the box centre is the grid centre
    data[30, 10, 20] = 100  # right (+x), posterior (-y), superior (+z) of centre
    vol = Volume(data, affine)
    conf, plan = conform(vol, ConformSettings(shape=(64, 64, 64), center="volume", percentiles=(0.0, 100.0)))
    i, j, k = np.argwhere(conf == conf.max())[0]
    world = plan.affine[:3, :3] @ [i, j, k] + plan.affine[:3, 3]
    np.testing.assert_allclose(world, affine[:3, :3] @ [30, 10, 20] + affine[:3, 3], atol=1e-6)
    c = (np.array([64, 64, 64]) - 1) / 2
    assert i < c[0]  # LIA axis 0 runs right -> left: a right-sided point has a low index
    assert j < c[1]  # axis 1 runs superior -> inferior
    assert k < c[2]  # axis 2 runs posterior -> anterior


@pytest.mark.parametrize("rotation", [(12, -8, 20), (0, 0, 3)])
def test_oblique_1mm_round_trip_through_probabilities(rotation):
    # the soft route the pipeline takes: probabilities on the conformed grid -> native argmax
    img, lab = make_phantom((172, 188, 162), (1, 1, 1), "RAS", rotation, seed=2, head_radius=79)
    plan = plan_conform(img, ConformSettings(shape=(180, 192, 172)))
    assert not plan.exact
    cls, _ = ASEG33.encode(lab.array)
    present, cls = np.unique(cls, return_inverse=True)  # only the classes the phantom holds (cheaper)
    cls = cls.reshape(lab.array.shape).astype(np.uint8)
    probs = plan.onehot(cls, len(present))
    back = plan.probs_to_native(probs)
    assert back.shape == cls.shape
    dice = dice_per_class(back, cls, np.unique(cls))
    worst = min(dice, key=dice.get)
    assert dice[worst] >= 0.98, (ASEG33.names[present[worst]], dice[worst])


def test_anisotropic_geometry_and_labels():
    img, lab = make_phantom((150, 110, 50), (0.9, 1.2, 3.0), "LPS", (5, 0, 10), seed=3)
    plan = plan_conform(img, SMALL)
    cls, _ = ASEG33.encode(lab.array)
    back = plan.classes_to_native(plan.classes(cls, 33), 33)
    assert back.shape == cls.shape
    dice = dice_per_class(back, cls, np.unique(cls))
    big = [c for c in dice if (cls == c).sum() > 2000]
    assert min(dice[c] for c in big) > 0.93  # 3 mm slices: large structures survive
    assert np.mean(list(dice.values())) > 0.9
    # only label IDs of the scheme come back (never interpolated IDs)
    assert set(np.unique(back)) <= set(range(33))


def test_output_affine_equals_input_affine_after_save(tmp_path):
    for orientation, sp, rot in [("LIA", (1, 1, 1), (0, 0, 0)), ("RAS", (0.9, 1.2, 3.0), (10, 5, -7))]:
        img, lab = make_phantom((60, 50, 40), sp, orientation, rot, seed=4)
        p = save_volume(img.array, img.affine, tmp_path / "in.nii.gz")
        vol = load_volume(p)
        plan = plan_conform(vol, ConformSettings(shape=(96, 96, 96)))
        cls, _ = ASEG33.encode(lab.array)
        back = plan.classes_to_native(plan.classes(cls, 33), 33)
        q = save_volume(ASEG33.decode(back), vol.affine, tmp_path / "out.nii.gz", header=vol.header, dtype=np.int16)
        out = load_volume(q)
        assert out.shape == vol.shape
        assert np.array_equal(out.affine, vol.affine)


def test_intensity_window_and_scaling():
    rng = np.random.default_rng(0)
    data = np.zeros((50, 50, 50), np.float32)
    data[10:40, 10:40, 10:40] = rng.normal(100, 10, (30, 30, 30))
    data[20, 20, 20] = 1e6  # a hot voxel must not set the scale
    lo, hi = intensity_window(data, (0.5, 99.5))
    assert lo == 0 and 110 < hi < 140
    conf, _ = conform(Volume(data, np.eye(4)), ConformSettings(shape=(64, 64, 64)))
    assert conf.dtype == np.float32 and conf.min() >= 0 and conf.max() <= 1
    assert 0.6 < np.median(conf[conf > 0]) < 0.9


def test_crop_and_pad_around_head():
    # a field of view larger than the conformed grid is cropped around the head
    img, _ = make_phantom((120, 120, 120), (2, 2, 2), "RAS", seed=5, head_radius=60)
    data = np.zeros((200, 120, 120), np.float32)
    data[70:190] = img.array  # head off-centre along x
    aff = img.affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ [70, 0, 0]
    conf, plan = conform(Volume(data, aff), ConformSettings(voxel_size=2.0, shape=(96, 96, 96)))
    assert plan.exact
    mask = conf > 0.05
    idx = np.argwhere(mask)
    centre = (idx.min(0) + idx.max(0)) / 2
    np.testing.assert_allclose(centre, (np.array(conf.shape) - 1) / 2, atol=1.5)


def test_settings_round_trip():
    s = ConformSettings(voxel_size=0.8, shape=(300, 300, 300), percentiles=(1.0, 99.0))
    assert ConformSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError):
        ConformSettings(voxel_size=0)
