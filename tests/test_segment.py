import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TEST_CONFORM, TEST_SCHEME, dice_per_class, phantom_files

from quicknat.checkpoint import Model, load_model
from quicknat.data.phantom import make_phantom
from quicknat.io import load_volume
from quicknat.runner import segment_files
from quicknat.segment import Segmenter

PHANTOM = {"shape": (96, 96, 96), "spacing": (1.5, 1.5, 1.5)}


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model, device="cpu", flip=False)  # flip averaging: its own test


def test_fitted_model_segments_held_back_phantom(tiny_model):
    img, lab = make_phantom(seed=10, **PHANTOM)
    ref, unknown = TEST_SCHEME.encode(lab.array)
    assert 16 in unknown  # brain stem is not in the test scheme
    full = load_model(tiny_model)
    scores = {}
    for views in (("coronal",), ("axial",), ("sagittal",), ("coronal", "axial", "sagittal")):
        model = Model({v: full.views[v] for v in views}, {v: full.weights[v] for v in views})
        res = Segmenter(model, device="cpu", flip=False).segment(img)
        scores[views] = np.mean(list(dice_per_class(res.classes, ref, range(1, TEST_SCHEME.num_classes)).values()))
    print({"+".join(k): round(v, 3) for k, v in scores.items()})
    agg = scores[("coronal", "axial", "sagittal")]
    assert agg >= 0.9
    assert agg >= max(v for k, v in scores.items() if len(k) == 1)


@pytest.mark.parametrize(
    "orientation, spacing, rotation",
    [("LAS", (1.5, 1.5, 1.5), (0, 0, 0)), ("RAS", (1.5, 1.5, 1.5), (0, 0, 0)), ("LIA", (2.5, 2.5, 2.5), (0, 0, 0)),
     ("RAS", (1.5, 1.5, 1.5), (15, -10, 5)), ("LPS", (0.9, 1.2, 3.0), (0, 0, 0))],
)
def test_output_geometry_equals_input(tmp_path, segmenter, orientation, spacing, rotation):
    shape = tuple(int(round(140 / s)) for s in spacing)
    ip, lp = phantom_files(tmp_path, 11, shape=shape, spacing=spacing, orientation=orientation, rotation_deg=rotation)
    outcomes = segment_files([ip], tmp_path / "out", segmenter=segmenter).outcomes
    assert outcomes[0].error is None
    seg = nib.load(str(tmp_path / "out" / "ph11_t1_seg.nii.gz"))
    src = nib.load(str(ip))
    assert seg.shape == src.shape
    assert np.array_equal(seg.affine, src.affine)
    assert np.issubdtype(seg.get_data_dtype(), np.integer)
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= set(TEST_SCHEME.label_ids.tolist())
    # the segmentation matches the phantom in the scan's own space
    ref, _ = TEST_SCHEME.encode(load_volume(lp).array)
    got, _ = TEST_SCHEME.encode(np.asarray(seg.dataobj))
    dice = dice_per_class(got, ref, range(1, TEST_SCHEME.num_classes))
    assert np.mean(list(dice.values())) > 0.8, dice


def test_outputs_and_tables(tmp_path, segmenter):
    ip, _ = phantom_files(tmp_path, 12, **PHANTOM)
    vol = load_volume(ip)
    res = segmenter.segment(vol, mc=4, posteriors=True, uncertainty=True)
    # volumes: every structure, native voxel size, then brain (no CSF) and intracranial
    rows = res.volumes()
    assert [r["structure"] for r in rows] == TEST_SCHEME.names[1:] + ["BrainSegVol", "IntracranialVol"]
    counts = np.bincount(res.classes.ravel(), minlength=TEST_SCHEME.num_classes)
    for k, r in enumerate(rows[:-2], start=1):
        assert r["voxels"] == counts[k]
        assert r["volume_mm3"] == pytest.approx(counts[k] * 1.5**3, abs=1e-2)
    csf = TEST_SCHEME.names.index("CSF")
    assert rows[-2]["voxels"] == counts[1:].sum() - counts[csf]
    assert rows[-1]["voxels"] == counts[1:].sum()
    # MC-dropout QC
    qc = {r["structure"]: r for r in res.qc}
    assert set(qc) == set(TEST_SCHEME.names[1:])
    for r in qc.values():
        assert r["passes"] == 4
        if r["mean_volume_mm3"] > 0:
            assert 0 <= r["iou"] <= 1 and r["cv"] >= 0
    assert qc["Left-White"]["iou"] > 0.8 and qc["Left-White"]["cv"] < 0.1
    # posteriors sum to one; uncertainty is an entropy
    assert res.posteriors.shape == (TEST_SCHEME.num_classes, *vol.shape)
    np.testing.assert_allclose(res.posteriors.sum(0), 1.0, atol=1e-4)
    assert res.uncertainty.shape == vol.shape and res.uncertainty.min() >= 0
    assert res.uncertainty.max() <= np.log(TEST_SCHEME.num_classes) + 1e-4
    # MC segmentation agrees with the deterministic one
    det = segmenter.segment(vol)
    assert (det.classes == res.classes).mean() > 0.97


def test_segment_files_writes_everything(tmp_path, segmenter):
    ip, _ = phantom_files(tmp_path / "in", 13, **PHANTOM)
    out = segment_files([ip], tmp_path / "out", segmenter=segmenter, mc=2, posteriors=True, uncertainty=True)
    names = sorted(p.name for p in out.outcomes[0].outputs)
    assert names == sorted(f"ph13_t1_{s}" for s in ("seg.nii.gz", "seg.json", "volumes.csv", "qc.csv", "overlay.png",
                                                   "posteriors.nii.gz", "posteriors.json", "uncertainty.nii.gz"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*names, "volumes.csv", "failures.csv", f"{TEST_SCHEME.name}_lut.txt"])
    with open(tmp_path / "out" / "ph13_t1_volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["structure", "label", "voxels", "volume_mm3"]
    assert (tmp_path / "out" / "ph13_t1_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_deterministic_and_batch_size_invariant(tmp_path, tiny_model):
    img, _ = make_phantom(seed=14, **PHANTOM)
    a = Segmenter(tiny_model, device="cpu", batch_size=1, flip=False).segment(img).classes
    b = Segmenter(tiny_model, device="cpu", batch_size=7, flip=False).segment(img).classes
    assert (a == b).mean() > 0.999


def test_conform_settings_come_from_the_model(segmenter):
    assert segmenter.settings == TEST_CONFORM and segmenter.scheme == TEST_SCHEME


def test_flip_averaging_is_left_right_equivariant(tmp_path, tiny_model):
    from helpers import TEST_SCHEME, conformed_pair

    from quicknat.checkpoint import load_model, save_model

    # the coronal view alone: with flip averaging, mirroring the input mirrors the output
    # (sides swapped) exactly; without it, only approximately
    folder = tmp_path / "coronal_only"
    folder.mkdir()
    (folder / "coronal.pt").write_bytes((tiny_model / "coronal.pt").read_bytes())
    save_model(folder, {"coronal": folder / "coronal.pt"})
    model = load_model(folder)
    img, _, _, _ = conformed_pair(4, TEST_SCHEME, model.conform, shape=(64, 64, 64), spacing=(2.5, 2.5, 2.5))
    swap = torch.as_tensor(TEST_SCHEME.lr_swap_index())
    errors = {}
    for flip in (False, True):
        seg = Segmenter(model, device="cpu", flip=flip)
        p = seg.probabilities(img)
        q = seg.probabilities(np.ascontiguousarray(img[::-1]))
        errors[flip] = float((q.flip(1)[swap] - p).abs().max())
    assert errors[True] < 1e-4 < errors[False], errors


def test_keep_brain_component_drops_a_scalp_rim_and_keeps_the_brain():
    from quicknat.cleanup import keep_brain_component

    zz, yy, xx = np.mgrid[:40, :40, :40]
    d = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2
    brain, rim = d <= 10**2, (d <= 14**2) & (d >= 13**2)  # a rim 3 voxels off the brain ...
    bridge = (zz == 20) & (yy == 20) & (xx >= 28) & (xx <= 34)  # ... joined to it by a thin bridge
    labelled = torch.from_numpy(brain | rim | bridge)
    probs = torch.zeros((3, 40, 40, 40))
    probs[0] = 1
    probs[:, labelled] = torch.tensor([0.1, 0.6, 0.3])[:, None]
    removed = keep_brain_component(probs, voxel_size=2.0)
    out = (probs.argmax(0) > 0).numpy()
    assert (out & brain).sum() == brain.sum() and not (out & rim).any() and removed >= rim.sum()
    assert torch.allclose(probs.sum(0), torch.ones(40, 40, 40))


def test_limit_csf_drops_csf_far_from_the_brain_and_nothing_else():
    from quicknat.cleanup import limit_csf
    from quicknat.labels import LabelClass, LabelScheme, get_scheme

    scheme = get_scheme("aseg33")
    csf, wm = scheme.names.index("CSF"), scheme.names.index("Left-Cerebral-White-Matter")
    zz, yy, xx = np.mgrid[:40, :40, :40]
    d = np.sqrt((zz - 15) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2)
    brain, shell = d <= 8, (d > 8) & (d <= 10)  # CSF up to 2 voxels (4 mm) off the brain ...
    far = (zz >= 34) & (abs(yy - 20) <= 2) & (abs(xx - 20) <= 2)  # ... and 9+ voxels (18+ mm) below it
    classes = np.zeros((40, 40, 40), np.int64)
    classes[brain], classes[shell | far] = wm, csf
    probs = torch.nn.functional.one_hot(torch.from_numpy(classes), scheme.num_classes).permute(3, 0, 1, 2).float()
    before = probs.clone()
    assert limit_csf(probs, scheme, voxel_size=2.0, reach_mm=0) == 0 and torch.equal(probs, before)
    removed = limit_csf(probs, scheme, voxel_size=2.0, reach_mm=6.0)
    out = probs.argmax(0).numpy()
    assert removed == far.sum() and (out[far] == 0).all()
    assert (out[shell] == csf).all() and (out[brain] == wm).all()
    assert torch.allclose(probs.sum(0), torch.ones(40, 40, 40))
    no_csf = LabelScheme("brain", (LabelClass("Unknown", 0, (0, 0, 0)), LabelClass("Brain", 2, (9, 9, 9))))
    two = torch.stack([before[0], 1 - before[0]])  # CSF is no class of its own there: nothing changes
    assert limit_csf(two, no_csf, voxel_size=2.0, reach_mm=6.0) == 0 and torch.equal(two[1], 1 - before[0])


def test_view_probabilities_weighted_are_the_aggregate(tiny_model):
    from helpers import conformed_pair

    model = load_model(tiny_model)
    weighted = Model(model.views, {"coronal": 1.0, "axial": 2.0, "sagittal": 3.0}, model.path)
    seg = Segmenter(weighted, device="cpu", flip=False)
    img, _, _, _ = conformed_pair(5, TEST_SCHEME, model.conform, shape=(48, 48, 48), spacing=(2.5, 2.5, 2.5))
    per_view = seg.view_probabilities(img)
    assert set(per_view) == {"coronal", "axial", "sagittal"}
    assert torch.allclose(per_view["coronal"].sum(0), torch.ones(1))  # a view with sides sums to one
    acc = sum(w * per_view[v] for v, w in weighted.weights.items())
    acc /= acc.sum(0, keepdim=True)
    assert torch.allclose(acc, seg.probabilities(img), atol=1e-5)
    # the weights matter: sagittal alone differs from the aggregate
    assert not torch.allclose(per_view["sagittal"] / per_view["sagittal"].sum(0, keepdim=True), acc, atol=1e-3)


def test_context_views_see_the_whole_volume_beyond_the_head_box(tmp_path, tiny_model):
    """2.5D views (neighbouring slices as channels, some weight on the neighbours): the head-box
    path (only slices crossing the box run) gives what the reference path gives, so the slices
    at the box's ends see their true neighbours; and a 2.5D view whose neighbour weights are zero
    segments exactly as the 2D view it was widened from."""
    from dataclasses import replace

    from quicknat.model import QuickNAT, widen_input
    from quicknat.segment import SpeedPaths

    model = load_model(tiny_model)

    def widened(noise: float) -> Model:
        views = {}
        for name, ck in model.views.items():
            cfg = replace(ck.config, in_channels=3)
            state = widen_input(ck.state_dict, QuickNAT(cfg).state_dict(), 1, 3)
            g = torch.Generator().manual_seed(0)
            w = state["encoders.0.dense.conv1.weight"]
            w[:, [0, 2]] += noise * torch.randn(w[:, [0, 2]].shape, generator=g)
            views[name] = replace(ck, config=cfg, state_dict=state)
        return Model(views, model.weights, model.path)

    img, _ = phantom_files(tmp_path, seed=8, shape=(56, 60, 52), spacing=(2.3, 2.1, 2.4))
    vol = load_volume(img)
    flat = Segmenter(model, device="cpu").segment(vol)
    same = Segmenter(widened(0.0), device="cpu").segment(vol)
    assert np.array_equal(flat.classes, same.classes)
    noisy = widened(0.5)
    fast = Segmenter(noisy, device="cpu").segment(vol)
    ref = Segmenter(noisy, device="cpu", paths=SpeedPaths.reference()).segment(vol)
    d = dice_per_class(fast.classes, ref.classes, range(1, TEST_SCHEME.num_classes))
    assert min(d.values()) >= 0.999, d
    assert not np.array_equal(fast.classes, flat.classes)  # the neighbours count


def test_views_on_different_grids_aggregate_on_the_finest(tiny_model):
    """A model whose views run on different grids: each grid's views run on the scan conformed
    to it, and the coarser grid's probabilities are resampled onto the finest before the sum."""
    from dataclasses import replace

    img, lab = make_phantom(seed=10, **PHANTOM)
    ref, _ = TEST_SCHEME.encode(lab.array)
    full = load_model(tiny_model)
    one = Segmenter(full, device="cpu", flip=False).segment(img)

    def regrid(view, **change):
        return replace(full.views[view], conform=replace(TEST_CONFORM, **change))

    # the same voxel size on a larger grid: the resampling is an exact shift, so the segmentation
    # is the one-grid segmentation (up to what the networks see beyond the old grid's edge)
    wide = Model({"coronal": full.views["coronal"], "axial": regrid("axial", shape=(96, 96, 96)),
                  "sagittal": full.views["sagittal"]}, full.weights)
    assert wide.conform == TEST_CONFORM and len(wide.grids) == 2
    res = Segmenter(wide, device="cpu", flip=False).segment(img)
    assert res.classes.shape == img.shape and res.plan.settings == TEST_CONFORM
    agree = dice_per_class(res.classes, one.classes, range(1, TEST_SCHEME.num_classes))
    assert min(agree.values()) > 0.99, agree
    # a finer grid for one view: the others (coarser) are resampled onto it, and the result still
    # matches the phantom
    fine = replace(TEST_CONFORM, voxel_size=2.0, shape=(80, 80, 80))
    mixed = Model({"coronal": full.views["coronal"], "axial": regrid("axial", voxel_size=2.0, shape=(80, 80, 80)),
                   "sagittal": full.views["sagittal"]}, full.weights)
    seg = Segmenter(mixed, device="cpu", flip=False)
    assert seg.settings == fine
    res = seg.segment(img, mc=2)  # the MC path aggregates the grids too
    assert res.conformed_classes.shape == fine.shape and res.classes.shape == img.shape
    dice = dice_per_class(res.classes, ref, range(1, TEST_SCHEME.num_classes))
    assert np.mean(list(dice.values())) > 0.85, dice
    with pytest.raises(ValueError, match="several grids"):
        seg.probabilities(res.conformed_image)
    # per view, for choosing weights: given the scan, each view on its own grid, all on the finest;
    # their weighted sum is the segmentation (no clean-ups: they run after the sum)
    plain = Segmenter(mixed, device="cpu", flip=False, clean=False, csf_reach_mm=0.0)
    per_view = plain.view_probabilities(img)
    assert set(per_view) == set(mixed.views) and all(p.shape[1:] == fine.shape for p in per_view.values())
    assert torch.allclose(per_view["coronal"].sum(0), torch.ones(1), atol=1e-4)  # resampled, background filled
    acc = sum(plain.weights[v] * p for v, p in per_view.items())
    whole = plain.segment(img).conformed_classes
    agree = dice_per_class(acc.argmax(0).numpy(), whole, range(1, TEST_SCHEME.num_classes))
    assert min(agree.values()) > 0.99, agree
    assert torch.allclose(plain.probabilities(img), acc / acc.sum(0, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError, match="several grids"):
        plain.view_probabilities(res.conformed_image)
