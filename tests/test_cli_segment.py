import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import phantom_files

from quicknat.cli import main


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cli_segment_file(tmp_path, tiny_model, capsys):
    ip, _ = phantom_files(tmp_path / "in", 20, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0))
    code = main(["segment", str(ip), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu",
                 "--threads", "1", "--batch-size", "4"])
    assert code == 0
    assert "ph20_t1_seg.nii.gz" in _files(tmp_path / "out")
    assert "segmented 1 scan(s)" in capsys.readouterr().out


BAD = {
    "missing.nii.gz": None,
    "text.nii.gz": lambda p: p.write_text("hello"),
    "flat.nii.gz": lambda p: nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(p)),
    "four.nii.gz": lambda p: nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), str(p)),
    "nan.nii.gz": lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(p)),
}


@pytest.mark.parametrize("name", list(BAD))
def test_cli_bad_single_input(tmp_path, tiny_model, capsys, name):
    p = tmp_path / name
    if BAD[name]:
        BAD[name](p)
    code = main(["segment", str(p), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--no-flip"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(p) in lines[0] and "Traceback" not in err
    assert not [n for n in _files(tmp_path / "out") if n.startswith(name.split(".")[0])]  # nothing of it
    assert str(p) in (tmp_path / "out" / "failures.csv").read_text()


def test_cli_folder_with_bad_scans_goes_on(tmp_path, tiny_model, capsys):
    folder = tmp_path / "in"
    phantom_files(folder, 21, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0))
    (folder / "ph21_seg.nii.gz").unlink()
    (folder / "broken.nii.gz").write_text("oops")
    BAD["nan.nii.gz"](folder / "nan.nii.gz")
    code = main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--no-flip"])
    err = capsys.readouterr().err
    assert code == 2  # any failed scan: exit 2, the others written
    errors = [ln for ln in err.splitlines() if ln.startswith("quicknat: error:")]
    assert len(errors) == 2 and "Traceback" not in err  # one line per failed scan
    out = _files(tmp_path / "out")
    assert "ph21_t1_seg.nii.gz" in out and not any(n.startswith(("broken", "nan")) for n in out)


def test_cli_no_model_installed(tmp_path, monkeypatch, capsys):
    import quicknat.checkpoint as cp

    monkeypatch.setattr(cp, "installed_models", lambda: {})
    ip, _ = phantom_files(tmp_path, 22, shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    code = main(["segment", str(ip), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no model is installed" in err and "--model" in err
    assert _files(tmp_path / "out") == []


def test_cli_cuda_without_cuda(tmp_path, tiny_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code = main(["segment", "x.nii.gz", "--model", str(tiny_model), "--device", "cuda"])
    assert code == 2 and "CUDA" in capsys.readouterr().err


def test_show(tmp_path, capsys):
    ip, lp = phantom_files(tmp_path, 23, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0))
    out = tmp_path / "show.png"
    assert main(["show", str(ip), "--seg", str(lp), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)


def test_cli_segment_without_input_uses_the_bundled_example(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["segment", "--model", str(tiny_model), "--no-overlay", "--no-flip"]) == 0
    out = capsys.readouterr().out
    assert "quicknat_out" in out
    seg = nib.load(str(tmp_path / "quicknat_out" / "mni152_t1_1mm_seg.nii.gz"))
    src = nib.load(str(tmp_path / "cache" / "quicknat" / "mni152_t1_1mm.nii.gz"))
    assert seg.shape == src.shape == (197, 233, 189) and np.array_equal(seg.affine, src.affine)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--mc", "0"], "argument --mc: expected an integer >= 1, got '0'"),
    (["--mc", "-3"], "argument --mc: expected an integer >= 1, got '-3'"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["--uncertainty"], "--uncertainty needs --mc N"),
    (["--device", "gpu"], "argument --device: 'gpu' is not a device"),
])
def test_cli_segment_checks_flags_before_work(tmp_path, capsys, extra, expected):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"never read")
    try:
        code = main(["segment", str(scan), "-o", str(tmp_path / "out"), *extra])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_segment_checks_output_and_inputs_before_work(tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"never read")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["segment", str(scan), "-o", str(afile)]) == 2
    assert "is a file; the output (-o) must be a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert "holds no scans" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_post_processing_defaults_and_flags_reach_the_sidecar(tmp_path, tiny_model):
    ip, _ = phantom_files(tmp_path, 24, shape=(48, 48, 48), spacing=(3.0, 3.0, 3.0))
    runs = {"default": [], "off": ["--no-clean", "--csf-reach", "0"]}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(["segment", str(ip), "-o", str(out), "--model", str(tiny_model), "--no-flip", "--no-overlay",
                     *flags]) == 0
        (sidecar,) = out.glob("*_seg.json")
        runs[name] = json.loads(sidecar.read_text())["options"]
    assert runs["default"]["clean"] is True and runs["default"]["csf_reach_mm"] == 6.0
    assert runs["off"]["clean"] is False and runs["off"]["csf_reach_mm"] == 0.0
    assert runs["default"]["flip"] is False
    # without --flip/--no-flip the model's own choice runs, and the sidecar says which
    assert main(["export", str(tiny_model), "-o", str(tmp_path / "m"), "--default-flip", "off"]) == 0
    for model, flags, flip in ((tmp_path / "m", [], False), (tmp_path / "m", ["--flip"], True)):
        out = tmp_path / f"m{len(flags)}"
        assert main(["segment", str(ip), "-o", str(out), "--model", str(model), "--no-overlay", *flags]) == 0
        (sidecar,) = out.glob("*_seg.json")
        assert json.loads(sidecar.read_text())["options"]["flip"] is flip
