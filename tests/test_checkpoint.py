import pickle

import pytest
import torch

from quicknat.checkpoint import (
    Model,
    load_checkpoint,
    load_model,
    make_checkpoint,
    save_checkpoint,
    save_model,
)
from quicknat.conform import ConformSettings
from quicknat.errors import ModelNotFoundError, QuicknatInputError
from quicknat.labels import ASEG33, TISSUE
from quicknat.model import QuickNAT, QuickNATConfig

S = ConformSettings(voxel_size=2.0, shape=(32, 32, 32))


def _ck(view="coronal", scheme=ASEG33, settings=S, filters=4):
    from quicknat.views import get_view

    n = get_view(view).scheme(scheme).num_classes
    return make_checkpoint(QuickNAT(QuickNATConfig(num_classes=n, num_filters=filters)), view, scheme, settings,
                           {"data": "unit test", "epochs": 0})


def test_round_trip_weights_only(tmp_path):
    ck = _ck("sagittal")
    p = save_checkpoint(ck, tmp_path / "s.pt")
    raw = torch.load(p, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == "quicknat-checkpoint" and raw["view"] == "sagittal"
    assert raw["scheme"]["name"] == "aseg33" and len(raw["scheme"]["classes"]) == 33
    back = load_checkpoint(p)
    assert back.scheme == ASEG33 and back.conform == S and back.config.num_classes == 19
    assert back.provenance["data"] == "unit test" and "date" in back.provenance
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ck.build()(x), back.build()(x))


def test_half_weights(tmp_path):
    ck = _ck()
    p = save_checkpoint(ck, tmp_path / "h.pt", half=True)
    raw = torch.load(p, weights_only=True)
    assert raw["state_dict"]["classifier.weight"].dtype == torch.float16
    net = load_checkpoint(p).build()
    assert net.classifier.weight.dtype == torch.float32


def test_refuses_pickles_and_tampering(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(QuicknatInputError, match="evil.pt"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()

    d = _ck().to_dict()
    del d["state_dict"]["classifier.bias"]
    torch.save(d, tmp_path / "missing.pt")
    with pytest.raises(QuicknatInputError, match="do not match"):
        load_checkpoint(tmp_path / "missing.pt")

    d = _ck().to_dict()
    d["arch"]["num_classes"] = 19  # coronal must predict all 33
    torch.save(d, tmp_path / "classes.pt")
    with pytest.raises(QuicknatInputError, match="needs 33"):
        load_checkpoint(tmp_path / "classes.pt")

    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(QuicknatInputError, match="not a quicknat checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_model_folder_and_disagreement(tmp_path):
    paths = {v: save_checkpoint(_ck(v), tmp_path / f"{v}.pt") for v in ("coronal", "axial", "sagittal")}
    m = load_model(tmp_path)  # no model.json: default weights
    assert m.weights == {"coronal": 0.4, "axial": 0.4, "sagittal": 0.2}
    save_model(tmp_path, paths, {"coronal": 0.5, "axial": 0.3, "sagittal": 0.2})
    assert load_model(tmp_path).weights["coronal"] == 0.5
    single = load_model(paths["axial"])
    assert list(single.views) == ["axial"]

    bad = tmp_path / "bad"
    bad.mkdir()
    save_checkpoint(_ck("coronal"), bad / "coronal.pt")
    save_checkpoint(_ck("axial", scheme=TISSUE), bad / "axial.pt")
    with pytest.raises(QuicknatInputError, match="label scheme"):
        load_model(bad)
    save_checkpoint(_ck("axial", settings=ConformSettings(2.0, (32, 32, 32), orientation="RAS")), bad / "axial.pt")
    with pytest.raises(QuicknatInputError, match="conform"):
        load_model(bad)
    # views may run on different grids (voxel size and shape): the finest is the model's
    fine = ConformSettings(voxel_size=1.5, shape=(40, 40, 40))
    save_checkpoint(_ck("axial", settings=fine), bad / "axial.pt")
    save_checkpoint(_ck("sagittal"), bad / "sagittal.pt")
    save_checkpoint(_ck("coronal"), bad / "coronal.pt")
    mixed = load_model(bad)
    assert mixed.conform == fine and mixed.grids == {fine: ["axial"], S: ["coronal", "sagittal"]}
    with pytest.raises(QuicknatInputError, match="listed as"):
        Model({"axial": load_checkpoint(paths["coronal"])}, {"axial": 1.0})


def test_missing_model(tmp_path, monkeypatch):
    import quicknat.checkpoint as cp

    monkeypatch.setattr(cp, "installed_models", lambda: {})
    with pytest.raises(ModelNotFoundError, match="no model is installed"):
        load_model(None)
    with pytest.raises(ModelNotFoundError, match="no such model"):
        load_model(tmp_path / "nope")


REAL_WITH_FLIP = 0.813  # the model card's real-scan figure (bench/default_model_accuracy.py)


def test_shipped_default_model():
    m = load_model(None)
    assert set(m.views) == {"coronal", "axial", "sagittal"} and m.scheme.name == "aseg33"
    assert m.conform.voxel_size == 1.5 and m.flip  # aggregated on the 1.5 mm views' grid; flip averaging on
    assert m.weights == {"coronal": 1.0, "axial": 1.0, "sagittal": 1.0}  # chosen by bench/view_weights.py
    for view, ck in m.views.items():
        raw = torch.load(ck.path, weights_only=True)
        assert raw["state_dict"]["classifier.weight"].dtype == torch.float16
        assert "Apache" in ck.provenance["data"]["source"]
        stages = [s["recipe"] for s in ck.provenance["stages"]]
        # the v4 recipe (crops) trained the coronal and axial views twice (stages v4, v5), the sagittal once (v5);
        # then the coronal and axial views went 2.5D (stage v6: a slice and its two neighbours as input) and
        # trained on narrower image degradations (stage v7); stage v8 (dropout 0.05) trained all three; stage v9
        # widened all three to 24 filters, stage v10 to 32; stage v11 dropped the CE's class weights; stage v13's
        # recipe trained the axial and sagittal views on a 1.5 mm grid (shipped with stage v14), and a second
        # learning-rate cycle on that grid (configs/synth_cpu_v15_15mm*.yaml) trained them again (stage v16);
        # stage v18 trained them with the cortex depth gradient (the sagittal view after a third v15 cycle)
        crops = ["configs/synth_cpu_v4.yaml", "configs/synth_cpu_v8_2d.yaml", "configs/synth_cpu_v9_2d.yaml",
                 "configs/synth_cpu_v10_2d.yaml", "configs/synth_cpu_v11_2d.yaml",
                 "configs/synth_cpu_v13_15mm_2d.yaml", "configs/synth_cpu_v15_15mm_2d.yaml",
                 "configs/synth_cpu_v15_15mm_2d.yaml", "configs/synth_cpu_v18_15mm_2d.yaml"] \
            if view == "sagittal" else ["configs/synth_cpu_v4.yaml"] * 2 + [
                "configs/synth_cpu_v6.yaml", "configs/synth_cpu_v7.yaml", "configs/synth_cpu_v8.yaml",
                "configs/synth_cpu_v9.yaml", "configs/synth_cpu_v10.yaml", "configs/synth_cpu_v11.yaml"] + (
                ["configs/synth_cpu_v13_15mm.yaml", "configs/synth_cpu_v15_15mm.yaml",
                 "configs/synth_cpu_v18_15mm.yaml"] if view == "axial" else [])
        assert stages == ["configs/synth_cpu.yaml", "configs/synth_cpu_more.yaml", "configs/synth_cpu_v2.yaml",
                          "configs/synth_cpu_v3.yaml", *crops]
        assert ck.config.in_channels == (1 if view == "sagittal" else 3)
        assert ck.provenance["config"].get("context", 0) == (0 if view == "sagittal" else 1)  # 0 before the key
        # the last stages (T1-like samples only) trained all three views
        assert ck.provenance["config"]["synth"]["random_share"] == 0.0
        fine = view != "coronal"  # the views run on two grids; the model aggregates on the finer
        assert ck.provenance["config"]["synth"]["crop"] == (128 if fine else 96)
        assert ck.conform.voxel_size == (1.5 if fine else 2.0)
        assert ck.conform.shape == ((176,) * 3 if fine else (128,) * 3)
        assert ck.provenance["config"]["synth"]["thick_prob"] == 0.1  # v7's narrower degradations
        assert ck.config.dropout == 0.05 and ck.provenance["config"]["dropout"] == 0.05  # stage v8
        assert ck.config.num_filters == 32 == ck.provenance["config"]["num_filters"]
        assert ck.provenance["config"]["weight_power"] == 0.0  # stage v11: unweighted cross-entropy
        assert ck.provenance["view_weights"]["chosen"] == {"coronal": 1, "axial": 1, "sagittal": 1}
        assert ck.provenance["bench"]["real_scan_mean_dice_31"]["with_flip"] == REAL_WITH_FLIP
        # measured on FSL's whole-head MNI152 (bench --mni-whole-head), no longer "not measured"
        assert ck.provenance["bench"]["mni152_whole_head_outside_percent"]["with_flip"]["nilearn_brain_mask"] == 0.85
        assert ck.provenance["data"]["validation_maps"] == ["training_seg_19", "training_seg_20"]


def test_export_gathers_views_for_shipping(tmp_path, tiny_model):
    import json

    from quicknat.checkpoint import load_model
    from quicknat.cli import main

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"recipe": "test recipe", "bench": {"real": 0.5}}))
    # the coronal view taken from a second source replaces the first's
    assert main(["export", str(tiny_model), str(tiny_model / "coronal" / "last.pt"), "-o", str(tmp_path / "m"),
                 "--provenance", str(card)]) == 0
    m = load_model(tmp_path / "m")
    assert set(m.views) == {"coronal", "axial", "sagittal"}
    for ck in m.views.values():
        assert ck.training_state is None and ck.provenance["recipe"] == "test recipe"
        stored = torch.load(ck.path, weights_only=True)["state_dict"].values()
        assert all(t.dtype == torch.float16 for t in stored if t.is_floating_point())
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    card.write_text("[1, 2]")
    assert main(["export", str(tiny_model), "-o", str(tmp_path / "y"), "--provenance", str(card)]) == 2


def test_export_view_weights(tmp_path, tiny_model, capsys):
    import json

    from quicknat.cli import main

    def weights(folder):
        return {v: e["weight"] for v, e in json.loads((folder / "model.json").read_text())["views"].items()}

    assert main(["export", str(tiny_model), "-o", str(tmp_path / "eq"),
                 "--weights", "coronal=1", "axial=1", "sagittal=1.5"]) == 0
    assert weights(tmp_path / "eq") == {"coronal": 1.0, "axial": 1.0, "sagittal": 1.5}
    assert load_model(tmp_path / "eq").weights == {"coronal": 1.0, "axial": 1.0, "sagittal": 1.5}
    # replacing a view of a model folder keeps the model's weights; a lone checkpoint gets its view's default
    last = tiny_model / "coronal" / "last.pt"
    assert main(["export", str(tmp_path / "eq"), str(last), "-o", str(tmp_path / "re")]) == 0
    assert weights(tmp_path / "re") == {"coronal": 1.0, "axial": 1.0, "sagittal": 1.5}
    assert main(["export", str(tmp_path / "eq"), str(tiny_model), "-o", str(tmp_path / "re2")]) == 0  # run folder
    assert weights(tmp_path / "re2") == {"coronal": 1.0, "axial": 1.0, "sagittal": 1.5}
    assert main(["export", str(last), "-o", str(tmp_path / "run")]) == 0
    assert weights(tmp_path / "run") == {"coronal": 0.4}
    for bad, says in ((["sagittal=-1"], "weight must be a number >= 0"), (["sagital=1"], "does not hold"),
                      (["coronal"], "expected VIEW=NUMBER"),
                      (["coronal=0", "axial=0", "sagittal=0"], "sum to 0")):
        capsys.readouterr()
        assert main(["export", str(tiny_model), "-o", str(tmp_path / "bad"), "--weights", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "Traceback" not in err and len(err.splitlines()) == 1
        assert not (tmp_path / "bad" / "model.json").exists()
    spec = json.loads((tmp_path / "eq" / "model.json").read_text())
    spec["views"]["axial"]["weight"] = float("nan")
    (tmp_path / "eq" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(QuicknatInputError, match="axial view's weight"):
        load_model(tmp_path / "eq")


def test_model_flip_default_travels_in_model_json(tmp_path, tiny_model, capsys):
    import json

    from quicknat.cli import main
    from quicknat.segment import Segmenter

    assert load_model(tiny_model).flip  # no "flip" in model.json: on
    assert main(["export", str(tiny_model), "-o", str(tmp_path / "off"), "--default-flip", "off"]) == 0
    assert json.loads((tmp_path / "off" / "model.json").read_text())["flip"] is False
    off = load_model(tmp_path / "off")
    assert off.flip is False
    assert Segmenter(off, device="cpu").flip is False  # the model's choice ...
    assert Segmenter(off, device="cpu", flip=True).flip is True  # ... unless the caller says otherwise
    assert Segmenter(tiny_model, device="cpu").flip is True
    # replacing a view keeps the model's choice; --default-flip overrides it
    last = tiny_model / "coronal" / "last.pt"
    assert main(["export", str(tmp_path / "off"), str(last), "-o", str(tmp_path / "re")]) == 0
    assert load_model(tmp_path / "re").flip is False
    assert main(["export", str(tmp_path / "off"), "-o", str(tmp_path / "on"), "--default-flip", "on"]) == 0
    assert load_model(tmp_path / "on").flip is True
    spec = json.loads((tmp_path / "on" / "model.json").read_text())
    spec["flip"] = "yes"
    (tmp_path / "on" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(QuicknatInputError, match="flip must be true or false"):
        load_model(tmp_path / "on")
