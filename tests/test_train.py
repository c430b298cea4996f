import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_SCHEME, phantom_manifest, tiny_config

from quicknat.checkpoint import load_checkpoint, load_model
from quicknat.cli import main
from quicknat.config import TrainConfig, load_config
from quicknat.data.slices import AugmentConfig
from quicknat.errors import QuicknatInputError
from quicknat.labels import TISSUE
from quicknat.losses import QuickNATLoss
from quicknat.train import train, train_view

ROOT = Path(__file__).resolve().parents[1]


def test_trained_views_reach_validation_dice(tiny_model):
    # a broken loss or label mapping stays far below these floors
    floors = {"coronal": 0.85, "axial": 0.85, "sagittal": 0.85}
    for view, floor in floors.items():
        history = json.loads((tiny_model / view / "history.json").read_text())
        print(view, [round(h["val_dice_mean"], 3) for h in history])
        assert history[-1]["val_dice_mean"] >= floor
        assert len(history) == 4 and history[0]["lr"] == pytest.approx(5e-3)
        for h in history:
            assert 0.0 <= h["val_dice_mean"] <= 1.0
            assert h["train_loss"] == pytest.approx(h["train_dice_loss"] + h["train_ce"], rel=1e-5)
        ck = load_checkpoint(tiny_model / f"{view}.pt")
        assert ck.provenance["best_val_dice"] == pytest.approx(max(h["val_dice_mean"] for h in history))
        assert ck.provenance["data"]["train_scans"] == 3 and ck.training_state is None
        assert (tiny_model / view / "curves.png").exists() and (tiny_model / view / "history.csv").exists()
        assert (tiny_model / view / "last.pt").exists() and (tiny_model / view / "best.pt").exists()
    m = load_model(tiny_model)
    assert set(m.views) == {"coronal", "axial", "sagittal"} and m.scheme == TEST_SCHEME
    assert load_config(tiny_model / "config.yaml").num_filters == 8
    assert json.loads((tiny_model / "split.json").read_text())["train"] == ["ph0", "ph1", "ph2"]
    assert list((tiny_model / "coronal" / "tensorboard").glob("events.*"))


def test_loss_parts():
    loss = QuickNATLoss()
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    total, parts = loss(perfect, target, torch.ones(1, 2, 2))
    assert float(parts["dice"]) < 1e-6 and float(parts["ce"]) < 1e-6
    logits = torch.zeros(1, 3, 2, 2)  # uniform: CE = log 3 per pixel
    w = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    _, parts = loss(logits, target, w)
    assert float(parts["ce"]) == pytest.approx(np.log(3) * 2.5, rel=1e-5)
    # classes absent from the target do not enter the Dice mean
    _, p1 = loss(logits, torch.zeros(1, 2, 2, dtype=torch.long), None)
    assert float(p1["dice"]) == pytest.approx(1 - (2 * 4 / 3 + 1) / (4 / 3 + 4 + 1), rel=1e-5)


def test_config_yaml_and_precedence(tmp_path):
    cfg = TrainConfig(num_filters=16, augment=AugmentConfig(elastic=0.0))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.05\nepochs: 7\nconform:\n  voxel_size: 2.0\n")
    c = load_config(p, epochs=3)
    assert c.lr == 0.05 and c.epochs == 3 and c.conform.voxel_size == 2.0 and c.conform.shape == (256, 256, 256)
    assert load_config(ROOT / "configs" / "quicknat_paper.yaml").momentum == 0.95
    p.write_text("bogus: 1\n")
    with pytest.raises(QuicknatInputError, match="bogus"):
        load_config(p)


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    manifest = phantom_manifest(tmp_path / "data", seeds=(0, 1, 2, 3), shape=(64, 64, 64), spacing=(2.2, 2.2, 2.2))
    from quicknat.data.manifest import load_manifest

    m = load_manifest(manifest)
    aug = AugmentConfig(elastic=0.0)
    cfg = tiny_config(num_filters=6, epochs=3, steps_per_epoch=4, batch_size=4, deterministic=True, augment=aug,
                      lr_step=1, lr_gamma=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-equal runs
    try:
        train_view("axial", m, tmp_path / "a", cfg, device="cpu")
        with pytest.raises(KeyboardInterrupt):
            train_view("axial", m, tmp_path / "b", cfg, device="cpu", stop_after_steps=6)  # mid epoch 2
        first = json.loads((tmp_path / "b" / "axial" / "history.json").read_text())
        assert len(first) == 1  # last.pt holds epoch 1
        train_view("axial", m, tmp_path / "b", cfg, device="cpu", resume=True)
    finally:
        torch.set_num_threads(threads)
    ha = json.loads((tmp_path / "a" / "axial" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "axial" / "history.json").read_text())
    assert len(ha) == len(hb) == 3
    for a, b in zip(ha, hb):
        for k in ("train_loss", "train_ce", "val_dice_mean", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["epoch"], k)
    wa = load_checkpoint(tmp_path / "a" / "axial" / "last.pt").state_dict
    wb = load_checkpoint(tmp_path / "b" / "axial" / "last.pt").state_dict
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_fine_tuning_init_and_scheme_mismatch(tmp_path, tiny_model):
    manifest = phantom_manifest(tmp_path / "data", seeds=(5, 6, 7, 8), shape=(64, 64, 64), spacing=(2.2, 2.2, 2.2))
    cfg = tiny_config(epochs=1, steps_per_epoch=3, lr=1e-3)
    out = train(manifest, tmp_path / "ft", "coronal", cfg, init=tiny_model, device="cpu")
    assert load_checkpoint(out / "coronal.pt").scheme == TEST_SCHEME
    # a tissue data set: refused unless the classifier is re-initialised
    tissue = phantom_manifest(tmp_path / "tissue", seeds=(5, 6, 7, 8), scheme=TISSUE, shape=(64, 64, 64),
                              spacing=(2.2, 2.2, 2.2))
    with pytest.raises(QuicknatInputError, match="reset-classifier"):
        train(tissue, tmp_path / "ft2", "coronal", cfg, init=tiny_model, device="cpu")
    out = train(tissue, tmp_path / "ft2", "coronal", cfg, init=tiny_model, reset_classifier=True, device="cpu")
    ck = load_checkpoint(out / "coronal.pt")
    assert ck.scheme == TISSUE and ck.config.num_classes == 4
    # a 2.5D run (neighbouring slices as channels, augmented together) warm-starts from the 2D view
    wide = train(manifest, tmp_path / "ft25", "coronal", tiny_config(epochs=1, steps_per_epoch=2, context=1,
                                                                     augment=AugmentConfig()),
                 init=tiny_model, device="cpu")
    assert load_checkpoint(wide / "coronal.pt").config.in_channels == 3
    with pytest.raises(QuicknatInputError, match="architecture"):  # and never the other way round
        train(manifest, tmp_path / "ft4", "coronal", tiny_config(epochs=1, steps_per_epoch=1), init=wide,
              device="cpu")
    # more filters: the narrow network warm-starts the wider one (model.widen_filters); fewer: refused
    wider = train(manifest, tmp_path / "ftw", "coronal", tiny_config(num_filters=12, epochs=1, steps_per_epoch=1),
                  init=tiny_model, device="cpu")
    assert load_checkpoint(wider / "coronal.pt").config.num_filters == 12
    both = train(manifest, tmp_path / "ftwc", "coronal", tiny_config(num_filters=12, context=1, epochs=1,
                                                                   steps_per_epoch=1),
                 init=tiny_model, device="cpu")  # more filters and more input slices at once
    assert load_checkpoint(both / "coronal.pt").config.in_channels == 3
    with pytest.raises(QuicknatInputError, match="architecture"):
        train(manifest, tmp_path / "ft3", "coronal", tiny_config(num_filters=6, epochs=1, steps_per_epoch=1),
              init=tiny_model, device="cpu")
    with pytest.raises(QuicknatInputError, match="architecture"):  # another kernel: refused
        train(manifest, tmp_path / "ft5", "coronal", tiny_config(kernel_size=5, epochs=1, steps_per_epoch=1),
              init=tiny_model, device="cpu")


def test_cli_train_writes_a_usable_model(tmp_path, capsys):
    manifest = phantom_manifest(tmp_path / "data", seeds=(0, 1, 2, 3), shape=(64, 64, 64), spacing=(2.2, 2.2, 2.2))
    cfgfile = tmp_path / "tiny.yaml"
    cfgfile.write_text(tiny_config(epochs=1, steps_per_epoch=2, num_filters=4).to_yaml())
    code = main(["train", str(manifest), "-o", str(tmp_path / "run"), "--view", "coronal", "--config", str(cfgfile),
                 "--device", "cpu"])
    assert code == 0 and "quicknat segment" in capsys.readouterr().out
    scan = tmp_path / "data" / "scans" / "ph3_t1.nii.gz"
    assert main(["segment", str(scan), "-o", str(tmp_path / "seg"), "--model", str(tmp_path / "run")]) == 0
    assert (tmp_path / "seg" / "ph3_t1_seg.nii.gz").exists()


def test_ddp_two_processes_gloo(tmp_path):
    manifest = phantom_manifest(tmp_path / "data", seeds=(0, 1, 2, 3), shape=(48, 48, 48), spacing=(3.0, 3.0, 3.0))
    import socket

    with socket.socket() as sock:  # a free port on loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           str(Path(__file__).parent / "ddp_worker.py"), str(manifest), str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    h0 = (tmp_path / "run" / "rank0.sha1").read_text()
    h1 = (tmp_path / "run" / "rank1.sha1").read_text()
    assert h0 == h1 and len(h0) == 40
    # only rank 0 wrote the run's files
    assert (tmp_path / "run" / "coronal.pt").exists()
    hist = json.loads((tmp_path / "run" / "coronal" / "history.json").read_text())
    assert len(hist) == 2
    assert load_checkpoint(tmp_path / "run" / "coronal.pt").provenance["world_size"] == 2


def test_missing_resume_is_an_error(tmp_path):
    manifest = phantom_manifest(tmp_path / "data", seeds=(0, 1, 2), shape=(48, 48, 48), spacing=(3.0, 3.0, 3.0))
    from quicknat.data.manifest import load_manifest

    with pytest.raises(QuicknatInputError, match="nothing to resume"):
        train_view("coronal", load_manifest(manifest), tmp_path / "r", tiny_config(), device="cpu", resume=True)
