"""Training throughput of one view: slices per second at 256x256 with 64 filters (QuickNAT's
loss, SGD), on this CPU and on a GPU where present, with peak memory; MONAI's Quicknat (same
filters and classes) is timed in the same run as the peer.

    python bench/train_speed.py [--device cpu|cuda] [--filters 64] [--size 256] [--batch 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from quicknat.losses import QuickNATLoss
from quicknat.model import QuickNAT, QuickNATConfig


def run(net: torch.nn.Module, dev: torch.device, size: int, batch: int, steps: int, classes: int, amp: bool) -> float:
    loss_fn = QuickNATLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.95)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 1, size, size), generator=g).to(dev)
    y = torch.randint(0, classes, (batch, size, size), generator=g).to(dev)
    w = torch.ones((batch, size, size)).to(dev)
    net.train()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss, _ = loss_fn(logits, y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--filters", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--classes", type=int, default=33)
    args = ap.parse_args()
    dev = torch.device(args.device)
    amp = dev.type == "cuda"
    ours = QuickNAT(QuickNATConfig(num_classes=args.classes, num_filters=args.filters)).to(dev)
    ours_rate = run(ours, dev, args.size, args.batch, args.steps, args.classes, amp)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    from monai.networks.nets import Quicknat

    peer = Quicknat(num_classes=args.classes, num_channels=1, num_filters=args.filters, se_block="None",
                    drop_out=0.2).to(dev)
    peer_rate = run(peer, dev, args.size, args.batch, args.steps, args.classes, amp)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\ntraining throughput, one view, {args.size}x{args.size}, {args.filters} filters, batch {args.batch}, "
          f"{name}")
    print(f"{'network':<26}{'slices/s':>10}{'ratio':>8}")
    print(f"{'quicknat (this)':<26}{ours_rate:>10.2f}{1.0:>8.2f}")
    print(f"{'MONAI Quicknat (peer)':<26}{peer_rate:>10.2f}{peer_rate / ours_rate:>8.2f}")
    print(f"peak RSS {rss:.0f} MB" + (f", peak GPU memory {gpu:.0f} MB (quicknat run)" if gpu else ""))


if __name__ == "__main__":
    main()
