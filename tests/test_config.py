from dataclasses import replace
from pathlib import Path

import pytest

from quicknat.config import TrainConfig, load_config
from quicknat.data.synth import SynthConfig
from quicknat.errors import QuicknatInputError

ROOT = Path(__file__).resolve().parents[1]


def test_synth_is_a_typed_validated_part(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("synth:\n  random_share: 0.4\n  priors: some/folder\n")
    cfg = load_config(p)
    assert isinstance(cfg.synth, SynthConfig) and cfg.synth.random_share == 0.4 and cfg.synth.priors == "some/folder"
    assert cfg.synth.strip_prob == SynthConfig().strip_prob  # unset keys keep their defaults
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert load_config(tmp_path / "c.yaml").to_yaml() == cfg.to_yaml()
    for bad, word in (("synth:\n  nosuch: 1\n", "nosuch"), ("synth:\n  strip_prob: 3\n", "probability"),
                      ("synth:\n  mean_range: [200, 10]\n", "mean_range")):
        p.write_text(bad)
        with pytest.raises(QuicknatInputError, match=word):
            load_config(p)


def test_shipped_recipes_load():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 13
    for path in paths:
        cfg = load_config(path)
        assert cfg.epochs >= 1
    v7 = load_config(ROOT / "configs" / "synth_cpu_v7.yaml")  # v6 with narrower degradations
    assert v7.context == 1 and v7.synth.thick_prob == 0.1 and v7.synth.bias_std == 0.35
    v8, v8_2d = (load_config(ROOT / "configs" / f"synth_cpu_v8{s}.yaml") for s in ("", "_2d"))
    assert v8.dropout == v8_2d.dropout == 0.05 and (v8.context, v8_2d.context) == (1, 0)  # v7 with dropout 0.05
    assert replace(v8, dropout=0.2) == v7 and replace(v8_2d, dropout=0.2, context=1) == v7
    v9, v9_2d = (load_config(ROOT / "configs" / f"synth_cpu_v9{s}.yaml") for s in ("", "_2d"))
    assert v9.num_filters == v9_2d.num_filters == 24 and (v9.context, v9_2d.context) == (1, 0)  # v8, wider
    assert replace(v9, num_filters=16, lr=v8.lr, lr_step=v8.lr_step) == v8
    assert replace(v9_2d, num_filters=16, lr=v8.lr, lr_step=v8.lr_step) == v8_2d
    v10, v10_2d = (load_config(ROOT / "configs" / f"synth_cpu_v10{s}.yaml") for s in ("", "_2d"))
    assert v10.num_filters == v10_2d.num_filters == 32 and (v10.context, v10_2d.context) == (1, 0)  # v9, wider
    assert replace(v10, num_filters=24, lr=v9.lr) == v9 and replace(v10_2d, num_filters=24, lr=v9.lr) == v9_2d
    v11, v11_2d = (load_config(ROOT / "configs" / f"synth_cpu_v11{s}.yaml") for s in ("", "_2d"))
    assert v11.weight_power == v11_2d.weight_power == 0.0 and (v11.context, v11_2d.context) == (1, 0)  # unweighted CE
    same = dict(weight_power=v10.weight_power, lr=v10.lr, lr_step=v10.lr_step, epochs=v10.epochs)
    assert replace(v11, **same) == v10 and replace(v11_2d, **same) == v10_2d
    v12, v12_2d = (load_config(ROOT / "configs" / f"synth_cpu_v12{s}.yaml") for s in ("", "_2d"))
    assert v12.dice_weight == v12_2d.dice_weight == 0.0 and (v12.context, v12_2d.context) == (1, 0)  # CE alone
    same = dict(dice_weight=v11.dice_weight, epochs=v11.epochs)
    assert replace(v12, **same) == v11 and replace(v12_2d, **same) == v11_2d
    v13 = load_config(ROOT / "configs" / "synth_cpu_v13_15mm.yaml")  # the 1.5 mm probe: grid and crop only
    assert (v13.conform.voxel_size, v13.conform.shape, v13.synth.crop) == (1.5, (176, 176, 176), 128)
    assert replace(v13, conform=v11.conform, synth=v11.synth, epochs=v11.epochs) == v11
    v2 = load_config(ROOT / "configs" / "synth_cpu_v2.yaml")
    assert v2.conform.voxel_size == 2.0 and v2.synth.priors and v2.synth.random_share == 0.25


def test_old_t1_share_key_still_reads():
    assert SynthConfig.from_dict({"t1_share": 0.8}).random_share == pytest.approx(0.2)


def test_base_key_reads_the_base_first(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.01\nepochs: 3\nsynth:\n  noise_max: 5.0\n  bias_std: 0.1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nepochs: 7\nsynth:\n  noise_max: 2.0\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml")
    assert (cfg.lr, cfg.epochs, cfg.synth.noise_max, cfg.synth.bias_std) == (0.01, 7, 2.0, 0.1)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(QuicknatInputError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("base: nosuch.yaml\n")
    with pytest.raises(QuicknatInputError, match="does not exist"):
        load_config(tmp_path / "gone.yaml")
