import numpy as np
import pytest
import torch
from helpers import TEST_CONFORM, TEST_SCHEME, phantom_files

from quicknat.data.manifest import Scan
from quicknat.data.slices import (
    AugmentConfig,
    SliceDataset,
    VolumeCache,
    edge_map,
    median_frequency_weights,
    weight_map,
)
from quicknat.labels import LabelClass, LabelScheme


def test_weight_map_by_hand_with_non_contiguous_ids():
    scheme = LabelScheme("hand", (LabelClass("bg", 0), LabelClass("Left-A", 17, partner="Right-A"),
                                  LabelClass("Right-A", 53, partner="Left-A"), LabelClass("B", 1000)))
    ids = np.array([[0, 0, 0, 0],
                    [0, 17, 17, 0],
                    [0, 17, 17, 0],
                    [0, 0, 1000, 53]])
    cls, unknown = scheme.encode(ids)
    assert not unknown and cls.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 3, 2]]
    counts = np.bincount(cls.ravel(), minlength=4)  # [10, 4, 1, 1]
    w = median_frequency_weights(counts, cap=10)
    # frequencies 10/16, 4/16, 1/16, 1/16; median = 2.5/16 -> weights 0.25, 0.625, 2.5, 2.5
    np.testing.assert_allclose(w, [0.25, 0.625, 2.5, 2.5])
    np.testing.assert_allclose(median_frequency_weights(counts, cap=1.0), [0.25, 0.625, 1.0, 1.0])
    # tempered (weight_power): square roots of the same ratios; power 0: every class seen weighs 1
    np.testing.assert_allclose(median_frequency_weights(counts, cap=10, power=0.5),
                               [0.5, 0.625**0.5, 2.5**0.5, 2.5**0.5])
    np.testing.assert_allclose(median_frequency_weights(np.array([10, 0, 1, 1]), power=0.0), [1.0, 0.0, 1.0, 1.0])
    edges = edge_map(cls)
    expected = np.array([[0, 1, 1, 0],
                         [1, 1, 1, 1],
                         [1, 1, 1, 1],
                         [0, 1, 1, 1]], dtype=bool)
    assert np.array_equal(edges, expected)
    wm = weight_map(cls, w, w0=2.0)
    assert wm[0, 0] == pytest.approx(0.25) and wm[1, 1] == pytest.approx(2.625)
    assert wm[3, 2] == pytest.approx(4.5) and wm[3, 3] == pytest.approx(4.5)
    assert np.isclose(median_frequency_weights([5, 0, 5])[1], 0.0)  # unseen class


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("slices")
    scans = []
    for n in range(2):
        ip, lp = phantom_files(d, 40 + n, shape=(80, 80, 80), spacing=(2.0, 2.0, 2.0))
        scans.append((Scan(f"s{n}", f"s{n}", str(ip), str(lp)), ip, lp))
    return VolumeCache(scans, TEST_SCHEME, TEST_CONFORM)


def test_cache_conforms_like_segment(cache):
    assert cache.images[0].shape == TEST_CONFORM.shape and cache.images[0].dtype == np.float16
    assert cache.classes[0].dtype == np.uint8 and cache.classes[0].max() < TEST_SCHEME.num_classes
    assert 16 in cache.unknown  # brain stem reported as unknown to this scheme


def test_cache_folder_round_trip(tmp_path, cache):
    from helpers import phantom_files as pf

    ip, lp = pf(tmp_path, 40, shape=(80, 80, 80), spacing=(2.0, 2.0, 2.0))
    scans = [(Scan("s0", "s0", str(ip), str(lp)), ip, lp)]
    a = VolumeCache(scans, TEST_SCHEME, TEST_CONFORM, cache_dir=tmp_path / "c")
    b = VolumeCache(scans, TEST_SCHEME, TEST_CONFORM, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2
    assert isinstance(b.images[0], np.memmap)
    assert np.array_equal(np.asarray(a.classes[0]), np.asarray(b.classes[0]))
    assert np.array_equal(np.asarray(a.classes[0]), cache.classes[0])


def test_slices_drop_empty_and_sagittal_merges(cache):
    cor = SliceDataset(cache, "coronal")
    sag = SliceDataset(cache, "sagittal")
    assert 0 < len(cor) < 2 * 64
    item = cor[0]
    assert item["image"].shape == (1, 64, 64) and item["label"].dtype == torch.int64
    assert item["weight"].shape == (64, 64) and float(item["weight"].min()) >= 0
    labels = torch.cat([sag[i]["label"].flatten() for i in range(len(sag))])
    assert int(labels.max()) < TEST_SCHEME.merged_lr().num_classes == 4
    for i in range(len(sag)):
        frac = (sag[i]["label"] > 0).float().mean()
        assert frac >= 0.002


def test_augmentation_is_seeded_and_flip_swaps_sides(cache):
    aug = AugmentConfig(flip=1.0, rotation=0.0, scaling=0.0, elastic=0.0, bias=0.0, gamma=0.0, noise=0.0)
    plain = SliceDataset(cache, "coronal")
    flipped = SliceDataset(cache, "coronal", augment=aug)
    i = len(plain) // 2
    a, b = plain[i], flipped[i]
    # mirrored image; Left-White (1) became Right-White (2) on the other side
    assert torch.allclose(b["image"], a["image"].flip(1), atol=1e-6)
    lw = TEST_SCHEME.class_of_label(2)
    rw = TEST_SCHEME.class_of_label(41)
    assert torch.equal(b["label"] == rw, (a["label"] == lw).flip(0))
    full = SliceDataset(cache, "coronal", augment=AugmentConfig(elastic=1.0), seed=5)
    x1, x2 = full[i]["image"], full[i]["image"]
    assert torch.equal(x1, x2)
    full.set_epoch(1)
    assert not torch.equal(x1, full[i]["image"])
    assert set(full[i]["label"].unique().tolist()) <= set(range(TEST_SCHEME.num_classes))


def test_manifest_splits_and_all():
    from quicknat.data.manifest import Manifest

    scans = [Scan(f"s{i}", f"s{i}", f"s{i}.nii.gz", f"s{i}_seg.nii.gz") for i in range(5)]
    m = Manifest("d", "aseg33", scans, {"train": ["s0", "s1", "s2"], "validation": ["s3"], "test": ["s4"]})
    assert [s.id for s in m.scans_in("all")] == ["s0", "s1", "s2", "s3", "s4"]
    assert [s.id for s in m.scans_in("train")] == ["s0", "s1", "s2"]
    assert [s.id for s in m.scans_in("test")] == ["s4"]
    with pytest.raises(ValueError, match="split must be one of"):
        m.scans_in("bogus")
