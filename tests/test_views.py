import numpy as np
import pytest
import torch

from quicknat.labels import ASEG33
from quicknat.views import VIEW_NAMES, VIEWS, channel_view, get_view, slice_box, slices, with_context


def test_table_axes_weights_and_names():
    assert VIEW_NAMES == ("coronal", "axial", "sagittal")
    assert sorted(v.axis for v in VIEWS.values()) == [0, 1, 2]
    assert sum(v.weight for v in VIEWS.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown view"):
        get_view("oblique")


def test_slices_and_slice_of_agree_for_numpy_and_torch():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for spec in VIEWS.values():
        st = slices(vol, spec)
        assert st.shape[0] == vol.shape[spec.axis]
        for k in range(st.shape[0]):
            np.testing.assert_array_equal(spec.slice_of(vol, k), np.take(vol, k, axis=spec.axis))
            assert torch.equal(spec.slice_of(torch.from_numpy(vol), k), torch.from_numpy(np.take(vol, k, spec.axis)))
    acc = torch.zeros((5, 2, 3, 4))
    for spec in VIEWS.values():
        cv = channel_view(acc, spec)
        assert cv.shape[1] == 5 and cv.shape[0] == acc.shape[1 + spec.axis]
        cv[0] += 1  # shares memory
    assert float(acc.sum()) == 5 * (3 * 4 + 2 * 4 + 2 * 3)


def test_merge_index_only_for_sagittal():
    for spec in VIEWS.values():
        idx = spec.merge_index(ASEG33)
        assert len(idx) == ASEG33.num_classes
        if spec.merge_lr:
            assert idx.max() + 1 == spec.scheme(ASEG33).num_classes < ASEG33.num_classes
            left, right = ASEG33.class_of_label(2), ASEG33.class_of_label(41)
            assert idx[left] == idx[right]
        else:
            np.testing.assert_array_equal(idx, np.arange(ASEG33.num_classes))


def test_display_is_radiological_with_top_up():
    # LIA volume: axis 0 right->left, 1 superior->inferior, 2 posterior->anterior
    vol = np.zeros((4, 5, 6))
    vol[0, 0, 5] = 1  # right, superior, anterior corner
    cor = VIEWS["coronal"].display(VIEWS["coronal"].slice_of(vol, 5))
    assert cor.shape == (5, 4) and cor[0, 0] == 1  # superior at the top, right on the left
    ax = VIEWS["axial"].display(VIEWS["axial"].slice_of(vol, 0))
    assert ax.shape == (6, 4) and ax[0, 0] == 1  # anterior at the top, right on the left
    sag = VIEWS["sagittal"].display(VIEWS["sagittal"].slice_of(vol, 0))
    assert sag.shape == (5, 6) and sag[0, 5] == 1  # superior at the top, anterior on the right


def test_slice_box_matches_slices():
    box = (slice(1, 3), slice(0, 2), slice(2, 5))
    for spec in VIEWS.values():
        along, (h, w) = slice_box(box, spec)
        assert along == box[spec.axis]
        assert [h, w] == [box[a] for a in range(3) if a != spec.axis]


def test_with_context_stacks_neighbours_as_channels():
    stack = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 3), np.float32)  # slice k holds k
    x = with_context(stack, [0, 3, 5], 2)
    assert x.shape == (3, 5, 2, 3)
    assert x[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [1, 2, 3, 4, 5], [3, 4, 5, 5, 5]]  # clamped at the ends
    t = with_context(torch.from_numpy(stack), range(6), 1)
    assert isinstance(t, torch.Tensor) and t.shape == (6, 3, 2, 3)
    assert torch.equal(t[:, 1], torch.from_numpy(stack))
    assert with_context(stack, [4], 0).shape == (1, 1, 2, 3)
