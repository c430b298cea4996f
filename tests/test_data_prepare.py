import json

import nibabel as nib
import numpy as np
import pytest
from oasis_fixture import SCANS, hostile_archive, make_archive, serve

from quicknat.cli import main
from quicknat.data.archive import safe_extract
from quicknat.data.manifest import load_manifest
from quicknat.data.prepare import prepare_freesurfer, prepare_labelmaps, prepare_oasis
from quicknat.errors import QuicknatInputError


@pytest.fixture(scope="module")
def oasis_archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("oasis_src"))


def test_prepare_oasis_end_to_end(tmp_path, oasis_archive, capsys):
    archive, md5 = oasis_archive
    with serve(archive.parent) as (base, requests):
        url = f"{base}/{archive.name}"
        code = main(["prepare", "oasis", "--root", str(tmp_path), "--url", url, "--md5", md5])
        assert code == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "12 scans" in out and "OAS1_0003_MR1" in out
        m = load_manifest(tmp_path / "oasis1" / "manifest.json")
        assert m.dataset == "oasis1" and m.scheme == "tissue"
        ids = [s.id for s in m.scans]
        assert ids == sorted(i for i, (_, lab) in SCANS.items() if lab)  # n3 and n4 both found
        assert m.missing == [{"id": "OAS1_0003_MR1", "reason": "no label file found"}]
        s1 = next(s for s in m.scans if s.id == "OAS1_0002_MR1")
        assert s1.subject == "OAS1_0002" and s1.facts["shape"] == [44, 52, 44]
        assert s1.facts["spacing"] == [4.0, 4.0, 4.0] and s1.facts["label_values"] == [0, 1, 2, 3]

        # conversion: LAS affine, values kept, the phantom's left hemisphere at negative x
        img = nib.load(str(m.resolve(s1.image)))
        lab = nib.load(str(m.resolve(s1.label)))
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        assert np.array_equal(img.affine, lab.affine)
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2, 3}

        # split: by subject, 80/10/10 of 11 subjects, repeat scans together
        split = m.split
        assert split["by"] == "subject" and split["seed"] == 0
        parts = {k: set(split[k]) for k in ("train", "validation", "test")}
        assert sum(len(v) for v in parts.values()) == 12 and not (parts["train"] & parts["test"])
        where = {i: k for k, v in parts.items() for i in v}
        assert where["OAS1_0002_MR1"] == where["OAS1_0002_MR2"]
        subjects = {k: {i[:9] for i in v} for k, v in parts.items()}
        assert [len(subjects[k]) for k in ("train", "validation", "test")] in ([9, 1, 1], [8, 2, 1], [8, 1, 2])

        # idempotent: same split, no second download
        before = len(requests)
        prepare_oasis(tmp_path, url=url, md5=md5)
        assert len(requests) == before
        assert load_manifest(tmp_path / "oasis1" / "manifest.json").split == split
        # another seed is refused unless a new split is asked for
        with pytest.raises(QuicknatInputError, match="--resplit"):
            prepare_oasis(tmp_path, url=url, md5=md5, seed=3)
        new = load_manifest(prepare_oasis(tmp_path, url=url, md5=md5, seed=3, resplit=True)).split
        assert new["seed"] == 3
        # same seed elsewhere gives the same split (seed stability)
        other = load_manifest(prepare_oasis(tmp_path / "again", url=url, md5=md5)).split
        assert other["train"] == split["train"] and other["test"] == split["test"]


def test_partial_download_is_restarted(tmp_path, oasis_archive):
    archive, md5 = oasis_archive
    part = tmp_path / "oasis1" / "downloads" / (archive.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage from an interrupted run")
    with serve(archive.parent) as (base, _):
        prepare_oasis(tmp_path, url=f"{base}/{archive.name}", md5=md5)
    assert (tmp_path / "oasis1" / "downloads" / archive.name).stat().st_size == archive.stat().st_size


def test_wrong_checksum(tmp_path, oasis_archive, capsys):
    archive, _ = oasis_archive
    with serve(archive.parent) as (base, _):
        code = main(["prepare", "oasis", "--root", str(tmp_path), "--url", f"{base}/{archive.name}",
                     "--md5", "0" * 32])
    err = capsys.readouterr().err
    assert code == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    downloads = tmp_path / "oasis1" / "downloads"
    assert not any(downloads.iterdir())


def test_no_root(monkeypatch, capsys):
    monkeypatch.delenv("MONAI_DATA_DIRECTORY", raising=False)
    assert main(["prepare", "oasis"]) == 2
    assert "MONAI_DATA_DIRECTORY" in capsys.readouterr().err


def test_root_from_environment(tmp_path, oasis_archive, monkeypatch):
    archive, md5 = oasis_archive
    monkeypatch.setenv("MONAI_DATA_DIRECTORY", str(tmp_path))
    with serve(archive.parent) as (base, _):
        path = prepare_oasis(None, url=f"{base}/{archive.name}", md5=md5)
    assert path == tmp_path / "oasis1" / "manifest.json"


@pytest.mark.parametrize(
    "member, kind", [("../escape.txt", "file"), ("/tmp/abs_escape.txt", "file"), ("disc1/../../up.txt", "file"),
                     ("disc1/link", "symlink")]
)
def test_hostile_archives_are_refused(tmp_path, member, kind):
    arc = hostile_archive(tmp_path / "serve" / "evil.tar.gz", member, kind)
    root = tmp_path / "root" / "inner"
    with pytest.raises(QuicknatInputError, match="refusing"):
        safe_extract(arc, root)
    assert not (tmp_path / "root" / "escape.txt").exists() and not (tmp_path / "up.txt").exists()
    assert not list(root.rglob("*"))  # nothing written at all


def test_hostile_archive_through_cli(tmp_path, capsys):
    arc = hostile_archive(tmp_path / "serve" / "evil.tar.gz", "../escape.txt")
    with serve(arc.parent) as (base, _):
        code = main(["prepare", "oasis", "--root", str(tmp_path / "r"), "--url", f"{base}/evil.tar.gz"])
    assert code == 2 and "refusing" in capsys.readouterr().err
    assert not (tmp_path / "r" / "oasis1" / "escape.txt").exists()


def test_prepare_freesurfer_and_labelmaps(tmp_path):
    from helpers import phantom_files

    from quicknat.data.phantom import make_phantom
    from quicknat.io import save_volume

    sd = tmp_path / "subjects"
    for n in range(4):
        img, lab = make_phantom((32, 32, 32), (4, 4, 4), "LIA", seed=n)
        save_volume(img.array, img.affine, sd / f"s{n}" / "mri" / "orig.mgz")
        save_volume(lab.array.astype(np.int32), lab.affine, sd / f"s{n}" / "mri" / "aseg.mgz")
    (sd / "s9" / "mri").mkdir(parents=True)  # incomplete subject
    m = load_manifest(prepare_freesurfer(sd, tmp_path / "fs"))
    assert m.scheme == "aseg33" and len(m.scans) == 4 and m.missing[0]["id"] == "s9"
    assert m.resolve(m.scans[0].label).exists()

    for n in range(3):
        phantom_files(tmp_path / "maps", n, shape=(32, 32, 32), spacing=(4, 4, 4))
    for p in (tmp_path / "maps").glob("*_t1.nii.gz"):
        p.unlink()
    m = load_manifest(prepare_labelmaps(tmp_path / "maps", tmp_path / "lm"))
    assert m.dataset == "labelmaps" and all(s.image is None for s in m.scans) and len(m.scans) == 3
    raw = json.loads((tmp_path / "lm" / "manifest.json").read_text())
    assert raw["format"] == "quicknat-manifest"
    # fixed hold-out and a real labelled scan for validation, through the CLI
    ip, lp = phantom_files(tmp_path / "real", 7, shape=(32, 32, 32), spacing=(4, 4, 4))
    assert main(["prepare", "labelmaps", str(tmp_path / "maps"), "-o", str(tmp_path / "lm2"), "--holdout", "ph2_seg",
                 "--validation-scan", str(ip), str(lp)]) == 0
    m = load_manifest(tmp_path / "lm2")
    assert m.split["train"] == ["ph0_seg", "ph1_seg"] and m.split["validation"] == ["ph2_seg", "ph7_t1"]
    real = [s for s in m.scans if s.image is not None]
    assert [s.id for s in real] == ["ph7_t1"] and m.resolve(real[0].image) == ip.resolve()
    assert main(["prepare", "labelmaps", str(tmp_path / "maps"), "-o", str(tmp_path / "lm3"), "--holdout",
                 "nosuch"]) == 2
