"""Seconds per scan for the full 3-view segmentation, per stage, with peak memory, and the
forward pass of MONAI's ``Quicknat`` (same filters and classes) over the same slices as the peer.

    python bench/segment_speed.py [--scan PATH] [--model PATH] [--device cpu|cuda] [--filters 64]
                                  [--peer-slices N] [--amp] [--cohort N] [--no-reference]

Without --model, a QuickNAT with random weights and the given filters is used (speed does not
depend on the weights). Without --scan, ../shared/data/t1_unlabelled/whole_head_t1.nii.gz is
used when present, else a 256^3 1 mm phantom. For the peer ratio, both networks run over the same
sample of the scan's non-empty slices (--peer-slices, default 48), scaled to the full count.
The stage table also times the reference path (every speed choice off, batch 1) in the same run,
and the work table counts the network's FLOPs against the machine's measured matmul rate (the
floor). --cohort N times N scans through ``segment_files`` with and without I/O overlap.
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
from quicknat.conform import ConformSettings, plan_conform
from quicknat.data.phantom import make_phantom
from quicknat.io import load_volume, save_volume, stem
from quicknat.labels import ASEG33
from quicknat.model import QuickNAT, QuickNATConfig
from quicknat.outputs import write_outputs
from quicknat.segment import EMPTY_SLICE, Segmenter, SpeedPaths, head_box
from quicknat.views import VIEWS, get_view, slice_box, slices

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


def conv_flops(net: torch.nn.Module, h: int, w: int) -> float:
    """Floating-point operations of one forward pass of a (1, in_channels, h, w) slice (2 per MAC,
    convs and the classifier; batch norm, PReLU, pooling and softmax are a rounding error)."""
    total = 0.0

    def hook(mod, inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2.0 * mod.in_channels * mod.out_channels * k * out.shape[-2] * out.shape[-1]

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(1, net.config.in_channels, h, w, device=next(net.parameters()).device))
    for hd in handles:
        hd.remove()
    return total


def machine_rate(dev: torch.device) -> float:
    """Measured dense float32 rate (FLOP/s): a 2048^3 matrix product, best of 5."""
    a = torch.randn(2048, 2048, device=dev)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t = time.perf_counter()
        a @ a
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def run_views(seg: Segmenter, stacks: dict[str, np.ndarray], nets: dict[str, torch.nn.Module]) -> float:
    """Seconds for ``nets`` over ``stacks`` (whole slices), batched and formatted as ``seg`` does."""
    dev = seg.device
    with torch.inference_mode():
        sync(dev)
        t = time.perf_counter()
        for name, st in stacks.items():
            net = nets[name]
            ch = getattr(getattr(net, "config", None), "in_channels", 1)  # a 2.5D view: the slice as its neighbours
            for i in range(0, len(st), seg.batch_size):
                x = torch.from_numpy(st[i : i + seg.batch_size]).unsqueeze(1).expand(-1, ch, -1, -1).to(dev)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=seg.amp):
                    net(x)
        sync(dev)
    return time.perf_counter() - t


def stage_rows(seg: Segmenter, scan: Path, out: Path) -> tuple[list[tuple[str, float]], object]:
    t = time.perf_counter()
    vol = load_volume(scan)
    rows = [("load", time.perf_counter() - t)]
    res = seg.segment(vol)
    sync(seg.device)
    rows += [(k, v) for k, v in res.timings.items() if k != "total"]
    t = time.perf_counter()
    write_outputs(res, out, stem(scan))
    rows.append(("write", time.perf_counter() - t))
    return rows, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, default=None)
    ap.add_argument("--model", default=None, help="model folder/checkpoint or installed name (default: random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (reports its agreement with float32)")
    ap.add_argument("--peer-slices", type=int, default=48, help="slices timed for the comparison (0: all)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the reference path")
    ap.add_argument("--cohort", type=int, default=0, help="also time N copies of the scan, streamed vs serial")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="qn_bench_"))

    scan = args.scan or (SHARED_SCAN if SHARED_SCAN.exists() else None)
    if scan is None:
        img, _ = make_phantom((256, 256, 256), (1, 1, 1), "LIA", seed=0, head_radius=95)
        scan = save_volume(img.array, img.affine, tmp / "phantom256.nii.gz")
    model = args.model or random_model(tmp / "model", args.filters)
    seg = Segmenter(model, device=args.device, batch_size=args.batch_size, amp=args.amp)
    args.filters = next(iter(seg.nets.values())).config.num_filters  # the peer gets the same width
    dev = seg.device

    # warm-up on a small scan so one-off costs (allocations, kernels) stay out of the numbers
    warm = make_phantom((64, 64, 64), (4, 4, 4), seed=1)[0]
    write_outputs(seg.segment(warm), tmp / "warm", "warm")
    sync(dev)

    rows, res = stage_rows(seg, scan, tmp / "out")
    total = sum(v for _, v in rows)
    peak = peak_rss_mb()
    ref_rows = None
    if not args.no_reference:
        ref = Segmenter(model, device=args.device, batch_size=1, amp=False, paths=SpeedPaths.reference())
        ref_rows, ref_res = stage_rows(ref, scan, tmp / "ref")
        agree = float((ref_res.classes == res.classes).mean())

    # the slices the network ran on: whole conformed slices crossing the head's box, non-empty,
    # each view on its own grid (a model's views may run on different grids)
    conformed = res.conformed_image
    stacks = {}
    for name in (v for v in VIEWS if v in seg.nets):
        grid = seg.model.views[name].conform
        image = conformed if grid == res.plan.settings else plan_conform(res.volume, grid).image(res.volume.array)
        start, stop = head_box(image)
        box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        st = slices(image, name)[slice_box(box, name)[0]]
        keep = st.reshape(len(st), -1).max(1) > EMPTY_SLICE
        stacks[name] = np.ascontiguousarray(st[keep])
    n_slices = sum(len(v) for v in stacks.values())
    runs = {v: 2 if seg.flip and get_view(v).lateral_in_plane else 1 for v in stacks}  # flip: twice
    flops = sum(conv_flops(seg.nets[v], *stacks[v].shape[1:]) * len(stacks[v]) * runs[v] for v in stacks)
    rate = machine_rate(dev)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nquicknat segment speed: {scan.name} {res.volume.shape}, {args.filters} filters, "
          f"conformed {res.plan.settings.voxel_size:g} mm {conformed.shape}, device {name}"
          f"{', bf16' if args.amp else ''}")
    header = f"{'stage':<28}{'seconds':>10}"
    if ref_rows:
        header += f"{'reference':>12}{'ratio':>8}"
    print(header)
    ref_d = dict(ref_rows or [])
    for k, v in rows:
        line = f"{k:<28}{v:>10.2f}"
        if ref_rows:
            line += f"{ref_d[k]:>12.2f}{ref_d[k] / max(v, 1e-9):>8.2f}"
        print(line)
    line = f"{'total (end to end)':<28}{total:>10.2f}"
    if ref_rows:
        rt = sum(ref_d.values())
        line += f"{rt:>12.2f}{rt / total:>8.2f}"
    print(line)
    print(f"{'peak RSS (MB)':<28}{peak:>10.0f}")
    if dev.type == "cuda":
        print(f"{'peak GPU memory (MB)':<28}{torch.cuda.max_memory_allocated(dev) / 2**20:>10.0f}")
    if ref_rows:
        print(f"reference path: SpeedPaths.reference(), batch 1, float32; voxels agreeing with it: {agree:.6f}")

    net_s = res.timings["network"]
    passes = sum(len(stacks[v]) * runs[v] for v in stacks)
    print(f"\nwork: {passes} slice passes ({n_slices} slices, flip runs the coronal and axial ones twice) x "
          f"{flops / passes / 1e9:.2f} GFLOP = {flops / 1e12:.3f} TFLOP; "
          f"machine {rate / 1e9:.0f} GFLOP/s (float32 matmul)")
    print(f"floor {flops / rate:.2f} s; network {net_s:.2f} s = {flops / net_s / 1e9:.0f} GFLOP/s "
          f"({100 * flops / net_s / rate:.0f} % of the machine rate)")

    if args.amp:
        fp = Segmenter(model, device=args.device, batch_size=args.batch_size, amp=False)
        base = fp.segment(load_volume(scan)).classes
        d = [2 * np.sum((a == k) & (base == k)) / max(1, np.sum(a == k) + np.sum(base == k))
             for a in (res.classes,) for k in np.unique(base) if k > 0]
        print(f"bf16 vs float32: voxels agreeing {float((base == res.classes).mean()):.6f}, "
              f"worst structure Dice {min(d):.4f}")

    # Same-run comparison: both networks over the same sample of each view's slices, same batch.
    from monai.networks.nets import Quicknat

    sample = {v: st[np.linspace(0, len(st) - 1, min(len(st), max(1, args.peer_slices // 3))).astype(int)]
              if args.peer_slices > 0 else st for v, st in stacks.items()}
    taken = sum(len(v) for v in sample.values())
    scale = n_slices / taken
    ours = run_views(seg, sample, seg.nets) * scale
    sizes = ", ".join(sorted({f"{st.shape[1]}x{st.shape[2]}" for st in stacks.values()}))
    print(f"\nnetwork forward over {taken} of the {n_slices} slices, scaled to all ({sizes} slices):")
    print(f"{'network':<28}{'seconds':>10}{'ratio':>10}")
    print(f"{'quicknat (this)':<28}{ours:>10.2f}{1.0:>10.2f}")
    if not args.no_peer:
        peers = {}
        for v in sample:
            n_cls = seg.nets[v].config.num_classes
            pnet = Quicknat(num_classes=n_cls, num_channels=1, num_filters=args.filters, se_block="None", drop_out=0)
            peers[v] = pnet.eval().to(dev, memory_format=torch.channels_last)
        # MONAI's Quicknat needs sizes divisible by 16
        padded = {v: np.pad(st, ((0, 0), (0, -st.shape[1] % 16), (0, -st.shape[2] % 16))) for v, st in sample.items()}
        peer = run_views(seg, padded, peers) * scale
        print(f"{'MONAI Quicknat (peer)':<28}{peer:>10.2f}{peer / ours:>10.2f}")

    if args.cohort > 1:
        from quicknat.runner import segment_files

        scans = [scan] * args.cohort
        print(f"\ncohort of {args.cohort} copies of the scan (all outputs written):")
        print(f"{'mode':<28}{'seconds':>10}{'per scan':>10}{'ratio':>8}")
        times = {}
        for mode, stream in (("one at a time", False), ("streamed (I/O overlapped)", True)):
            t = time.perf_counter()
            outs = segment_files(scans, tmp / f"cohort_{stream}", segmenter=seg, stream=stream).outcomes
            times[mode] = time.perf_counter() - t
            assert all(o.error is None for o in outs)
        base = times["one at a time"]
        for mode, v in times.items():
            print(f"{mode:<28}{v:>10.2f}{v / args.cohort:>10.2f}{base / v:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
