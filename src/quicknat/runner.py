"""Running segmentation over a cohort: :func:`segment_files` finds and names the inputs
(:mod:`quicknat.discover`), checks everything before work, segments the scans with I/O streamed
beside compute (a failing scan recorded and skipped), writes each scan's outputs
(:func:`quicknat.outputs.write_outputs`) and the run's tables (:mod:`quicknat.cohort`), and logs
progress (a tqdm bar on a terminal, one line per scan, the run's log file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .atomic import remove_stale_temps
from .checkpoint import Model, installed_models
from .cohort import cohort_rows, write_cohort_table, write_dataset_description, write_failures, write_lut
from .discover import Discovery, find_inputs, plan_run, select_shard, shard_from_env
from .errors import QuicknatError, QuicknatInputError
from .io import Volume, load_volume
from .outputs import example_scan, is_complete, output_names, write_outputs
from .result import SegmentationResult
from .segment import Segmenter

log = logging.getLogger(__name__)


def _load(path: Path, limit: int | None = None) -> tuple[Volume, float]:
    t = time.perf_counter()
    return load_volume(path, limit=limit), time.perf_counter() - t


def _settle(oc: ScanOutcome, job: Callable[[], object]) -> object:
    """Run ``job``; a failure becomes the scan's error (and None is returned)."""
    try:
        return job()
    except (QuicknatInputError, QuicknatError) as exc:
        oc.error = str(exc)
    except Exception as exc:  # one bad scan must not stop a cohort
        log.debug("failure on %s", oc.path, exc_info=True)
        oc.error = f"{oc.path}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _submit(pool: ThreadPoolExecutor, stream: bool, fn, *args) -> Future:
    """``fn(*args)`` in ``pool`` when streaming; else run now, its outcome in a done future."""
    if stream:
        return pool.submit(fn, *args)
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as exc:
        done.set_exception(exc)
    return done


@dataclass
class ScanOutcome:
    path: Path
    name: str = ""
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What a :func:`segment_files` run did: each scan's outcome and the run's tables."""

    outcomes: list[ScanOutcome]
    outdir: Path
    discovery: Discovery
    table: Path | None = None
    failures: Path | None = None

    @property
    def failed(self) -> list[ScanOutcome]:
        return [o for o in self.outcomes if o.error]


def _run_files(outdir: Path, shard: tuple[int, int] | None) -> tuple[Path, Path, Path]:
    tag = "" if shard is None else f"_shard-{shard[0]}-of-{shard[1]}"
    return outdir / f"volumes{tag}.csv", outdir / f"failures{tag}.csv", outdir / f"quicknat{tag}.log"


@contextlib.contextmanager
def _log_to(path: Path | None) -> Iterator[None]:
    """Copy quicknat's log records (info and up) to ``path`` while the run lasts."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("quicknat")
    old = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()


def _timing_text(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in t.items())


def segment_files(
    inputs: Sequence[str | Path],
    outdir: str | Path | None = None,
    *,
    model: Model | str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    mc: int = 0,
    tissue: bool = False,
    posteriors: bool = False,
    uncertainty: bool = False,
    overlay: bool = True,
    amp: bool = False,
    flip: bool | None = None,
    clean: bool = True,
    csf_reach_mm: float = 6.0,
    progress: bool = False,
    segmenter: Segmenter | None = None,
    stream: bool = True,
    max_voxels: int | None = None,
    pattern: str | None = None,
    bids: bool = False,
    skip_existing: bool = False,
    shard: tuple[int, int] | None = None,
    log_file: bool = False,
    plan: tuple[Discovery, Path] | None = None,
) -> RunSummary:
    """Segment scans (files or folders, found and named by :func:`quicknat.discover.find_inputs`);
    a scan that fails is recorded and skipped.

    Everything is checked before any scan is read (output folder, flags, inputs, unique names),
    and the model is loaded before any scan, so a missing model fails once, up front. The run
    writes, at the output root: the cohort table ``volumes.csv`` (one row per scan of this run,
    :mod:`quicknat.cohort`), ``failures.csv`` (input, reason), the colour table
    ``<scheme>_lut.txt`` and, with ``log_file``, ``quicknat.log``; a run with ``shard=(K, N)``
    (or under ``torchrun``) takes every N-th scan from the K-th and suffixes those files with
    ``_shard-K-of-N`` (``quicknat stats`` merges them). In BIDS mode (``bids``, or an input folder
    that is a BIDS root) outputs go to ``<root>/derivatives/quicknat/sub-X/[ses-Y/]anat/`` unless
    ``outdir`` is given. ``skip_existing`` keeps scans whose outputs are complete and newer than
    their input. With ``stream`` (the default), I/O overlaps compute: the next scan is read in one
    thread and the previous scan's outputs are written in another while the current scan is
    segmented. ``flip``, ``clean`` and ``csf_reach_mm``: :class:`quicknat.segment.Segmenter`'s. ``max_voxels``
    raises the voxel limit of :func:`quicknat.io.max_voxels`. ``plan``: the
    result of :func:`quicknat.discover.plan_run` for these arguments, when the caller already has it.
    """
    found, outdir = plan or plan_run(list(inputs), outdir, pattern=pattern, bids=bids, mc=mc,
                                     uncertainty=uncertainty)
    bids_mode = found.bids
    shard = shard or shard_from_env()
    if shard is not None and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard[0] - 1)) % torch.cuda.device_count()}"
    seg = segmenter or Segmenter(model, device=device, batch_size=batch_size, amp=amp, flip=flip, clean=clean,
                                 csf_reach_mm=csf_reach_mm)
    seg.progress = progress
    if not inputs:
        found = find_inputs([example_scan()])
    scans = select_shard(found.scans, shard)
    table_path, failures_path, log_path = _run_files(outdir, shard)
    layout = "bids" if bids_mode else "plain"
    meta = {"model": _model_label(model, seg), "quicknat_version": __version__,
            "options": {"flip": seg.flip, "mc": mc, "clean": clean, "csf_reach_mm": csf_reach_mm, "amp": amp}}
    wanted = ["seg", "volumes"] + ["tissue"] * tissue + ["posteriors"] * posteriors + ["overlay"] * overlay
    with _log_to(outdir / log_path.name if log_file else None):
        remove_stale_temps(outdir)
        log.info("%s%s; writing to %s", found.summary(),
                 f", this process takes shard {shard[0]}/{shard[1]}: {len(scans)}" if shard else "", outdir)
        outcomes = _outcomes(scans, outdir, seg.scheme, layout, wanted if skip_existing else None)
        todo = [(oc, outdir / s.subdir, s) for oc, s in zip(outcomes, scans) if not oc.skipped]
        if len(todo) < len(outcomes):
            log.info("%d scan(s) already done, kept (--skip-existing)", len(outcomes) - len(todo))
        _run(todo, seg, stream, progress, max_voxels,
             lambda oc, res, where, s: write_outputs(
                 res, where, s.name, tissue=tissue, overlay=overlay, layout=layout,
                 meta={**meta, "input": str(s.path.resolve())}),
             dict(mc=mc, posteriors=posteriors, uncertainty=uncertainty and mc > 0))
        table, fails = _write_run_tables(outdir, seg.scheme, bids_mode, outcomes, table_path, failures_path)
    return RunSummary(outcomes, outdir, found, table, fails)


def _write_run_tables(outdir: Path, scheme, bids_mode: bool, outcomes: list[ScanOutcome], table_path: Path,
                      failures_path: Path) -> tuple[Path, Path]:
    """The run's files at the output root: colour table, BIDS description, cohort and failure tables."""
    write_lut(outdir, scheme)
    if bids_mode:
        write_dataset_description(outdir, __version__)
    done = [o.outputs[0] for o in outcomes if not o.error and o.outputs]
    table = write_cohort_table(table_path, cohort_rows(done))
    fails = write_failures(failures_path, [(str(o.path.resolve()), o.error or "") for o in outcomes if o.error])
    return table, fails


def _outcomes(scans: list, outdir: Path, scheme, layout: str, wanted: list[str] | None) -> list[ScanOutcome]:
    """One outcome per scan; with ``wanted`` (``--skip-existing``) complete scans are marked kept."""
    outcomes = []
    for s in scans:
        where = outdir / s.subdir
        oc = ScanOutcome(s.path, s.name)
        if wanted is not None and is_complete(where, s.name, scheme, layout, s.path, wanted):
            oc.skipped = True
            oc.outputs = [where / output_names(s.name, scheme, layout)["sidecar"]]
        outcomes.append(oc)
    return outcomes


def _model_label(model: Model | str | Path | None, seg: Segmenter) -> str:
    """How the sidecar names the model: as the user gave it, else its folder, else "default"."""
    if isinstance(model, (str, Path)):
        return str(model)
    path, installed = seg.model.path, installed_models()
    for name, where in installed.items():
        if path is not None and Path(path).resolve() == where.resolve():
            return name
    return str(path) if path is not None else "in-memory model"


def _run(todo, seg: Segmenter, stream: bool, progress: bool, max_voxels: int | None, write_fn, options: dict) -> None:
    """Segment ``todo`` ((outcome, folder, scan) triples) with I/O streamed beside compute: at
    most one scan is read ahead and one result waits to be written."""
    n = len(todo)

    def write(i: int, res: SegmentationResult) -> None:
        oc, where, s = todo[i]
        t = time.perf_counter()
        oc.outputs = write_fn(oc, res, where, s)
        res.timings["write"] = time.perf_counter() - t
        oc.timings = res.timings

    def finish(i: int, job: Future | None) -> None:
        oc = todo[i][0]
        if job is not None:
            _settle(oc, job.result)
        if oc.error is None:  # a failure is the caller's to report, once
            took = oc.timings.get("total", 0.0)  # conform, network, back to the scan's grid (reading and
            # writing overlap the neighbouring scans)
            log.info("[%d/%d] %s: segmented in %.1f s -> %s", i + 1, n, oc.name, took, oc.outputs[1])
            log.debug("    stages (reading and writing overlap the next scan): %s", _timing_text(oc.timings))

    def compute(reading: Future) -> SegmentationResult:
        vol, seconds = reading.result()
        res = seg.segment(vol, **options)
        res.timings["load"] = seconds
        return res

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer, logging_redirect_tqdm():
        def read(i: int) -> Future | None:
            return _submit(reader, stream, _load, todo[i][0].path, max_voxels) if i < n else None

        reading = read(0)
        writing: tuple[int, Future] | None = None
        for i in tqdm(range(n), desc="segment", unit="scan", disable=not progress):
            oc = todo[i][0]
            current = reading
            reading = read(i + 1)
            res = _settle(oc, lambda current=current: compute(current))
            if writing is not None:
                finish(*writing)
                writing = None
            if res is not None:
                writing = (i, _submit(writer, stream, write, i, res))
            else:
                finish(i, None)
        if writing is not None:
            finish(*writing)
