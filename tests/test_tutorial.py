"""Runs every `quicknat` command of docs/tutorial.md against a miniature OASIS archive served
from 127.0.0.1, with a tiny network: a changed flag or output breaks this test."""

import os
import re
import shlex
from pathlib import Path

import pytest
from oasis_fixture import make_archive, serve

from quicknat.cli import build_parser, main
from quicknat.clidoc import reference_markdown
from quicknat.config import TrainConfig
from quicknat.conform import ConformSettings

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"


def tutorial_commands() -> list[str]:
    text = TUTORIAL.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("quicknat ", "torchrun ")):
                cmds.append(line)
    return cmds


@pytest.mark.slow
def test_tutorial_runs_end_to_end(tmp_path, monkeypatch, capsys):
    archive, md5 = make_archive(tmp_path / "archive")
    data_root = tmp_path / "data"
    monkeypatch.setenv("MONAI_DATA_DIRECTORY", str(data_root))
    monkeypatch.chdir(tmp_path)
    tiny = tmp_path / "tiny.yaml"
    # the commands, not the learning, are under test here (augmentation: test_data_slices)
    cfg = TrainConfig(num_filters=6, epochs=1, steps_per_epoch=6, batch_size=4, optimizer="adam", lr=5e-3,
                      conform=ConformSettings(voxel_size=4.0, shape=(64, 64, 64)), dropout=0.1, augment=None)
    tiny.write_text(cfg.to_yaml())
    cmds = tutorial_commands()
    assert [c.split()[1] for c in cmds if c.startswith("quicknat")] == [
        "prepare", "show", "train", "evaluate", "report", "report", "segment", "train"]
    with serve(archive.parent) as (base, _):
        for line in cmds:
            args = shlex.split(os.path.expandvars(line).replace("configs/", f"{ROOT}/configs/"))
            if args[0] == "torchrun":  # DDP is tested in test_train; check the command parses
                qn = args[args.index("quicknat.cli") + 1:]
                build_parser().parse_args(qn)
                continue
            args = args[1:]
            if args[:2] == ["prepare", "oasis"]:
                args += ["--url", f"{base}/{archive.name}", "--md5", md5]
            if args[0] == "train":
                args += ["--config", str(tiny), "--device", "cpu"]
            if args[0] in ("evaluate", "segment"):
                args += ["--device", "cpu", "--no-flip"]  # flip averaging: test_segment
            if args[0] == "segment":
                args += ["--mc", "2"]
            code = main(args)
            assert code == 0, (line, capsys.readouterr().err)
    oasis = data_root / "oasis1"
    assert (oasis / "manifest.json").exists()
    assert (tmp_path / "OAS1_0001.png").exists()
    for run in ("oasis_tissue", "oasis_finetuned"):
        for f in ("model.json", "coronal.pt", "axial.pt", "sagittal.pt", "config.yaml", "split.json",
                  "coronal/history.csv", "coronal/curves.png"):
            assert (tmp_path / "runs" / run / f).exists(), (run, f)
    for f in ("metrics.csv", "summary.csv", "eval.json"):
        assert (tmp_path / "runs" / "oasis_eval" / f).exists()
    assert (tmp_path / "oasis_eval.html").exists() and (tmp_path / "oasis_training.html").exists()
    for f in ("seg.nii.gz", "volumes.csv", "overlay.png", "qc.csv"):
        assert (tmp_path / "seg" / f"OAS1_0002_MR1_t1_{f}").exists()


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == reference_markdown(build_parser()), \
        "docs/cli.md is stale: run python -m quicknat.cli --reference > docs/cli.md"


def test_docs_exist_and_link():
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/tutorial.md", "docs/cli.md", "docs/outputs.md", "docs/checkpoints.md", "docs/performance.md"):
        assert (ROOT / doc).exists() and doc in readme
