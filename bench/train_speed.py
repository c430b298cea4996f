"""Training throughput of one view: where the time of a synthetic training step goes.

    python bench/train_speed.py [--device cpu|cuda] [--filters 16] [--size 128] [--batch 8] [--steps 4]
                                [--threads 2] [--config configs/synth_cpu_v2.yaml]

Prints, in one run, slices per second of:

* the network alone (forward, QuickNAT loss on soft targets, backward, Adam step), ours and
  MONAI's ``Quicknat`` (same filters and classes) as the peer, contiguous and channels-last;
* the synthetic generator alone (``LabelMapSynth.sample`` plus the weight map, as the data set
  does), on ../shared/data/label_maps when present, else phantoms; with the config's ``crop``,
  rendering whole slices (as before the crop window was rendered alone) and the window only;
* both together, as ``quicknat train`` runs them (generator in the main process);

and the FLOP floor: forward+backward FLOPs per slice (3x the forward's, counted from the
convolution shapes) against the machine's measured float32 matmul rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from quicknat.config import load_config
from quicknat.data.phantom import make_phantom
from quicknat.data.slices import weight_map
from quicknat.data.synth import LabelMapSynth
from quicknat.io import load_volume
from quicknat.labels import ASEG33
from quicknat.losses import QuickNATLoss
from quicknat.model import QuickNAT, QuickNATConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def conv_flops(net: torch.nn.Module, size: int, dev: torch.device) -> float:
    """Forward FLOPs of one slice (2 x multiply-adds of every convolution)."""
    total = 0.0

    def hook(mod, _inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2.0 * (out.numel() / out.shape[0]) * (mod.in_channels / mod.groups) * k

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net.eval()(torch.zeros((1, net.config.in_channels, size, size), device=dev))
    for h in hooks:
        h.remove()
    return total


def matmul_rate(dev: torch.device) -> float:
    a = torch.randn((1024, 1024), device=dev)
    for _ in range(3):
        a @ a
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ a
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n * 2 * 1024**3 / (time.perf_counter() - t)


def network_rate(net, dev, size, batch, steps, classes, channels_last) -> float:
    loss_fn = QuickNATLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(dev, memory_format=fmt).train()
    g = torch.Generator().manual_seed(0)
    channels = net.config.in_channels if isinstance(net, QuickNAT) else 1  # MONAI's peer: one
    x = torch.rand((batch, channels, size, size), generator=g).to(dev).contiguous(memory_format=fmt)
    y = torch.softmax(torch.randn((batch, classes, size, size), generator=g), 1).to(dev)
    w = torch.ones((batch, size, size), device=dev)

    def step():
        loss, _ = loss_fn(net(x), y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def generator(config: Path, size: int) -> LabelMapSynth:
    cfg = load_config(config) if config.exists() else None
    files = sorted((SHARED / "label_maps").glob("*.nii*"))[:4]
    maps = [(v.array, v.affine) for v in map(load_volume, files)]
    if not maps:
        _, lab = make_phantom((200, 200, 200), seed=0, head_radius=90)
        maps = [(lab.array, lab.affine)]
    settings = cfg.conform if cfg else None
    synth = cfg.synth if cfg else None
    if synth is not None and synth.priors and not Path(synth.priors).exists():
        from dataclasses import replace

        synth = replace(synth, priors=None)
    return LabelMapSynth(maps, ASEG33, settings, synth)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=0, help="neighbouring slices each side (2.5D input)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synth_cpu_v2.yaml")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    classes = ASEG33.num_classes
    rows = []
    ours = QuickNAT(QuickNATConfig(num_classes=classes, num_filters=args.filters, in_channels=2 * args.context + 1))
    for cl in (False, True):
        rows.append((f"network, quicknat{' channels-last' if cl else ''}",
                     network_rate(ours, dev, args.size, args.batch, args.steps, classes, cl)))
    from monai.networks.nets import Quicknat

    peer = Quicknat(num_classes=classes, num_channels=1, num_filters=args.filters, se_block="None", drop_out=0.2)
    rows.append(("network, MONAI Quicknat (peer)", network_rate(peer, dev, args.size, args.batch, args.steps,
                                                                 classes, False)))
    synth = generator(args.config, args.size)
    crop = synth.cfg.crop if synth.cfg.crop < args.size else 0
    net_rate = rows[0][1]
    if crop:  # training on crops: the network's rate on them
        net_rate = network_rate(ours, dev, crop, args.batch, args.steps, classes, True)
        rows.append((f"network, quicknat channels-last, {crop}² crops", net_rate))
    n = args.batch * args.steps
    weights = np.ones(classes, np.float32)
    gen_rows = []
    for context in (args.context, 0) if args.context else (0,):
        for c in (0, crop) if crop else (0,):
            t = time.perf_counter()
            for k in range(n):
                img, target = synth.sample(("coronal", "axial", "sagittal")[k % 3], seed=k, context=context, crop=c)
                weight_map(target.argmax(0), weights, 2.0)
            gen_rows.append((f"generator alone, context {context}, " + (f"{c}² window" if c else "whole slice"),
                             n / (time.perf_counter() - t)))
    rows += gen_rows
    gen_rate = gen_rows[1 if crop else 0][1]  # as training runs: the window when cropping
    rows.append(("both, in one process (estimate 1/(1/a+1/b))", 1.0 / (1.0 / net_rate + 1.0 / gen_rate)))
    flops = 3 * conv_flops(ours, args.size, dev)
    rate = matmul_rate(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\ntraining throughput, {args.size}x{args.size}, {args.filters} filters, batch {args.batch}, {name}")
    print(f"{'stage':<46}{'slices/s':>10}")
    for label, r in rows:
        print(f"{label:<46}{r:>10.2f}")
    print(f"\nforward+backward: {flops / 1e9:.2f} GFLOP per slice; float32 matmul rate {rate / 1e9:.0f} GFLOP/s; "
          f"floor {rate / flops:.1f} slices/s; the network runs at {100 * net_rate * flops / rate:.0f} % of it")


if __name__ == "__main__":
    main()
