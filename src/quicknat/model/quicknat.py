"""QuickNAT: 4 encoder blocks, a bottleneck, 4 decoder blocks and a 1x1 classifier."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SE_TYPES, DecoderBlock, DenseBlock, EncoderBlock


@dataclass(frozen=True)
class QuickNATConfig:
    """Architecture arguments; saved in every checkpoint and used to rebuild the network."""

    num_classes: int = 33
    in_channels: int = 1
    num_filters: int = 64
    kernel_size: int = 5
    se: str = "none"  # none | cse | sse | csse
    dropout: float = 0.2
    depth: int = 4

    def __post_init__(self) -> None:
        if self.se not in SE_TYPES:
            raise ValueError(f"se must be one of {SE_TYPES}")
        if self.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.in_channels < 1 or self.in_channels % 2 != 1:
            raise ValueError("in_channels must be odd: a slice and as many neighbours on each side")

    @property
    def context(self) -> int:
        """Neighbouring slices on each side fed as input channels (0: a plain 2D network)."""
        return (self.in_channels - 1) // 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuickNATConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class QuickNAT(nn.Module):
    """QuickNAT for one view. Input (N, in_channels, H, W), any H and W; output logits.

    Inputs are padded to a multiple of 2**depth and the logits cropped back.
    """

    def __init__(self, config: QuickNATConfig = QuickNATConfig()):
        super().__init__()
        self.config = config
        c = config
        self.encoders = nn.ModuleList(
            EncoderBlock(c.in_channels if i == 0 else c.num_filters, c.num_filters, c.kernel_size, c.se, c.dropout)
            for i in range(c.depth)
        )
        self.bottleneck = DenseBlock(c.num_filters, c.num_filters, c.kernel_size)
        self.decoders = nn.ModuleList(
            DecoderBlock(c.num_filters, c.kernel_size, c.se, c.dropout) for _ in range(c.depth)
        )
        self.classifier = nn.Conv2d(c.num_filters, c.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.config.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        skips = []
        for enc in self.encoders:
            x, skip, idx = enc(x)
            skips.append((skip, idx))
        x = self.bottleneck(x)
        for dec, (skip, idx) in zip(self.decoders, reversed(skips)):
            x = dec(x, skip, idx)
        logits = self.classifier(x)
        if ph or pw:
            logits = logits[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_mc_dropout(model: nn.Module, enabled: bool) -> nn.Module:
    """Eval mode, with dropout layers active when ``enabled`` (Monte-Carlo dropout).

    Batch norm stays in eval mode either way, so running statistics never change at inference.
    """
    model.eval()
    if enabled:
        for m in model.modules():
            if isinstance(m, nn.Dropout2d | nn.Dropout):
                m.train()
    return model


def widen_input(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], old_in: int,
                new_in: int) -> dict[str, torch.Tensor]:
    """A state dict of a network with ``old_in`` input channels made to fit one with ``new_in``
    (``own``, its state dict): a 2D network warm-starts a 2.5D one. The first dense block
    concatenates its input with each stage's output, so every layer of it reads the input
    channels; the old channels go to the middle of the new ones, the new channels' convolution
    weights are zero (the widened network computes exactly what the old one did) and their batch
    norm copies the middle channel's."""
    if new_in < old_in or (new_in - old_in) % 2:
        raise ValueError(f"cannot widen {old_in} input channels to {new_in}")
    first = (new_in - old_in) // 2
    out = dict(state)
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape:
            continue
        dim = 1 if value.ndim == 4 else 0  # convolution weights: input channels; batch norm: channels
        old_idx = [first + i for i in range(old_in)] + list(range(new_in, new_in + value.shape[dim] - old_in))
        if value.ndim == 4:
            new = torch.zeros_like(own[key])
        else:
            new = value.narrow(0, old_in // 2, 1).expand(own[key].shape[0]).clone()
        new.index_copy_(dim, torch.tensor(old_idx), value.to(new.dtype))
        out[key] = new
    return out


def widen_filters(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], config: QuickNATConfig,
                  old: int) -> dict[str, torch.Tensor]:
    """A state dict of a network with ``old`` filters per block made to fit ``config``'s wider one
    (``own``: its freshly initialised state dict), so a trained narrow network warm-starts a wider
    one. Every convolution keeps its old filters as its first output channels, and reads the old
    channels where the wider network puts them (each concatenation of a dense block or decoder
    shifts them). The new filters keep their fresh initialisation, but what reads them starts at
    zero, so the widened network computes exactly what the old one did; training then grows them
    (the zero-initialised outgoing weights receive gradients at once). New batch norm channels
    keep their fresh statistics. Only ``se: none`` networks, whose blocks hold nothing else."""
    new = config.num_filters
    if new < old:
        raise ValueError(f"cannot widen {old} filters to {new}")
    if config.se != "none":
        raise ValueError("widening the filters needs se: none")
    out = dict(state)

    def put(key: str, rows: int | None, cols: list[int] | None) -> None:
        value, fresh = state[key], own[key].clone()
        if value.ndim == 4:  # convolution weight: (out, in, k, k); what the old rows read of new channels is zero
            fresh[:rows] = 0
            fresh[:rows, cols] = value
        else:  # bias or batch norm vector: the old channels' entries
            fresh[list(range(rows)) if cols is None else cols] = value
        out[key] = fresh

    def dense(prefix: str, layout: list[int], width: int) -> None:
        for k in (1, 2, 3):
            for stat in ("weight", "bias", "running_mean", "running_var"):
                put(f"{prefix}.bn{k}.{stat}", None, layout)
            put(f"{prefix}.conv{k}.weight", old, layout)
            put(f"{prefix}.conv{k}.bias", old, None)
            layout = layout + [width + (k - 1) * new + i for i in range(old)]

    dense("encoders.0.dense", list(range(config.in_channels)), config.in_channels)
    for i in range(1, config.depth):
        dense(f"encoders.{i}.dense", list(range(old)), new)
    dense("bottleneck", list(range(old)), new)
    for i in range(config.depth):  # the skip's channels, then the unpooled ones
        dense(f"decoders.{i}.dense", list(range(old)) + [new + i for i in range(old)], 2 * new)
    put("classifier.weight", config.num_classes, list(range(old)))
    return out
