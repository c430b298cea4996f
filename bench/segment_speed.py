"""Seconds per scan for the full 3-view segmentation, per stage, with peak memory, and the
forward pass of MONAI's ``Quicknat`` (same filters and classes) over the same slices as the peer.

    python bench/segment_speed.py [--scan PATH] [--model PATH] [--device cpu|cuda] [--filters 64]
                                  [--peer-slices N] [--repeat 1]

Without --model, a QuickNAT with random weights and the given filters is used (speed does not
depend on the weights). Without --scan, ../shared/data/t1_unlabelled/whole_head_t1.nii.gz is
used when present, else a 256^3 1 mm phantom. For the peer ratio, both networks run over the same
sample of the scan's non-empty slices (--peer-slices, default 48), scaled to the full count.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quicknat.checkpoint import make_checkpoint, save_checkpoint, save_model
from quicknat.conform import ConformSettings
from quicknat.data.phantom import make_phantom
from quicknat.io import load_volume, save_volume, stem
from quicknat.labels import ASEG33
from quicknat.model import QuickNAT, QuickNATConfig
from quicknat.segment import EMPTY_SLICE, Segmenter, _head_box, write_outputs
from quicknat.views import VIEWS, slices

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCAN = ROOT.parent / "shared" / "data" / "t1_unlabelled" / "whole_head_t1.nii.gz"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_model(folder: Path, filters: int) -> Path:
    torch.manual_seed(0)
    paths = {}
    for v, spec in VIEWS.items():
        net = QuickNAT(QuickNATConfig(num_classes=spec.scheme(ASEG33).num_classes, num_filters=filters))
        paths[v] = save_checkpoint(make_checkpoint(net, v, ASEG33, ConformSettings()), folder / f"{v}.pt")
    save_model(folder, paths)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, default=None)
    ap.add_argument("--model", default=None, help="model folder/checkpoint or installed name (default: random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peer-slices", type=int, default=48, help="slices timed for the comparison (0: all)")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="qn_bench_"))

    scan = args.scan or (SHARED_SCAN if SHARED_SCAN.exists() else None)
    if scan is None:
        img, _ = make_phantom((256, 256, 256), (1, 1, 1), "LIA", seed=0, head_radius=95)
        scan = save_volume(img.array, img.affine, tmp / "phantom256.nii.gz")
    model = args.model or random_model(tmp / "model", args.filters)
    seg = Segmenter(model, device=args.device, batch_size=args.batch_size)
    args.filters = next(iter(seg.nets.values())).config.num_filters  # the peer gets the same width
    dev = seg.device

    # warm-up on a small crop so one-off costs (allocations, kernels) stay out of the numbers
    warm = make_phantom((64, 64, 64), (4, 4, 4), seed=1)[0]
    seg.segment(warm)
    sync(dev)

    rows = []
    t = time.perf_counter()
    vol = load_volume(scan)
    rows.append(("load", time.perf_counter() - t))
    res = seg.segment(vol)
    sync(dev)
    rows += [(k, v) for k, v in res.timings.items() if k != "total"]
    t = time.perf_counter()
    write_outputs(res, tmp / "out", stem(scan))
    rows.append(("write", time.perf_counter() - t))
    total = sum(v for _, v in rows)

    # per-view network time and slice count, for the peer comparison
    conformed = res.conformed_image
    start, stop = _head_box(conformed)
    crop = conformed[tuple(slice(a, b) for a, b in zip(start, stop))]
    view_slices = {}
    for name in VIEWS:
        st = slices(crop, name)
        keep = st.reshape(len(st), -1).max(1) > EMPTY_SLICE
        view_slices[name] = np.ascontiguousarray(st[keep])
    n_slices = sum(len(v) for v in view_slices.values())

    # Same-run comparison: both networks over the same sample of each view's slices, same batch.
    from monai.networks.nets import Quicknat

    take = 0
    ours_total = peer_total = 0.0

    def time_net(net, sample, pad: tuple[int, int] | None) -> float:
        with torch.inference_mode():
            sync(dev)
            t = time.perf_counter()
            for i in range(0, len(sample), seg.batch_size):
                x = torch.from_numpy(sample[i : i + seg.batch_size]).unsqueeze(1).to(dev)
                if pad:
                    x = torch.nn.functional.pad(x, (0, pad[1], 0, pad[0]))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=seg.amp):
                    net(x)
            sync(dev)
            return time.perf_counter() - t

    for name, st in view_slices.items():
        k = len(st) if args.peer_slices <= 0 else min(max(1, args.peer_slices // 3), len(st))
        sample = st[np.linspace(0, len(st) - 1, k).astype(int)]
        take += k
        scale = len(st) / k
        ours_total += time_net(seg.nets[name], sample, None) * scale
        if not args.no_peer:
            h, w = sample.shape[1:]
            n_cls = seg.nets[name].config.num_classes
            pnet = Quicknat(num_classes=n_cls, num_channels=1, num_filters=args.filters, se_block="None", drop_out=0)
            peer_total += time_net(pnet.eval().to(dev), sample, ((-h) % 16, (-w) % 16)) * scale
    peer = None if args.no_peer else peer_total

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nquicknat segment speed: {scan.name} {vol.shape}, {args.filters} filters, device {name}")
    print(f"{'stage':<28}{'seconds':>10}")
    for k, v in rows:
        print(f"{k:<28}{v:>10.2f}")
    print(f"{'total (end to end)':<28}{total:>10.2f}")
    print(f"{'peak RSS (MB)':<28}{peak_rss_mb():>10.0f}")
    if dev.type == "cuda":
        print(f"{'peak GPU memory (MB)':<28}{torch.cuda.max_memory_allocated(dev) / 2**20:>10.0f}")
    print(f"\nnetwork forward over {take} of the {n_slices} non-empty slices of the three views, "
          f"scaled to all (crop {tuple(int(s) for s in stop - start)}):")
    print(f"{'network':<28}{'seconds':>10}{'ratio':>10}")
    print(f"{'quicknat (this)':<28}{ours_total:>10.2f}{1.0:>10.2f}")
    if peer is not None:
        print(f"{'MONAI Quicknat (peer)':<28}{peer:>10.2f}{peer / ours_total:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
