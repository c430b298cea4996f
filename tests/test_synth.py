import numpy as np
import pytest
from helpers import TEST_SCHEME, phantom_files

from quicknat.conform import ConformSettings
from quicknat.data.phantom import make_phantom
from quicknat.data.synth import LabelMapSynth, SynthConfig, SynthSliceDataset
from quicknat.labels import ASEG33

S = ConformSettings(voxel_size=2.0, shape=(80, 80, 80))
QUIET = dict(bias_std=0.0, thick_prob=0.0, blur_max=0.0, noise_max=0.0, gamma_std=0.0, deform_std=0.0,
             rotation=0.0, scaling=0.0, shearing=0.0, translation=0.0)


@pytest.fixture(scope="module")
def head():
    _, lab = make_phantom((120, 120, 120), (1.5, 1.5, 1.5), "LIA", seed=3)
    arr = lab.array.copy()
    img, _ = make_phantom((120, 120, 120), (1.5, 1.5, 1.5), "LIA", seed=3)
    scalp = (arr == 0) & (img.array > 40)
    arr[scalp] = 502  # a non-brain head label, as in SynthSeg's maps
    return [(arr, lab.affine)]


def test_seeded_and_valid(head):
    s = LabelMapSynth(head, ASEG33, S)
    for view, hw in (("coronal", (80, 80)), ("axial", (80, 80)), ("sagittal", (80, 80))):
        a_img, a_cls = s.sample(view, 7)
        b_img, b_cls = s.sample(view, 7)
        c_img, _ = s.sample(view, 8)
        assert a_img.shape == hw and a_cls.shape == hw
        assert np.array_equal(a_img, b_img) and np.array_equal(a_cls, b_cls)
        assert not np.array_equal(a_img, c_img)
        assert a_img.min() >= 0 and a_img.max() <= 1 and a_cls.max() < ASEG33.num_classes


def test_random_slices_are_not_empty(head):
    s = LabelMapSynth(head, ASEG33, S)
    for view in ("coronal", "axial", "sagittal"):
        for seed in range(8):
            _, cls = s.sample(view, 100 + seed)
            assert (cls > 0).mean() >= 0.002, (view, seed)


def test_t1_ordering_and_skull_removal(head):
    t1 = LabelMapSynth(head, ASEG33, S, SynthConfig(t1_share=1.0, strip_prob=0.0, flip=0.0, **QUIET))
    img, cls = t1.sample("coronal", 1, slice_index=45)
    wm, gm = img[cls == ASEG33.class_of_label(2)].mean(), img[cls == ASEG33.class_of_label(3)].mean()
    csf = img[cls == ASEG33.class_of_label(24)].mean()
    assert wm > gm > csf
    head_mask = np.take(head[0][0], 45, axis=2) == 502  # LIA: coronal slices along axis 2, same grid
    kept = LabelMapSynth(head, ASEG33, S, SynthConfig(t1_share=1.0, strip_prob=0.0, flip=0.0, **QUIET))
    stripped = LabelMapSynth(head, ASEG33, S, SynthConfig(t1_share=1.0, strip_prob=1.0, flip=0.0, **QUIET))
    a, c = kept.sample("coronal", 2, slice_index=45)
    b, _ = stripped.sample("coronal", 2, slice_index=45)
    outside = (c == 0) & (a > 0.05)
    assert outside.sum() > 50 and (b[outside] == 0).mean() > 0.95
    assert head_mask.any()


def test_flip_swaps_sides(head):
    no = LabelMapSynth(head, ASEG33, S, SynthConfig(flip=0.0, **QUIET))
    yes = LabelMapSynth(head, ASEG33, S, SynthConfig(flip=1.0, **QUIET))
    _, a = no.sample("coronal", 3, slice_index=40)
    _, b = yes.sample("coronal", 3, slice_index=40)
    # a mirrored brain with its sides swapped: still a plausible brain, left labels on the left
    swap = ASEG33.lr_swap_index()
    assert (b == swap[a[::-1]]).mean() > 0.995
    left = ASEG33.class_of_label(2)
    assert np.argwhere(a == left)[:, 0].mean() > 40 and np.argwhere(b == left)[:, 0].mean() > 40


def test_dataset_crop_weights_and_sagittal_merge(head):
    s = LabelMapSynth(head, ASEG33, S)
    w = np.ones(19, np.float32)
    ds = SynthSliceDataset(s, "sagittal", w, 2.0, length=6, seed=1, crop=48)
    item = ds[0]
    assert item["image"].shape == (1, 48, 48) and item["label"].max() < 19
    assert float(item["weight"].min()) >= 1.0
    ds.set_epoch(1)
    assert len(ds) == 6


def test_synthetic_training_path(tmp_path):
    from helpers import tiny_config

    from quicknat.checkpoint import load_checkpoint
    from quicknat.data.manifest import Manifest, Scan
    from quicknat.train import train

    scans = []
    for n in range(3):
        ip, lp = phantom_files(tmp_path, 60 + n, shape=(64, 64, 64), spacing=(2.5, 2.5, 2.5))
        ip.unlink()
        scans.append(Scan(f"m{n}", f"m{n}", None, lp.name))
    m = Manifest("labelmaps", TEST_SCHEME.to_dict(), scans,
                 {"seed": 0, "train": ["m0", "m1"], "validation": ["m2"], "test": []}).save(tmp_path / "manifest.json")
    cfg = tiny_config(epochs=1, steps_per_epoch=3, crop=32)
    run = train(m, tmp_path / "run", "axial", cfg, device="cpu")
    ck = load_checkpoint(run / "axial.pt")
    assert ck.provenance["data"]["synthetic"] is True and ck.provenance["data"]["train_scans"] == 2
