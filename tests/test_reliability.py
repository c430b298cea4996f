"""Issue 15: bounded memory on any header, no silent empty result, every bad config or manifest
a one-line error before anything is written, no subject lost from a split, no leftovers."""

import gzip
import json
import logging
import os
import subprocess
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import pytest

from quicknat.checkpoint import load_checkpoint
from quicknat.cli import main
from quicknat.config import load_config
from quicknat.data.manifest import Scan, load_manifest, split_by_subject, split_sizes
from quicknat.data.prepare import prepare_labelmaps
from quicknat.errors import QuicknatInputError
from quicknat.io import atomic_path, load_volume, remove_stale_temps

# --- 1. memory follows the file, not the header -------------------------------------------------

_PEAK = """
import resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)
print(p.stdout.strip())
"""
_LOAD = """
import sys
from quicknat.errors import QuicknatInputError
from quicknat.io import load_volume
try:
    load_volume(sys.argv[1])
except QuicknatInputError as exc:
    print(exc); sys.exit(2)
"""


def _load_in_child(path) -> tuple[int, int, float, str]:
    """Exit code, peak RSS (kB) and seconds of a child that only loads ``path``."""
    code = _LOAD.replace("sys.argv[1]", repr(str(path)))
    out = subprocess.run([sys.executable, "-c", _PEAK, code], capture_output=True, text=True, check=True).stdout
    first, message = (out.splitlines() + [""])[:2]
    rc, rss, seconds = first.split()
    return int(rc), int(rss), float(seconds), message


def _header_bomb(path, shape=(1600, 1600, 1600)) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), 1)
    blob = hdr.binaryblock + b"\0" * 4 + b"\0" * 60  # 416 bytes: header, extension flag, a few voxels
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


@pytest.mark.parametrize("name", ["bomb.nii", "bomb.nii.gz"])
def test_header_claiming_1600_cubed_is_refused_at_once_with_bounded_memory(tmp_path, name):
    path = tmp_path / name
    _header_bomb(path)
    assert path.stat().st_size < 500
    rc, rss_kb, seconds, message = _load_in_child(path)
    assert rc == 2, message
    assert "1600x1600x1600" in message and "over the limit" in message and "QUICKNAT_MAX_VOXELS" in message
    assert rss_kb < 400_000  # the claimed volume alone would be 4 GB
    t = time.perf_counter()
    with pytest.raises(QuicknatInputError, match="over the limit"):
        load_volume(path)
    assert time.perf_counter() - t < 2.0


def test_gzip_bomb_of_a_valid_huge_volume_is_refused(tmp_path):
    """About 300 kB of gzip that would expand to a valid 700^3 uint8 volume (343 MB)."""
    shape = (700, 700, 700)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    path = tmp_path / "bomb.nii.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(comp.compress(hdr.binaryblock + b"\0" * 4))
        left = int(np.prod(shape))
        while left:
            n = min(left, len(chunk))
            f.write(comp.compress(chunk[:n]))
            left -= n
        f.write(comp.flush())
    assert path.stat().st_size < 2_000_000
    rc, rss_kb, _, message = _load_in_child(path)
    assert rc == 2 and "343 M voxels, over the limit of 268 M" in message
    assert rss_kb < 400_000
    # the limit can be raised, per call or for the process
    vol = load_volume(path, limit=400_000_000)
    assert vol.shape == shape and vol.array.dtype == np.uint8
    del vol


def test_truncated_uncompressed_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "short.nii"
    _header_bomb(path, shape=(300, 300, 300))
    with pytest.raises(QuicknatInputError, match="is truncated: its header needs 270000[0-9]+ bytes"):
        load_volume(path)


def test_scaled_data_is_read_as_float32_not_float64(tmp_path):
    img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = load_volume(tmp_path / "scaled.nii")
    assert vol.array.dtype == np.float32
    assert np.allclose(vol.array, np.arange(27).reshape(3, 3, 3) * 0.5 + 10.0)


# --- 2. empty or flat input is a failure, not a result ------------------------------------------

def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize(("array", "why"), [
    (np.zeros((24, 24, 24), np.float32), "is a constant image (every voxel is 0)"),
    (np.full((24, 24, 24), 37, np.int16), "is a constant image (every voxel is 37)"),
    (np.random.default_rng(0).random((24, 24, 24)) * 1e300, "beyond what float32 can scale"),
])
def test_segment_refuses_images_with_nothing_to_segment(tmp_path, capsys, array, why):
    scan = _save(tmp_path / "scan.nii.gz", array)
    assert main(["segment", str(scan), "-o", str(tmp_path / "out"), "--no-overlay"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count(str(scan)) == 1 and why in err[0]
    assert not list((tmp_path / "out").glob("scan_*"))  # nothing of the scan; the run's failures.csv names it
    assert str(scan) in (tmp_path / "out" / "failures.csv").read_text()


def test_a_segmentation_with_almost_no_brain_is_a_failure(tmp_path):
    from quicknat.segment import Segmenter

    # an 8 mm cube holds 0.5 mL: whatever the network labels is below the 1 mL floor
    img = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32) * 100
    vol = load_volume(_save(tmp_path / "cube.nii.gz", img))
    with pytest.raises(QuicknatInputError, match="found almost no brain"):
        Segmenter(flip=False).segment(vol)


# --- 3. splits keep every subject ---------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 13))
def test_split_keeps_every_subject(n):
    scans = [Scan(f"s{i}", f"s{i}", None, f"s{i}.nii.gz") for i in range(n)]
    split = split_by_subject(scans, seed=3)
    parts = [split[k] for k in ("train", "validation", "test")]
    ids = [i for p in parts for i in p]
    assert sorted(ids) == sorted(s.id for s in scans)  # each exactly once
    sizes = tuple(len(p) for p in parts)
    assert sizes == split_sizes(n)
    if n == 1:
        assert sizes == (1, 0, 0)
    elif n == 2:
        assert sizes == (1, 1, 0)
    else:
        assert min(sizes) >= 1
    assert split == split_by_subject(scans, seed=3)  # seeded


def test_prepare_labelmaps_with_three_maps_loses_no_one(tmp_path, capsys):
    lab = np.zeros((12, 12, 12), np.int16)
    lab[3:9, 3:9, 3:9] = 2
    lab[5:7, 5:7, 5:7] = 4
    for i in range(3):
        _save(tmp_path / f"map{i}.nii.gz", lab)
    m = load_manifest(prepare_labelmaps(tmp_path))
    assert sorted(i for k in ("train", "validation", "test") for i in m.split[k]) == ["map0", "map1", "map2"]


# --- 4, 5. configs and manifests validated before anything is written ----------------------------

@pytest.mark.parametrize(("text", "key", "expected"), [
    ('num_filters: "eight"', "num_filters", "an integer"),
    ('epochs: "2"', "epochs", "an integer"),
    ("conform: 4", "conform", "a mapping"),
    ("synth: {nosuch: 1}", "synth.nosuch", "unknown key"),
    ("- a\n- b", "top level", "a mapping"),
    ("optimizer: rmsprop", "optimizer", "'sgd' or 'adam'"),
    ("conform: {voxel_sise: 4}", "conform.voxel_sise", "unknown key"),
    ("augment: {flip: x}", "augment.flip", "a number"),
    ("batch_size: 0", "batch_size", ">= 1"),
])
def test_bad_config_is_one_line_before_any_run_folder(tmp_path, capsys, text, key, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "manifest.json"), "-o", str(run), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg) in err[0] and key in err[0] and expected in err[0], err
    assert not run.exists()


def test_config_reads_exponents_as_numbers_and_keeps_good_sections(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("lr: 1e-3\noptimizer: adam\nconform: {voxel_size: 2}\naugment: null\n")
    c = load_config(cfg)
    assert c.lr == 0.001 and c.conform.voxel_size == 2.0 and c.conform.shape == (256, 256, 256)
    assert c.augment is None


def _manifest(tmp_path, **change) -> str:
    d = {"format": "quicknat-manifest", "format_version": 1, "dataset": "x", "scheme": "aseg33",
         "scans": [{"id": "a", "subject": "a", "image": None, "label": "a.nii.gz"}],
         "split": {"train": ["a"], "validation": [], "test": []}}
    d.update(change)
    for k in [k for k, v in change.items() if v is None]:
        del d[k]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize(("change", "expected"), [
    ({"dataset": None}, "manifest key 'dataset'"),
    ({"scans": 5}, "manifest key 'scans': expected a list"),
    ({"split": {"train": ["a", "zz"], "validation": [], "test": []}}, "split.train': expected IDs among"),
    ({"split": {"train": [], "validation": ["a"], "test": []}}, "the train split holds no scans"),
])
def test_bad_manifest_is_one_line_before_any_run_folder(tmp_path, capsys, change, expected):
    manifest = _manifest(tmp_path, **change)
    run = tmp_path / "run"
    assert main(["train", manifest, "-o", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and manifest in err[0], err
    assert not run.exists()


def _label_pair(tmp_path):
    ref = np.zeros((16, 16, 16), np.int16)
    ref[4:12, 4:12, 4:12] = 2
    ref[6:10, 6:10, 6:10] = 4
    return ref, _save(tmp_path / "ref.nii.gz", ref)


@pytest.mark.parametrize(("pred_of", "expected"), [
    (lambda ref: ref.astype(np.float32) + 0.3, "non-integer values"),
    (lambda ref: np.where(ref == 4, -1, ref).astype(np.int16), "negative label ID -1"),
    (lambda ref: np.random.default_rng(0).integers(0, 255, ref.shape).astype(np.int16), "is an image, not a"),
])
def test_evaluate_refuses_what_is_not_a_label_map(tmp_path, capsys, pred_of, expected):
    ref, ref_path = _label_pair(tmp_path)
    pred = _save(tmp_path / "pred.nii.gz", pred_of(ref))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref_path), "-o", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(pred) in err[0] and expected in err[0], err
    assert not (tmp_path / "m.csv").exists()


def test_evaluate_refuses_an_empty_reference_and_warns_about_unknown_ids(tmp_path, capsys, caplog):
    ref, ref_path = _label_pair(tmp_path)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros_like(ref))
    assert main(["evaluate", "--pred", str(ref_path), "--ref", str(empty), "-o", str(tmp_path / "m.csv")]) == 2
    assert "reference is empty" in capsys.readouterr().err
    odd = ref.copy()
    odd[0, 0, :4] = 77  # FreeSurfer's WM hypointensities: outside aseg33, scored as background
    pred = _save(tmp_path / "pred.nii.gz", odd)
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--pred", str(pred), "--ref", str(ref_path), "-o", str(tmp_path / "m.csv")]) == 0
    assert "77 (4 voxels)" in caplog.text
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m_summary.csv").exists()


def test_prepare_labelmaps_refuses_t1_images_and_empty_maps(tmp_path):
    (tmp_path / "a").mkdir()
    t1 = np.random.default_rng(0).integers(0, 255, (16, 16, 16)).astype(np.uint8)
    _save(tmp_path / "a" / "t1.nii.gz", t1)
    with pytest.raises(QuicknatInputError, match="is an image, not a label map"):
        prepare_labelmaps(tmp_path / "a")
    (tmp_path / "b").mkdir()
    _save(tmp_path / "b" / "zero.nii.gz", np.zeros((16, 16, 16), np.int16))
    with pytest.raises(QuicknatInputError, match="label map is empty"):
        prepare_labelmaps(tmp_path / "b")


# --- 6. messages --------------------------------------------------------------------------------

def test_checkpoint_errors_never_advise_weights_only_false(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(QuicknatInputError) as info:
        load_checkpoint(evil)
    text = str(info.value)
    assert "weights_only" not in text and "never runs code" in text and "\n" not in text


# --- 7. leftovers and silent contradictions -----------------------------------------------------

def test_temp_files_of_a_killed_write_are_removed_on_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = ("from quicknat.io import atomic_path; import os\n"
            f"cm = atomic_path({str(out / 'best.pt')!r}); tmp = cm.__enter__(); open(tmp, 'w').write('x')\n"
            "os._exit(0)  # as kill -9 would: no clean-up runs")
    subprocess.run([sys.executable, "-c", code], check=True)
    left = list(out.glob(".best.pt.*"))
    assert len(left) == 1
    with atomic_path(out / "mine.txt") as mine:  # a write in progress in this process stays
        mine.write_text("y")
        assert remove_stale_temps(out) == left
        assert mine.exists()
    assert not list(out.glob(".*"))


def test_qform_sform_disagreement_is_warned_once(tmp_path, caplog):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    q = np.diag([-1.0, 1.0, 1.0, 1.0])
    q[:3, 3] = [50, 0, 0]
    img.set_qform(q, 1)
    img.set_sform(np.eye(4), 2)
    nib.save(img, tmp_path / "forms.nii.gz")
    with caplog.at_level(logging.WARNING):
        vol = load_volume(tmp_path / "forms.nii.gz")
    assert np.allclose(vol.affine, np.eye(4))
    warned = [r for r in caplog.records if "qform and sform disagree" in r.getMessage()]
    assert len(warned) == 1 and "using the sform" in warned[0].getMessage()
