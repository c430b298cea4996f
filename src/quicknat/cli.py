"""The ``quicknat`` command: a thin layer that parses flags and calls the API functions.

Every subcommand shares the same meaning for ``--device``, ``--batch-size``, ``--threads`` and
``-v``. Bad input ends with one line ``quicknat: error: FILE: problem`` and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import ModelNotFoundError, QuicknatError, QuicknatInputError
from .views import VIEW_NAMES

log = logging.getLogger("quicknat")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.exit(2, f"quicknat: error: {message}\n")


def _device(text: str) -> str:
    """argparse type: auto, cpu, cuda, cuda:N or mps (checked before any work)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return text


def _shard(text: str) -> tuple[int, int]:
    """argparse type: ``K/N`` with 1 <= K <= N."""
    from .discover import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a one-line usage error, exit 2)."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _common(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda[:N] or mps")
    if batch:
        p.add_argument("--batch-size", type=_count, default=None, help="slices per forward pass")
    p.add_argument("--threads", type=_count, default=None, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")


def _flip_args(p: argparse.ArgumentParser, prefix: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--flip", action="store_const", const=True, help=f"{prefix}test-time left-right flip averaging "
                   "(default: the model's choice, model.json; it costs ~1.8x network time)")
    g.add_argument("--no-flip", dest="flip", action="store_const", const=False, help=f"{prefix}no flip averaging")


def _add_prepare_parsers(sub) -> None:
    p = sub.add_parser("prepare", help="prepare a data set (OASIS-1, FreeSurfer subjects, label maps)")
    psub = p.add_subparsers(dest="source", metavar="SOURCE", parser_class=_Parser, required=True)
    q = psub.add_parser("oasis", help="download, check, extract and convert OASIS-1; write manifest.json")
    q.add_argument("--root", type=Path, default=None, help="data root (default: $MONAI_DATA_DIRECTORY)")
    q.add_argument("--discs", type=int, nargs="+", default=[1], help="OASIS-1 discs (default: 1)")
    q.add_argument("--url", default=None, help="archive URL ({disc} is replaced by the disc number)")
    q.add_argument("--md5", default=None, help="expected md5 of the archive")
    q.add_argument("--labels", choices=["fsl", "freesurfer"], default="fsl")
    _split_flags(q)
    q.set_defaults(func=_cmd_prepare_oasis)
    q = psub.add_parser("freesurfer", help="FreeSurfer subjects (orig.mgz + aseg.mgz) -> manifest.json")
    q.add_argument("--subjects-dir", type=Path, required=True)
    q.add_argument("-o", "--output", type=Path, default=None, help="folder for manifest.json")
    _split_flags(q)
    q.set_defaults(func=_cmd_prepare_freesurfer)
    q = psub.add_parser("labelmaps", help="a folder of label maps -> manifest.json (synthetic training)")
    q.add_argument("folder", type=Path)
    q.add_argument("-o", "--output", type=Path, default=None, help="folder for manifest.json")
    q.add_argument("--holdout", nargs="+", default=(), metavar="NAME",
                   help="label maps (file stems) held out for validation instead of a random split")
    q.add_argument("--validation-scan", nargs=2, action="append", default=[], metavar=("IMAGE", "LABEL"),
                   help="a real labelled scan for validation (repeatable); the best epoch is the best on these")
    _split_flags(q)
    q.set_defaults(func=_cmd_prepare_labelmaps)


def _add_segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment T1 scans (files or folders)")
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                   help="scans or folders of scans; none: the bundled example scan")
    p.add_argument("-o", "--output", type=Path, default=None, help="output folder (default: ./quicknat_out)")
    p.add_argument("--model", default=None, help="installed model name or a model folder/checkpoint")
    p.add_argument("--mc", type=_count, default=0, metavar="N", help="Monte-Carlo dropout passes for QC")
    p.add_argument("--tissue", action="store_true", help="also write the tissue (CSF/GM/WM) segmentation")
    p.add_argument("--posteriors", action="store_true", help="also write class probabilities (4D NIfTI)")
    p.add_argument("--uncertainty", action="store_true", help="with --mc: write the voxel-wise entropy map")
    p.add_argument("--no-overlay", action="store_true", help="do not draw the overlay PNG")
    _flip_args(p, "")
    p.add_argument("--no-clean", dest="clean", action="store_false",
                   help="keep labels off the brain's largest connected component (by default they become background)")
    p.add_argument("--csf-reach", type=float, default=6.0, metavar="MM", help="CSF farther than MM from the "
                   "brain's other structures becomes background (default 6; 0 keeps all CSF)")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast: faster, but changes some voxels (docs/performance.md)")
    p.add_argument("--max-voxels", type=_count, default=None, metavar="N",
                   help="refuse scans with more voxels than this (default 2^28, about 645^3)")
    p.add_argument("--pattern", default=None, metavar="GLOB",
                   help="in input folders, take the files matching GLOB (default: BIDS *_T1w, FreeSurfer "
                        "mri/orig.mgz, else every image but quicknat's outputs)")
    p.add_argument("--bids", action="store_true",
                   help="BIDS derivatives (automatic for a BIDS dataset root): DATASET/derivatives/quicknat/")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep scans whose outputs are complete and newer than the scan (resume a run)")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="segment the K-th of N shares of the inputs (automatic under torchrun)")
    _common(p)
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("stats", help="rebuild the cohort tables of an output folder (merges sharded runs)")
    p.add_argument("folder", type=Path, help="a quicknat segment output folder")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=_cmd_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quicknat", description="Fast whole-brain segmentation of T1 MRI with QuickNAT.")
    parser.add_argument("--version", action="version", version=f"quicknat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_segment_parser(sub)
    _add_prepare_parsers(sub)

    p = sub.add_parser("train", help="train QuickNAT views on a manifest")
    p.add_argument("manifest", type=Path, help="manifest.json (or its folder)")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder (becomes a model folder)")
    p.add_argument("--view", default="all", choices=["all", *VIEW_NAMES])
    p.add_argument("--config", type=Path, default=None, help="YAML config (defaults < file < flags)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None)
    p.add_argument("--filters", type=int, default=None, help="filters per block (64 in the paper)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--init", type=Path, default=None, help="pre-trained checkpoint or model folder (fine-tuning)")
    p.add_argument("--reset-classifier", action="store_true", help="with --init: new classifier for a new scheme")
    p.add_argument("--resume", action="store_true", help="continue from RUNDIR/VIEW/last.pt")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score segmentations against references")
    p.add_argument("--pred", type=Path, default=None, help="predicted label map or folder")
    p.add_argument("--ref", type=Path, default=None, help="reference label map or folder")
    p.add_argument("--scheme", default="aseg33", help="aseg33, tissue or a colour-LUT file")
    p.add_argument("--resample", action="store_true", help="resample predictions onto the reference grid")
    p.add_argument("--model", default=None, help="with --manifest: segment the split's scans with this model")
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    p.add_argument("--mc", type=_count, default=0, help="with --model: MC-dropout passes (QC in the report)")
    _flip_args(p, "with --model: ")
    p.add_argument("-o", "--output", type=Path, default=None, help="folder (or metrics .csv for file pairs)")
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("show", help="draw a scan (and a segmentation) in three planes")
    p.add_argument("image", type=Path)
    p.add_argument("--seg", type=Path, default=None)
    p.add_argument("--scheme", default=None,
                   help="label names and colours: aseg33, tissue or a LUT file (default: from the labels)")
    p.add_argument("-o", "--output", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("report", help="HTML report of a training run or an evaluation")
    p.add_argument("folder", type=Path, help="run folder (quicknat train) or evaluation folder")
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML file (default: FOLDER/report.html)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="gather view checkpoints into a model folder for shipping (float16)")
    p.add_argument("sources", nargs="+", type=Path, help="checkpoints or run folders; later ones replace a view")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    p.add_argument("--provenance", type=Path, help="JSON object merged into each view's provenance (model card)")
    p.add_argument("--float32", action="store_true", help="keep float32 weights")
    p.add_argument("--default-flip", choices=("on", "off"), default=None,
                   help="whether the model runs with test-time flip averaging unless segment says otherwise "
                        "(default: the first source model's choice, else on)")
    p.add_argument("--weights", nargs="+", default=None, metavar="VIEW=W",
                   help="view weights, e.g. coronal=1 axial=1 sagittal=1 (default: the first source's if a model, else "
                        "0.4/0.4/0.2); bench/view_weights.py measures them")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=_cmd_export)
    return parser


def _split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    p.add_argument("--resplit", action="store_true", help="replace an existing split")
    p.add_argument("-v", "--verbose", action="count", default=0)


def _cmd_prepare_oasis(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_oasis

    path = prepare_oasis(args.root, discs=args.discs, url=args.url, md5=args.md5, labels=args.labels,
                         seed=args.seed, resplit=args.resplit, progress=sys.stderr.isatty())
    return _report_manifest(path)


def _cmd_prepare_freesurfer(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_freesurfer

    return _report_manifest(prepare_freesurfer(args.subjects_dir, args.output, seed=args.seed, resplit=args.resplit))


def _cmd_prepare_labelmaps(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_labelmaps

    return _report_manifest(prepare_labelmaps(args.folder, args.output, seed=args.seed, resplit=args.resplit,
                                              holdout=args.holdout, validation_scans=args.validation_scan))


def _report_manifest(path: Path) -> int:
    from .data.manifest import load_manifest

    m = load_manifest(path)
    sizes = ", ".join(f"{k} {len(m.split.get(k, []))}" for k in ("train", "validation", "test"))
    print(f"wrote {path}: {len(m.scans)} scans ({sizes}); {len(m.missing)} skipped")
    for miss in m.missing:
        print(f"  skipped {miss['id']}: {miss['reason']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(
        args.config, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, num_filters=args.filters,
        num_workers=args.workers, seed=args.seed, batch_size=args.batch_size,
    )
    out = train(args.manifest, args.output, args.view, cfg, init=args.init, reset_classifier=args.reset_classifier,
                resume=args.resume, device=args.device, progress=sys.stderr.isatty())
    from .device import is_main

    if is_main():
        print(f"wrote model to {out} (use: quicknat segment SCAN --model {out})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_files, evaluate_model, format_summary

    if args.manifest is not None:
        out = args.output or Path("quicknat_eval")
        path, summary = evaluate_model(args.model, args.manifest, split=args.split, out=out, device=args.device,
                                       batch_size=args.batch_size, mc=args.mc, flip=args.flip)
    elif args.pred is not None and args.ref is not None:
        path, summary = evaluate_files(args.pred, args.ref, args.scheme, out=args.output, resample=args.resample)
    else:
        print("quicknat: error: give --pred and --ref, or --manifest (with --model)", file=sys.stderr)
        return 2
    print(format_summary(summary))
    summary_path = path.with_name("summary.csv" if path.name == "metrics.csv" else f"{path.stem}_summary.csv")
    print(f"wrote {path} and {summary_path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, parse_view_weights, read_provenance

    extra = None if args.provenance is None else read_provenance(args.provenance)
    out = export_model(args.sources, args.output, provenance=extra, half=not args.float32,
                       weights=parse_view_weights(args.weights) if args.weights else None,
                       flip=None if args.default_flip is None else args.default_flip == "on")
    print(f"wrote model to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, plot_history

    plot_history(args.folder)
    out = build_report(args.folder, args.output or args.folder / "report.html")
    print(f"wrote {out}")
    return 0


def _setup(args: argparse.Namespace) -> None:
    level = logging.WARNING - 10 * min(2, getattr(args, "verbose", 0) + 1)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "fsspec"):  # their debug lines are not ours
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _cmd_segment(args: argparse.Namespace) -> int:
    from .discover import plan_run

    plan = plan_run(args.inputs, args.output, pattern=args.pattern, bids=args.bids, mc=args.mc,
                    uncertainty=args.uncertainty)  # every check that needs no model, before torch is imported
    from .runner import segment_files

    run = segment_files(
        args.inputs,
        args.output,
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
        mc=args.mc,
        tissue=args.tissue,
        posteriors=args.posteriors,
        uncertainty=args.uncertainty,
        overlay=not args.no_overlay,
        amp=args.amp,
        flip=args.flip,
        clean=args.clean,
        csf_reach_mm=args.csf_reach,
        progress=sys.stderr.isatty(),
        max_voxels=args.max_voxels,
        pattern=args.pattern,
        bids=args.bids,
        skip_existing=args.skip_existing,
        shard=args.shard,
        log_file=True,
        plan=plan,
    )
    for o in run.failed:
        print(f"quicknat: error: {o.error}", file=sys.stderr)
    kept = sum(o.skipped for o in run.outcomes)
    done = len(run.outcomes) - len(run.failed) - kept
    print(f"segmented {done} scan(s)" + (f", kept {kept} done before" if kept else "")
          + (f", {len(run.failed)} failed (listed in {run.failures})" if run.failed else "")
          + f"; volumes of all in {run.table}")
    return 2 if run.failed else 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .cohort import rebuild_tables

    if not args.folder.is_dir():
        raise QuicknatInputError(args.folder, "is not a folder")
    table, failures, n, n_failed = rebuild_tables(args.folder)
    if n == 0:
        raise QuicknatInputError(args.folder, "holds no quicknat segmentations (no *_seg.json sidecars)")
    print(f"wrote {table} ({n} scan(s))" + (f" and {failures} ({n_failed} failed)" if n_failed else ""))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .io import load_volume, stem
    from .labels import get_scheme
    from .report import save_overlay

    image = load_volume(args.image)
    seg = load_volume(args.seg) if args.seg else None
    out = args.output or Path(f"{stem(args.image)}_show.png")
    save_overlay(image, seg, out, scheme=get_scheme(args.scheme) if args.scheme else None, title=args.image.name)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--reference"]:
        from .clidoc import reference_markdown

        print(reference_markdown(parser), end="")
        return 0
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup(args)
    try:
        return int(args.func(args) or 0)
    except (QuicknatInputError, ModelNotFoundError) as exc:
        print(f"quicknat: error: {exc}", file=sys.stderr)
        return 2
    except QuicknatError as exc:
        print(f"quicknat: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quicknat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
