import numpy as np

from quicknat.data.phantom import make_phantom
from quicknat.labels import ASEG33


def test_seeded_and_labelled_in_aseg33():
    a_img, a_lab = make_phantom((64, 64, 64), seed=7)
    b_img, b_lab = make_phantom((64, 64, 64), seed=7)
    c_img, c_lab = make_phantom((64, 64, 64), seed=8)
    assert np.array_equal(a_img.array, b_img.array) and np.array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_lab.array, c_lab.array)
    _, unknown = ASEG33.encode(a_lab.array)
    assert unknown == {}
    big, _ = make_phantom((128, 128, 128), seed=0)
    _, big_lab = make_phantom((128, 128, 128), seed=0)
    assert len(np.unique(big_lab.array)) == 33  # every aseg33 class appears


def test_t1_contrast_and_sides():
    img, lab = make_phantom((96, 96, 96), seed=1, noise=0, bias=0)
    a, lab_ = img.array, lab.array
    wm, gm, csf = a[lab_ == 2].mean(), a[lab_ == 3].mean(), a[lab_ == 24].mean()
    assert wm > gm > csf
    # left structures lie at negative RAS x (RAS affine by default)
    xs = np.argwhere(lab_ == 17)[:, 0].mean(), np.argwhere(lab_ == 53)[:, 0].mean()
    assert xs[0] < xs[1]


def test_skull_optional_and_any_grid():
    img, _ = make_phantom((40, 50, 30), (2.0, 1.5, 3.0), "LIA", (10, 0, 0), seed=2, skull=False)
    assert img.shape == (40, 50, 30)
    with_skull, lab = make_phantom((40, 50, 30), (2.0, 1.5, 3.0), "LIA", (10, 0, 0), seed=2)
    outside = lab.array == 0
    assert (with_skull.array[outside] > 30).sum() > (img.array[outside] > 30).sum()
