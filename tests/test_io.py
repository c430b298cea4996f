import gzip

import nibabel as nib
import numpy as np
import pytest

from quicknat.errors import QuicknatInputError
from quicknat.io import analyze_affine, load_volume, save_volume, stem


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz", ".mgh"])
def test_formats_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, 1.2, -3], [-0.9, 0, 0, 4], [0, 1.1, 0, 5], [0, 0, 0, 1]])
    p = save_volume(data, affine, tmp_path / f"v{suffix}")
    v = load_volume(p)
    assert v.shape == (5, 6, 7)
    np.testing.assert_allclose(v.array, data, rtol=1e-6)
    np.testing.assert_allclose(v.affine, affine, atol=1e-5)
    assert v.path == p
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temp files left


def test_nifti_header_kept(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["descrip"] = b"hello"
    img.set_qform(img.affine, code=2)
    img.set_sform(img.affine, code=4)
    nib.save(img, str(tmp_path / "a.nii.gz"))
    v = load_volume(tmp_path / "a.nii.gz")
    save_volume(np.zeros(v.shape, np.int16), v.affine, tmp_path / "b.nii.gz", header=v.header, dtype=np.int16)
    h = nib.load(str(tmp_path / "b.nii.gz")).header
    assert h["descrip"].tobytes().rstrip(b"\0") == b"hello"
    assert int(h["sform_code"]) == 4 and int(h["qform_code"]) == 2
    assert h.get_data_dtype() == np.int16
    assert np.array_equal(nib.load(str(tmp_path / "b.nii.gz")).affine, v.affine)


def test_singleton_4th_dimension_squeezed(tmp_path):
    v = load_volume(_nifti(tmp_path / "a.nii.gz", np.ones((4, 5, 6, 1), np.float32)))
    assert v.shape == (4, 5, 6) and v.array.ndim == 3


def test_analyze_radiological_right_is_right(tmp_path):
    # OASIS T88_111 images are radiological Analyze: low first index = subject's right.
    data = np.zeros((20, 24, 18), np.int16)
    data[2:6, 10:14, 8:10] = 100  # a marker in the right hemisphere
    hdr = nib.AnalyzeHeader()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    nib.save(nib.AnalyzeImage(data, None, hdr), str(tmp_path / "OAS1_0001_MR1_t88.img"))
    assert (tmp_path / "OAS1_0001_MR1_t88.hdr").exists()
    v = load_volume(tmp_path / "OAS1_0001_MR1_t88.img")
    np.testing.assert_array_equal(v.affine, analyze_affine(data.shape, (1, 1, 1)))
    idx = np.argwhere(v.array > 0).mean(0)
    world = v.affine[:3, :3] @ idx + v.affine[:3, 3]
    assert world[0] > 0, "the right hemisphere must land at positive RAS x"
    # converting to NIfTI keeps that
    save_volume(v.array, v.affine, tmp_path / "conv.nii.gz")
    w = load_volume(tmp_path / "conv.nii.gz")
    idx = np.argwhere(w.array > 0).mean(0)
    assert (w.affine[:3, :3] @ idx + w.affine[:3, 3])[0] > 0
    assert nib.aff2axcodes(w.affine) == ("L", "A", "S")


def test_analyze_missing_half(tmp_path):
    (tmp_path / "x.img").write_bytes(b"\0" * 64)
    with pytest.raises(QuicknatInputError, match=r"x\.img: Analyze volume is missing its \.hdr"):
        load_volume(tmp_path / "x.img")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "file does not exist"),
        (lambda p: p.write_text("not an image"), "cannot read"),
        (lambda p: _nifti(p, np.ones((4, 5), np.float32)), "2D"),
        (lambda p: _nifti(p, np.ones((4, 5, 1), np.float32)), "2D"),
        (lambda p: _nifti(p, np.ones((4, 5, 6, 3), np.float32)), "4D"),
        (lambda p: _nifti(p, np.full((4, 5, 6), np.nan, np.float32)), "only NaN/Inf"),
        (lambda p: _nifti(p, np.where(np.eye(4, 6)[:, :, None] > 0, np.inf, 1).repeat(3, 2).astype(np.float32)),
         "NaN/Inf"),
    ],
)
def test_bad_inputs_raise_one_clear_error(tmp_path, make, message):
    p = tmp_path / "bad.nii.gz"
    make(p)
    with pytest.raises(QuicknatInputError) as info:
        load_volume(p)
    assert str(p) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_and_negative_voxel_sizes(tmp_path):
    for zooms in [(1.0, 0.0, 1.0), (1.0, -2.0, 1.0)]:
        img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
        img.header["pixdim"][1:4] = zooms
        img.header["qform_code"] = 0
        img.header["sform_code"] = 0
        p = tmp_path / "z.nii"
        nib.save(img, str(p))
        with pytest.raises(QuicknatInputError, match="voxel sizes|degenerate"):
            load_volume(p)


def test_truncated_file(tmp_path):
    p = _nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(QuicknatInputError, match="t.nii.gz"):
        load_volume(p)


def test_stem():
    assert stem("a/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert stem("x.mgz") == "x"
    assert stem("OAS1_0001.img") == "OAS1_0001"
