"""Cohort runs: discovery and naming (BIDS, FreeSurfer, clashing stems), BIDS derivatives, the
cohort volumes table and `quicknat stats`, shards, --skip-existing, failures.csv, colour tables,
the posteriors sidecar and the run's log file."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import TEST_SCHEME

from quicknat.cli import main
from quicknat.cohort import dseg_tsv, lut_text, volume_summary
from quicknat.data.phantom import make_phantom
from quicknat.discover import find_inputs, name_inputs, parse_shard, select_shard, shard_from_env
from quicknat.errors import QuicknatInputError
from quicknat.io import save_volume

SMALL = {"shape": (48, 48, 48), "spacing": (3.0, 3.0, 3.0)}
FAST = ["--no-flip", "--no-overlay", "--device", "cpu"]


def scan(path, seed=0):
    img, _ = make_phantom(seed=seed, **SMALL)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_volume(img.array, img.affine, path)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- discovery and naming (no model needed) ------------------------------------------------
def test_freesurfer_subjects_get_their_names(tmp_path):
    for subj in ("subjA", "subjB"):
        for f in ("mri/orig.mgz", "mri/T1.mgz", "mri/aseg.mgz", "mri/orig/001.mgz"):
            touch(tmp_path / subj / f)
    touch(tmp_path / "subjC" / "mri" / "T1.mgz")  # no orig.mgz: T1.mgz is taken
    found = find_inputs([tmp_path])
    assert [(s.name, s.path.relative_to(tmp_path).as_posix()) for s in found.scans] == [
        ("subjA", "subjA/mri/orig.mgz"), ("subjB", "subjB/mri/orig.mgz"), ("subjC", "subjC/mri/T1.mgz")]
    assert "skipped 6 FreeSurfer files other than mri/orig.mgz" in found.summary()
    # given one by one, as on the command line, the subject names hold too
    named = name_inputs([tmp_path / "subjA/mri/orig.mgz", tmp_path / "subjB/mri/orig.mgz"])
    assert [s.name for s in named] == ["subjA", "subjB"]


def test_same_stems_in_two_folders_get_their_folder(tmp_path):
    a, b = touch(tmp_path / "site1/a/T1.nii.gz"), touch(tmp_path / "site1/b/T1.nii.gz")
    c = touch(tmp_path / "site2/other.nii.gz")
    assert [s.name for s in name_inputs([a, b, c])] == ["a_T1", "b_T1", "other"]
    with pytest.raises(QuicknatInputError, match="would write the same outputs"):
        name_inputs([a, a])


def test_bids_tree_takes_t1w_only_and_never_derivatives(tmp_path):
    ds = tmp_path / "ds"
    touch(ds / "dataset_description.json")
    touch(ds / "sub-01/anat/sub-01_T1w.nii.gz")
    touch(ds / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    touch(ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz")
    touch(ds / "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz")
    touch(ds / "derivatives/quicknat/sub-01/anat/sub-01_desc-aseg_dseg.nii.gz")
    found = find_inputs([ds])
    assert found.bids_root == ds
    assert [(s.name, s.subdir) for s in found.scans] == [
        ("sub-01", "sub-01/anat"), ("sub-02_ses-1", "sub-02/ses-1/anat")]
    assert found.summary() == "found 2 scan(s) (skipped 2 non-T1w BIDS images)"


def test_rerun_never_takes_its_own_outputs_and_pattern_overrides(tmp_path):
    touch(tmp_path / "x.nii.gz")
    for suffix in ("seg", "tissue", "posteriors", "uncertainty"):
        touch(tmp_path / f"x_{suffix}.nii.gz")
    touch(tmp_path / "out" / "y.nii.gz")  # the run's output folder inside the input folder
    found = find_inputs([tmp_path], exclude=tmp_path / "out")
    assert [s.name for s in found.scans] == ["x"] and "4 quicknat outputs" in found.summary()
    assert [s.name for s in find_inputs([tmp_path], pattern="*_seg.nii.gz").scans] == ["x_seg"]


def test_shards_partition_the_cohort(monkeypatch, tmp_path):
    scans = name_inputs([touch(tmp_path / f"s{i}.nii") for i in range(7)])
    parts = [select_shard(scans, (k, 3)) for k in (1, 2, 3)]
    assert sorted(s.name for p in parts for s in p) == sorted(s.name for s in scans)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_from_env() == (2, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() is None


def test_volume_summary_and_colour_tables():
    vols = [{"structure": "Left-Cerebral-Cortex", "voxels": 10, "volume_mm3": 10.0},
            {"structure": "Left-Lateral-Ventricle", "voxels": 3, "volume_mm3": 3.0},
            {"structure": "CSF", "voxels": 2, "volume_mm3": 2.0}]
    summary = {r["structure"]: r["volume_mm3"] for r in volume_summary(vols)}
    assert summary == {"BrainSegVol": 10.0, "IntracranialVol": 15.0}
    lut = lut_text(TEST_SCHEME).splitlines()
    assert lut[1].split() == ["0", "Unknown", "0", "0", "0", "0"]
    assert lut[2].split() == ["2", "Left-White", "245", "245", "245", "0"]
    assert dseg_tsv(TEST_SCHEME).splitlines()[:2] == ["index\tname\tcolor", "0\tUnknown\t#000000"]


# -- runs with the tiny model ---------------------------------------------------------------
def test_folder_run_writes_the_cohort_table_lut_log_and_failures(tmp_path, tiny_model, capsys):
    scan(tmp_path / "in/subjA/mri/orig.mgz", 1)
    scan(tmp_path / "in/subjB/mri/orig.mgz", 2)
    (tmp_path / "in/subjC/mri").mkdir(parents=True)
    (tmp_path / "in/subjC/mri/orig.mgz").write_text("broken")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model), *FAST,
                 "--posteriors"])
    assert code == 2  # subjC failed, the others written
    assert (out / "subjA_seg.nii.gz").exists() and (out / "subjB_seg.nii.gz").exists()
    table = rows(out / "volumes.csv")
    assert [r["scan"] for r in table] == ["subjA", "subjB"]
    assert list(table[0])[:3] == ["scan", "input", TEST_SCHEME.names[1]]
    assert list(table[0])[-4:] == ["BrainSegVol", "IntracranialVol", "model", "quicknat_version"]
    assert table[0]["model"] == str(tiny_model) and float(table[0]["IntracranialVol"]) > 0
    fails = rows(out / "failures.csv")
    assert len(fails) == 1 and fails[0]["input"].endswith("subjC/mri/orig.mgz") and fails[0]["reason"]
    assert (out / "test6_lut.txt").read_text() == lut_text(TEST_SCHEME)
    channels = json.loads((out / "subjA_posteriors.json").read_text())["channels"]
    assert [c["name"] for c in channels] == TEST_SCHEME.names
    log = (out / "quicknat.log").read_text()
    assert "found 3 scan(s)" in log and "subjA" in log
    assert "segmented 2 scan(s), 1 failed" in capsys.readouterr().out


def test_bids_dataset_gives_bids_derivatives(tmp_path, tiny_model):
    ds = tmp_path / "ds"
    (ds / "dataset_description.json").parent.mkdir(parents=True)
    (ds / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    scan(ds / "sub-01/anat/sub-01_T1w.nii.gz", 3)
    scan(ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", 4)
    save_volume(np.zeros((4, 4, 4, 3), np.float32), np.eye(4), ds / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    assert main(["segment", str(ds), "--model", str(tiny_model), *FAST]) == 0
    der = ds / "derivatives" / "quicknat"
    seg = der / "sub-02/ses-1/anat/sub-02_ses-1_desc-test6_dseg.nii.gz"
    assert (der / "sub-01/anat/sub-01_desc-test6_dseg.nii.gz").exists() and seg.exists()
    assert (der / "sub-01/anat/sub-01_desc-test6_dseg.tsv").read_text() == dseg_tsv(TEST_SCHEME)
    assert json.loads((der / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert [r["scan"] for r in rows(der / "volumes.csv")] == ["sub-01", "sub-02_ses-1"]
    # a second run finds the derivatives of the first nowhere among its inputs
    assert main(["segment", str(ds), "--model", str(tiny_model), *FAST]) == 0
    assert [r["scan"] for r in rows(der / "volumes.csv")] == ["sub-01", "sub-02_ses-1"]


def test_two_shards_give_the_table_of_one_run_and_skip_existing_resumes(tmp_path, tiny_model, capsys):
    for i in range(3):  # s0 and s2 go to shard 1, s1 to shard 2
        scan(tmp_path / "in" / f"s{i}.nii.gz", 10 + i)
    common = [str(tmp_path / "in"), "--model", str(tiny_model), *FAST, "--threads", "1"]
    assert main(["segment", *common, "-o", str(tmp_path / "one")]) == 0
    # two processes at once: this one told its shard, another finding it as torchrun would tell it
    cmd = [sys.executable, "-m", "quicknat.cli", "segment", *common, "-o", str(tmp_path / "sharded")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen(cmd, env={**env, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert main(["segment", *common, "-o", str(tmp_path / "sharded"), "--shard", "1/2"]) == 0
    assert other.wait(timeout=300) == 0
    assert len(rows(tmp_path / "sharded" / "volumes_shard-1-of-2.csv")) == 2
    assert main(["stats", str(tmp_path / "sharded")]) == 0
    assert (tmp_path / "sharded" / "volumes.csv").read_text() == (tmp_path / "one" / "volumes.csv").read_text()
    # a killed run leaves no sidecar for the scan it was writing (it is renamed into place last)
    one = tmp_path / "one"
    (one / "s1_seg.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in one.glob("s[02]_*")}
    capsys.readouterr()
    assert main(["segment", *common, "-o", str(one), "--skip-existing"]) == 0
    assert "segmented 1 scan(s), kept 2 done before" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in one.glob("s[02]_*")} == before
    assert (one / "s1_seg.json").exists() and len(rows(one / "volumes.csv")) == 3
    # an input newer than its outputs is segmented again
    os.utime(tmp_path / "in" / "s0.nii.gz")
    assert main(["segment", *common, "-o", str(one), "--skip-existing"]) == 0
    assert "segmented 1 scan(s), kept 2 done before" in capsys.readouterr().out


def test_show_names_tissue_labels_as_tissue(tmp_path, monkeypatch):
    import quicknat.report as report

    seen = {}
    monkeypatch.setattr(report, "render_overlay", lambda img, cls, colors, names, title: seen.setdefault(
        "names", list(names)) and b"png")
    img, _ = make_phantom(seed=5, **SMALL)
    ip = save_volume(img.array, img.affine, tmp_path / "t1.nii.gz")
    tissue = np.zeros(img.array.shape, np.int16)
    tissue[10:30, 10:30, 10:30] = 2
    tissue[15:25, 15:25, 15:25] = 3
    lp = save_volume(tissue, img.affine, tmp_path / "tissue.nii.gz", dtype=np.int16)
    assert main(["show", str(ip), "--seg", str(lp), "-o", str(tmp_path / "a.png")]) == 0
    assert seen.pop("names") == ["Background", "Grey-Matter", "White-Matter"]  # not aseg's L WM / L cortex
    assert main(["show", str(ip), "--seg", str(lp), "--scheme", "aseg33", "-o", str(tmp_path / "b.png")]) == 0
    assert seen.pop("names") == ["Unknown", "Left-Cerebral-White-Matter", "Left-Cerebral-Cortex"]


def test_checks_before_work_never_import_torch(tmp_path):
    """-o naming a file, an empty folder, a bad flag: refused before torch is imported (the
    import alone takes seconds), so the user hears of it at once."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "empty").mkdir()
    code = ("import sys; from quicknat.cli import main; "
            f"codes = [main(['segment', {str(tmp_path)!r}, '-o', {str(afile)!r}]), "
            f"main(['segment', {str(tmp_path / 'empty')!r}, '-o', {str(tmp_path / 'o')!r}]), "
            f"main(['segment', {str(tmp_path)!r}, '--uncertainty'])]; "
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[2, 2, 2] False", out.stderr
    assert out.stderr.count("quicknat: error:") == 3


def test_bids_files_given_one_by_one_find_their_dataset(tmp_path):
    from quicknat.discover import plan_run

    ds = tmp_path / "ds"
    touch(ds / "dataset_description.json")
    t1 = touch(ds / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
    found, out = plan_run([t1], None, bids=True)
    assert out == ds / "derivatives" / "quicknat" and found.scans[0].subdir == "sub-01/ses-2/anat"
    loose = touch(tmp_path / "loose" / "sub-09_T1w.nii.gz")
    with pytest.raises(QuicknatInputError, match="no BIDS dataset"):
        plan_run([loose], None, bids=True)
    found, out = plan_run([loose], tmp_path / "der", bids=True)
    assert found.bids and found.scans[0].subdir == "sub-09/anat"
