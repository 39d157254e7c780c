"""A fast stain generator for the viewport on a laptop CPU: norm-free, run at half resolution.

Where the time goes in the U-Net family on a CPU (``bench/light_model.py``): the layers that
read or write full-resolution maps. Even the light U-Net
(:class:`~napari_confocal_stain.models.light.LightGenerator`, 13 kFLOP/px) spends most of
its time in memory traffic of its full-resolution stem, last transposed convolution, norm
and concatenation, not in multiply-adds. :class:`FastGenerator` moves every convolution off
the full-resolution grid, the way efficient super-resolution networks do (ESPCN, Shi et al.
2016):

* **Space-to-depth in, depth-to-space out.** The input is folded into 2×2 blocks
  (``pixel_unshuffle``: 3 channels at ``H × W`` → 12 at ``H/2 × W/2``) without losing a pixel,
  and the head predicts 12 channels at half resolution that ``pixel_shuffle`` unfolds into RGB
  at full resolution. Each output pixel still has its own value, so fine structure (nuclei of a
  few pixels) is representable; the network just computes it four pixels at a time.
* **A small U-Net in between** (convolutional encoder with stride-2 stages, residual blocks at
  the bottleneck, decoder with nearest upsampling and additive skips — FPN-style, cheaper than
  concatenation at the same channels), whose receptive field (≈ 190 px at three
  downsamplings after the fold) gives tissue context for the colour decisions.
* **A per-pixel path from the input.** A 1×1 convolution of the full-resolution input is added
  before the final ``tanh``, so the linear stain's own structure reaches the output through one
  affine map: the network only has to learn a correction.
* **Optionally, a detail path after the ``tanh``** (``detail=True``): the input's pixel-scale
  detail (the input minus its 3×3 mean) through a 1×1 convolution, added to the output and
  clamped to [-1, 1]. Near white the ``tanh`` flattens everything that passes through it (its
  slope at 0.96 is 0.08), so the per-pixel path cannot carry the grain of glass and pale
  stroma to the output; a regression then draws those as smooth ramps, which texture
  measures such as LBP see as different tissue. The path starts at zero (a checkpoint
  without it loads into it unchanged) and runs fused with the per-pixel path as one
  full-resolution 3×3 convolution with six outputs (no slower than the 1×1 alone, measured).
* **No normalisation layers.** Output depends on a bounded neighbourhood only, so any region,
  tile or block boundary gives exactly the same pixels as one pass over the whole slide (given
  enough context), and the engine needs no windowed-statistics machinery for it. Training on
  crops is stable without norms at this depth (one ReLU per stage, residual blocks scaled at
  initialisation).

It follows the engine's conventions: ``size_multiple`` / ``min_size`` (from ``n_down``),
``norm_layers()`` (empty), a ``config`` dict of constructor kwargs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from napari_confocal_stain.models.generators import DeepGenerator, check_input

__all__ = ["FastGenerator"]

FOLD = 2
"""Side of the space-to-depth blocks (input pixels per half-resolution position, per axis)."""


def _high_pass(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 3×3 kernel of ``x − mean3×3(x)``, shaped to scale a 1×1 convolution's weight."""
    k = torch.full((3, 3), -1.0 / 9.0, dtype=dtype, device=device)
    k[1, 1] += 1.0
    return k.view(1, 1, 3, 3)


class _Residual(nn.Module):
    """``x + conv(relu(conv(x)))`` with the second convolution started small (no norm)."""

    def __init__(self, channels: int, scale: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            # A norm-free residual stack stays near the identity at the start of training.
            self.conv2.weight.mul_(scale)
            self.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class FastGenerator(DeepGenerator):
    """Norm-free U-Net on 2×2-folded input with a per-pixel input path.

    Parameters
    ----------
    in_channels, out_channels
        3 and 3 for DSCM → H&E.
    channels
        Channels per level, the half-resolution (folded) level first; ``len(channels) − 1``
        stride-2 stages below it.
    n_blocks
        Residual blocks (two 3×3 convolutions each) at the bottleneck.
    detail
        Add the input's pixel-scale detail after the ``tanh`` through a 1×1 convolution
        (see the module notes); the output is then clamped to [-1, 1].

    Notes
    -----
    Layout (``c = channels``, ``n = len(c) − 1``, ``z = pixel_unshuffle(x, 2)``): stem
    ``conv3×3(4·in → c₀) → ReLU``; ``down[i]``: ``conv3×3 stride 2 (cᵢ → cᵢ₊₁) → ReLU``;
    ``blocks`` on ``cₙ``; ``up[j]`` to level ``k``: ``nearest×2(conv1×1(x → cₖ)) + eₖ →
    conv3×3 → ReLU``; head: ``pixel_shuffle(conv3×3(cat(x, z) → 4·out), 2) + conv1×1(x_in)``
    → ``tanh`` (with ``detail``: ``+ conv1×1(x_in − mean3×3(x_in))``, clamped to [-1, 1]).
    Zero padding inside (the engine reflect-pads regions and gives them context).
    Defaults (the registry's ``fast``, shipped as ``stain-fast``): channels 16/32/64/128, two
    blocks, 751,480 parameters, 12.4 kFLOP per output pixel (``models/flops.py``),
    all of it at half resolution or below.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        n_blocks: int = 2,
        detail: bool = False,
    ) -> None:
        super().__init__()
        ch = [int(c) for c in channels]
        if len(ch) < 2 or min(ch) < 1 or n_blocks < 0:
            raise ValueError(
                f"FastGenerator: need ≥ 2 positive channel counts and n_blocks ≥ 0, got "
                f"channels={list(channels)}, n_blocks={n_blocks}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": ch,
            "n_blocks": n_blocks,
        }
        if detail:
            # Only when set, so checkpoints written before the option keep their config.
            self.config["detail"] = True
        self.in_channels = in_channels
        # The fold is one more halving of the grid: sizes must be multiples of 2**(n + 1).
        self.n_down = len(ch)
        self.channels = tuple(ch)
        folded = in_channels * FOLD * FOLD
        self.stem = nn.Conv2d(folded, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(len(ch) - 1)
        )
        self.blocks = nn.ModuleList(_Residual(ch[-1]) for _ in range(n_blocks))
        levels = range(len(ch) - 1, 0, -1)
        self.lateral = nn.ModuleList(nn.Conv2d(ch[k], ch[k - 1], 1) for k in levels)
        self.fuse = nn.ModuleList(nn.Conv2d(ch[k - 1], ch[k - 1], 3, padding=1) for k in levels)
        self.head = nn.Conv2d(ch[0] + folded, out_channels * FOLD * FOLD, 3, padding=1)
        self.pixel = nn.Conv2d(in_channels, out_channels, 1)
        self.detail = nn.Conv2d(in_channels, out_channels, 1) if detail else None
        with torch.no_grad():
            # Start as (nearly) the identity on the linear stain: tanh(x) of DSCM in [-1, 1].
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.pixel.weight.zero_()
            self.pixel.bias.zero_()
            if in_channels == out_channels:
                for c in range(out_channels):
                    self.pixel.weight[c, c, 0, 0] = 1.0
            if self.detail is not None:
                self.detail.weight.zero_()
                self.detail.bias.zero_()

    def norm_layers(self) -> list[nn.InstanceNorm2d]:
        """None: the model is norm-free (its output depends on a bounded neighbourhood)."""
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` in [-1, 1] to the same shape in [-1, 1]."""
        check_input(x, "FastGenerator", self.in_channels, self.size_multiple)
        inp = x
        z = F.pixel_unshuffle(x, FOLD)
        x = F.relu(self.stem(z))
        skips = [x]
        for stage in self.down:
            x = F.relu(stage(x))
            skips.append(x)
        skips.pop()
        for block in self.blocks:
            x = block(x)
        for lateral, fuse, skip in zip(self.lateral, self.fuse, reversed(skips), strict=True):
            x = F.interpolate(lateral(x), scale_factor=2, mode="nearest") + skip
            x = F.relu(fuse(x))
        y = F.pixel_shuffle(self.head(torch.cat([x, z.to(x.dtype)], dim=1)), FOLD)
        if self.detail is None:
            return torch.tanh(y + self.pixel(inp.to(y.dtype)))
        # The per-pixel path and conv1×1(x − mean3×3(x)) as one 3×3 convolution with six
        # outputs: full-resolution passes are what costs on a CPU (the separate mean,
        # subtraction and two 1×1 convolutions took 1.24× this one's time in the whole
        # model). Zero padding like the other convolutions: the engine gives regions context.
        dtype, dev = y.dtype, y.device
        kernel = torch.cat(
            [
                F.pad(self.pixel.weight, (1, 1, 1, 1)),
                self.detail.weight * _high_pass(self.detail.weight.dtype, dev),
            ]
        )
        bias = torch.cat([self.pixel.bias, self.detail.bias])
        both = F.conv2d(inp.to(dtype), kernel.to(dtype), bias.to(dtype), padding=1)
        n = self.pixel.out_channels
        return (torch.tanh(y + both[:, :n]) + both[:, n:]).clamp(-1.0, 1.0)
