import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import TEST_SCHEME, phantom_files

from quicknat.cli import main
from quicknat.evaluate import pair_files, subject_key
from quicknat.io import save_volume


def _write_scheme(tmp_path):
    p = tmp_path / "test6.txt"
    p.write_text(TEST_SCHEME.to_lut())
    return p


def test_file_pair_and_folders(tmp_path, capsys):
    ip, lp = phantom_files(tmp_path / "ref", 50, shape=(48, 48, 48), spacing=(3.0, 3.0, 3.0))
    (tmp_path / "pred").mkdir()
    lab = nib.load(str(lp))
    data = np.asarray(lab.dataobj).copy()
    data[data == 4] = 0  # drop the left lateral ventricle from the "prediction"
    save_volume(data, lab.affine, tmp_path / "pred" / "ph50_seg.nii.gz", dtype=np.int16)
    ip.unlink()
    assert subject_key("ph50_seg.nii.gz") == subject_key("ph50_seg.nii.gz") == "ph50"
    assert len(pair_files(tmp_path / "pred", tmp_path / "ref")) == 1
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "-o", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Left-Lateral-Ventricle" in printed and "Mean (foreground)" in printed
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subject", "structure", "label", "status", "metric", "value"]
    dice = {r["structure"]: r for r in rows if r["metric"] == "dice"}
    assert dice["Left-Lateral-Ventricle"]["status"] == "missing_in_pred"
    assert float(dice["Left-Lateral-Ventricle"]["value"]) == 0.0
    assert float(dice["Right-Lateral-Ventricle"]["value"]) == 1.0
    with open(tmp_path / "out" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {"structure", "metric", "n", "mean", "std", "median"} == set(summary[0])


def test_different_grids_need_resample(tmp_path, capsys):
    _, lp = phantom_files(tmp_path, 51, shape=(48, 48, 48), spacing=(3.0, 3.0, 3.0))
    lab = nib.load(str(lp))
    data = np.asarray(lab.dataobj)
    # the same labels on a flipped grid (LAS vs RAS): same anatomy, different voxel order
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = 47
    save_volume(data[::-1].copy(), lab.affine @ flip, tmp_path / "ph51_pred.nii.gz", dtype=np.int16)
    args = ["evaluate", "--pred", str(tmp_path / "ph51_pred.nii.gz"), "--ref", str(lp), "--scheme",
            str(_write_scheme(tmp_path)), "-o", str(tmp_path / "m.csv")]
    assert main(args) == 2
    assert "different grid" in capsys.readouterr().err
    assert main(args + ["--resample"]) == 0
    with open(tmp_path / "m.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "dice" and r["status"] == "ok"]
    assert all(float(r["value"]) == 1.0 for r in rows)
    assert (tmp_path / "m_summary.csv").exists()


def test_evaluate_model_on_manifest_and_report(tiny_model, tmp_path, capsys):
    manifest = tiny_model.parent / "data" / "manifest.json"
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_model), "--manifest", str(manifest), "--split", "train",
                 "-o", str(out), "--mc", "2", "--no-flip"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "eval.json").read_text())
    assert [s["id"] for s in info["scans"]] == ["ph0", "ph1", "ph2"]
    with open(out / "summary.csv") as f:
        summary = {(r["structure"], r["metric"]): r for r in csv.DictReader(f)}
    mean_dice = float(summary[("Mean (foreground)", "dice")]["mean"])
    assert 0.85 <= mean_dice <= 1.0
    assert int(summary[("Left-White", "dice")]["n"]) == 3
    # report over the evaluation and over the training run
    assert main(["report", str(out), "-o", str(tmp_path / "eval.html")]) == 0
    page = (tmp_path / "eval.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # box plot + best, median, worst overlays
    assert "MC-dropout QC" in page and "Left-White" in page
    assert main(["report", str(tiny_model), "-o", str(tmp_path / "run.html")]) == 0
    assert (tmp_path / "run.html").read_text().count("data:image/png;base64,") == 3  # one per view


def test_evaluate_usage_errors(tmp_path, capsys):
    assert main(["evaluate"]) == 2
    assert main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--ref", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", "--split", "bogus"])
