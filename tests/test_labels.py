import numpy as np
import pytest

from quicknat.errors import QuicknatInputError
from quicknat.labels import (
    ASEG33,
    ASEG_TO_TISSUE,
    TISSUE,
    LabelScheme,
    get_scheme,
    merge_labels,
    scheme_from_lut,
)

ASEG_IDS = [0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 41, 42, 43, 44, 46, 47, 49, 50,
            51, 52, 53, 54, 58, 60]


def test_aseg33_contents():
    assert ASEG33.num_classes == 33
    assert ASEG33.label_ids.tolist() == ASEG_IDS
    assert ASEG33.names[1] == "Left-Cerebral-White-Matter"
    assert ASEG33.classes[ASEG33.class_of_label(17)].partner == "Right-Hippocampus"
    assert ASEG33.classes[ASEG33.class_of_label(16)].partner is None
    assert tuple(ASEG33.classes[ASEG33.class_of_label(3)].color) == (205, 62, 78)


def test_encode_decode_round_trip_and_unknown():
    ids = np.array([[0, 2, 41, 9], [48, 17, 502, 24]], dtype=np.float32)  # float storage as in label maps
    cls, unknown = ASEG33.encode(ids)
    assert cls.dtype == np.uint8
    assert unknown == {502: 1}
    dec = ASEG33.decode(cls)
    assert dec.tolist() == [[0, 2, 41, 10], [49, 17, 0, 24]]  # 9/48: old thalamus IDs
    with pytest.raises(QuicknatInputError, match="502"):
        ASEG33.encode(ids, unknown="raise", path="x.nii.gz")
    with pytest.raises(QuicknatInputError, match="non-integer"):
        ASEG33.encode(np.array([1.5]))


def test_sagittal_merge_and_expand():
    merged = ASEG33.merged_lr()
    assert merged.num_classes == 19  # background + 14 pairs + 4 midline
    idx = ASEG33.lr_merge_index()
    left, right = ASEG33.class_of_label(17), ASEG33.class_of_label(53)
    assert idx[left] == idx[right]
    assert merged.names[idx[left]] == "Hippocampus"
    assert len(set(idx.tolist())) == 19
    # expansion: a merged probability map is copied to both sides
    p = np.random.default_rng(0).random((2, 19))
    full = p[:, ASEG33.lr_merge_index()]
    assert np.array_equal(full[:, left], full[:, right])
    # merged scheme encodes both sides' IDs to one class
    cls, unk = merged.encode(np.array([17, 53, 16]))
    assert cls[0] == cls[1] and not unk


def test_lr_swap():
    sw = ASEG33.lr_swap_index()
    assert ASEG33.label_ids[sw[ASEG33.class_of_label(2)]] == 41
    assert ASEG33.label_ids[sw[ASEG33.class_of_label(14)]] == 14
    assert np.array_equal(sw[sw], np.arange(33))


def test_tissue_scheme_and_merge():
    assert TISSUE.names == ["Background", "CSF", "Grey-Matter", "White-Matter"]
    assert set(ASEG_TO_TISSUE) == set(ASEG_IDS)
    out = merge_labels(np.array([0, 2, 3, 4, 17, 16, 24, 502]))
    assert out.tolist() == [0, 3, 2, 1, 2, 3, 1, 0]


def test_dict_round_trip():
    for s in (ASEG33, TISSUE, ASEG33.merged_lr()):
        assert LabelScheme.from_dict(s.to_dict()) == s


def test_lut_file(tmp_path):
    p = tmp_path / "my.txt"
    p.write_text(
        "# custom\n0 Unknown 0 0 0 0\n17 Left-Hippocampus 220 216 20 0\n53 Right-Hippocampus 220 216 20 0\n"
        "1001 ctx-lh-bankssts 25 100 40 0\n\n"
    )
    s = scheme_from_lut(p)
    assert s.names == ["Unknown", "Left-Hippocampus", "Right-Hippocampus", "ctx-lh-bankssts"]
    assert s.classes[1].partner == "Right-Hippocampus"
    assert s.merged_lr().num_classes == 3
    assert get_scheme(p) == s
    cls, _ = s.encode(np.array([1001, 53]))
    assert cls.tolist() == [3, 2]
    assert scheme_from_lut(_write(tmp_path / "r.txt", s.to_lut())).label_ids.tolist() == s.label_ids.tolist()
    with pytest.raises(QuicknatInputError, match="line 1"):
        scheme_from_lut(_write(tmp_path / "bad.txt", "x y\n"))
    with pytest.raises(QuicknatInputError):
        get_scheme("nope")


def _write(p, text):
    p.write_text(text)
    return p


def test_scheme_validation():
    from quicknat.labels import LabelClass

    with pytest.raises(ValueError, match="both"):
        LabelScheme("x", (LabelClass("bg", 0), LabelClass("a", 1), LabelClass("b", 2, aliases=(1,))))
    with pytest.raises(ValueError, match="background"):
        LabelScheme("x", (LabelClass("a", 1),))
