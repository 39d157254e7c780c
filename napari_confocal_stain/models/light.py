"""A light stain generator for interactive CPU viewing.

In the shipped U-Net (base 32, three downsamplings) every level costs about the same (9–18
kFLOP per pixel per convolution: channels double as pixels quarter), and the stages that read
or write 32-channel full-resolution maps (7×7 stem, last transposed conv, 7×7 head) are 31 %
of its 120 kFLOP per pixel and most of its memory traffic (norm, activation, concatenation),
which the FLOP count does not show. :class:`LightGenerator` keeps the U-Net's shape — the
thesis's reason to prefer it (skip concatenations carry fine structure, so it hallucinates
less) — but

* uses a quarter of the channels at every level, 3×3 stem and head convolutions, and 8
  full-resolution channels,
* does its mixing at low resolution, in residual blocks at the bottleneck (cheap there: a
  1/64 of the pixels at three downsamplings),
* feeds the DSCM input itself to the head (concatenated with the last decoder map), so the
  finest structure — nuclei of a few pixels — reaches the output through one 3×3 conv, not
  through a whole encoder–decoder.

It follows the conventions of :mod:`napari_confocal_stain.models.generators` that the
inference engine relies on: plain ``nn.InstanceNorm2d`` right after each convolution in an
``nn.Sequential`` (the seamless engine swaps them for windowed dense norms, in place), explicit
``nn.ReflectionPad2d`` modules, ``size_multiple`` / ``min_size`` / ``norm_layers()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from napari_confocal_stain.models.generators import (
    DeepGenerator,
    ResnetBlock,
    check_input,
    conv_block,
    up_block,
)

__all__ = ["LightGenerator"]


class LightGenerator(DeepGenerator):
    """Small U-Net: 3×3 stem, stride-2 encoder, residual bottleneck, skip decoder, input skip.

    Parameters
    ----------
    in_channels, out_channels
        3 and 3 for DSCM → H&E.
    channels
        Channels per level, full resolution first; ``len(channels) − 1`` downsamplings.
    n_blocks
        Residual blocks (two 3×3 convs each) at the bottleneck.
    input_skip
        Concatenate the input to the last decoder map before the head.
    head_kernel
        Kernel of the head convolution (odd). A wider head smooths the checkerboard that the
        last stride-2 transposed convolution leaves on few channels (at 8 channels a 7×7 head
        costs 2.4 kFLOP/px).

    Notes
    -----
    Layout (``c = channels``, ``n = len(c) − 1``): stem ``pad 1 → conv3×3 (in → c₀) → IN →
    ReLU``; ``down[i]``: ``pad 1 → conv3×3 stride 2 (cᵢ → cᵢ₊₁) → IN → ReLU``; ``blocks``:
    CycleGAN residual blocks on ``cₙ``; ``up[j]`` at level ``k = n − j``: ``cat(x, eₖ)`` →
    3×3 stride-2 transposed conv to ``c_{k−1}`` → IN → ReLU; head: ``cat(x, input)`` (if
    ``input_skip``) → reflection pad → ``head_kernel``² conv → tanh. Defaults (the registry's
    ``light``, shipped as ``stain-light``): 294,836 parameters, 13.1 kFLOP per pixel.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 96),
        n_blocks: int = 2,
        input_skip: bool = True,
        head_kernel: int = 3,
    ) -> None:
        super().__init__()
        ch = [int(c) for c in channels]
        if len(ch) < 2 or min(ch) < 1 or n_blocks < 0 or head_kernel < 1 or head_kernel % 2 == 0:
            raise ValueError(
                f"LightGenerator: need ≥ 2 positive channel counts, n_blocks ≥ 0 and an odd "
                f"head_kernel, got channels={list(channels)}, n_blocks={n_blocks}, "
                f"head_kernel={head_kernel}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": ch,
            "n_blocks": n_blocks,
            "input_skip": bool(input_skip),
            "head_kernel": int(head_kernel),
        }
        self.in_channels = in_channels
        self.n_down = len(ch) - 1
        self.channels = tuple(ch)
        self.input_skip = bool(input_skip)
        self.stem = conv_block(in_channels, ch[0], 3)
        self.down = nn.ModuleList(
            conv_block(ch[i], ch[i + 1], 3, stride=2) for i in range(self.n_down)
        )
        self.blocks = nn.ModuleList(ResnetBlock(ch[-1]) for _ in range(n_blocks))
        # up[j] runs at level k = n − j; its input cat(x, e_k) has 2·c_k channels.
        self.up = nn.ModuleList(up_block(2 * ch[k], ch[k - 1]) for k in range(self.n_down, 0, -1))
        head_in = ch[0] + (in_channels if self.input_skip else 0)
        self.head = nn.Sequential(
            nn.ReflectionPad2d(head_kernel // 2),
            nn.Conv2d(head_in, out_channels, head_kernel),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` in [-1, 1] to the same shape in [-1, 1]."""
        check_input(x, "LightGenerator", self.in_channels, self.size_multiple)
        inp = x
        x = self.stem(x)
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        for block in self.blocks:
            x = block(x)
        for stage, skip in zip(self.up, reversed(skips), strict=True):
            x = stage(torch.cat([x, skip], dim=1))
        if self.input_skip:
            x = torch.cat([x, inp.to(x.dtype)], dim=1)
        return self.head(x)
