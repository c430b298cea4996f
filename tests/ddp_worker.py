"""Run under torchrun: trains a few DDP steps on CPU (gloo), then every rank writes a hash of
its weights so the test can check that all ranks hold identical weights."""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config  # noqa: E402

from quicknat.data.manifest import load_manifest  # noqa: E402
from quicknat.train import train_view  # noqa: E402


def main() -> None:
    manifest, rundir = load_manifest(sys.argv[1]), Path(sys.argv[2])
    cfg = tiny_config(num_filters=4, epochs=2, batch_size=4, steps_per_epoch=5)
    torch.set_num_threads(1)
    nets = []
    train_view("coronal", manifest, rundir, cfg, device="cpu", on_end=nets.append)
    rank = dist.get_rank()
    state = nets[0].state_dict()  # this rank's own replica after training
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(state[k].detach().cpu().float().numpy().tobytes())
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / f"rank{rank}.sha1").write_text(h.hexdigest())
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
