"""Stain generators: CM linear stain (DSCM in [-1, 1]) → H&E-like RGB in [-1, 1].

Three families, as in thesis §3.3 and the CycleGAN reference implementation (Zhu et al. 2017,
junyanz/pytorch-CycleGAN-and-pix2pix ``networks.py``):

* :class:`AffineGenerator` — one 1×1 convolution (the thesis baseline), started at the Gareau
  mapping.
* :class:`ResnetGenerator` — 7×7 conv, stride-2 downsamplings, residual blocks, transposed-conv
  upsamplings, 7×7 conv, tanh (Combalia et al. use this one with 9 blocks).
* :class:`UNetGenerator` — the same encoder, no residual blocks, a decoder whose every
  transposed convolution sees the previous decoder output *concatenated* with the encoder
  output of the same resolution (the thesis's better model: fewer hallucinations).

Conventions shared by the deep generators, chosen for the tiled inference engine:

* Every normalisation is a plain ``nn.InstanceNorm2d(C)`` (affine=False,
  track_running_stats=False, as CycleGAN), so ``model.modules()`` finds them;
  ``model.norm_layers()`` lists them in forward order. Their per-image statistics are what
  makes tiles disagree at seams.
* Every spatial padding is an explicit ``nn.ReflectionPad2d`` module in front of an unpadded
  convolution (also for the stride-2 downsamplings), so an engine running the net layer by layer
  can see and replace it.
* The network is a short list of stages: ``stem``, ``down[i]``, (``blocks[i]`` | ``middle``),
  ``up[i]``, ``head``; ``forward`` is a plain loop over them.
* Convolutions keep their bias even before an affine-free InstanceNorm (where it cancels) so
  parameter counts and state-dict shapes match CycleGAN's (11,378,179 for the 9-block ResNet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_input(x: torch.Tensor, name: str, channels: int, multiple: int) -> None:
    """Raise a clear ValueError unless ``x`` is (B, channels, H, W) with H, W fit for the net."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects a (B, {channels}, H, W) tensor, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    # The deepest level needs ≥ 2 px: a reflection pad of 1 is impossible on a 1-px map.
    if h % multiple or w % multiple or h < 2 * multiple or w < 2 * multiple:
        raise ValueError(
            f"{name}: height and width must be multiples of {multiple} (2**n_down) and at "
            f"least {2 * multiple}, got {h}×{w}; pad the input (the inference engine does)"
        )


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Reflection pad → Conv2d → InstanceNorm2d → ReLU (a stem or encoder stage)."""
    return nn.Sequential(
        nn.ReflectionPad2d(kernel // 2),
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride),
        nn.InstanceNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """3×3 stride-2 transposed conv (exactly doubles H and W) → InstanceNorm2d → ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1),
        nn.InstanceNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _head(in_ch: int, out_ch: int) -> nn.Sequential:
    """Reflection pad → 7×7 conv to RGB → tanh."""
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_ch, out_ch, 7), nn.Tanh())


class DeepGenerator(nn.Module):
    """Shared helpers of the deep generators."""

    n_down: int

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (``2**n_down``)."""
        return 2**self.n_down

    @property
    def min_size(self) -> int:
        """Smallest accepted height or width (the bottleneck needs 2 px)."""
        return 2 * self.size_multiple

    def norm_layers(self) -> list[nn.InstanceNorm2d]:
        """Every InstanceNorm2d, in the order ``forward`` runs them."""
        return [m for m in self.modules() if isinstance(m, nn.InstanceNorm2d)]


class AffineGenerator(nn.Module):
    """One 1×1 convolution: each output channel is an affine combination of the input's.

    It is initialised to the identity (weight = I, bias = 0). Its input is the Gareau linear
    stain, already DSCM in [-1, 1], so at initialisation the generator *is* the Gareau mapping
    and training can only move it away from there (thesis §4.3.1 initialises its baseline to
    Gareau's weights for the same reason).

    The output is clamped to [-1, 1] rather than passed through tanh: tanh would make the
    model non-affine and would not start at the identity (tanh(1) ≈ 0.76 would compress the
    Gareau colours), while the clamp is exact inside the range and only cuts what no image
    value may exceed. Saturated pixels get no gradient, like a saturated tanh.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts (3 and 3 for DSCM → H&E). The identity start needs them equal; otherwise
        the weights are the default random initialisation.
    """

    n_down = 0
    size_multiple = 1
    min_size = 1

    def __init__(self, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"in_channels": in_channels, "out_channels": out_channels}
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        if in_channels == out_channels:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(in_channels).view(in_channels, in_channels, 1, 1))
                self.conv.bias.zero_()

    def norm_layers(self) -> list[nn.InstanceNorm2d]:
        """No normalisation layers: the affine generator is per-pixel and tiles seamlessly."""
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, H, W)`` in [-1, 1] to ``(B, C_out, H, W)`` in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AffineGenerator expects a (B, {self.in_channels}, H, W) tensor, "
                f"got {tuple(x.shape)}"
            )
        return self.conv(x).clamp(-1.0, 1.0)


class ResnetBlock(nn.Module):
    """``x + F(x)`` with F = pad → 3×3 conv → IN → ReLU → pad → 3×3 conv → IN (CycleGAN's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(DeepGenerator):
    """ResNet generator (thesis §3.3.2 item 1; CycleGAN ``resnet_9blocks`` with the defaults).

    Parameters
    ----------
    in_channels, out_channels
        3 and 3 for DSCM → H&E.
    base_filters
        Filters of the 7×7 stem; each downsampling doubles them.
    n_down
        Stride-2 3×3 convolutions (2 in CycleGAN and Combalia, 3 in the thesis text).
    n_blocks
        Residual blocks ``R`` at the bottleneck (9 in CycleGAN, Combalia and the thesis).

    Notes
    -----
    With ``f = base_filters``, ``n = n_down``, ``C = f·2ⁿ``, RGB in and out, the parameter count is
    ``(3·49f + f) + Σ_{i<n} (18·(f2ⁱ)² + 2f2ⁱ) + 2R(9C² + C) + Σ_{i<n} (18·(f2ⁱ)² + f2ⁱ)
    + (3·49f + 3)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_filters: int = 64,
        n_down: int = 2,
        n_blocks: int = 9,
    ) -> None:
        super().__init__()
        if n_down < 0 or n_blocks < 0 or base_filters < 1:
            raise ValueError(
                f"ResnetGenerator: need base_filters ≥ 1, n_down ≥ 0, n_blocks ≥ 0, got "
                f"{base_filters}, {n_down}, {n_blocks}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_filters": base_filters,
            "n_down": n_down,
            "n_blocks": n_blocks,
        }
        self.in_channels = in_channels
        self.n_down = n_down
        f = base_filters
        self.stem = conv_block(in_channels, f, 7)
        self.down = nn.ModuleList(
            conv_block(f * 2**i, f * 2 ** (i + 1), 3, stride=2) for i in range(n_down)
        )
        bottleneck = f * 2**n_down
        self.blocks = nn.ModuleList(ResnetBlock(bottleneck) for _ in range(n_blocks))
        self.up = nn.ModuleList(
            up_block(f * 2 ** (i + 1), f * 2**i) for i in reversed(range(n_down))
        )
        self.head = _head(f, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` in [-1, 1] to the same shape in [-1, 1]."""
        check_input(x, "ResnetGenerator", self.in_channels, self.size_multiple)
        x = self.stem(x)
        for stage in self.down:
            x = stage(x)
        for block in self.blocks:
            x = block(x)
        for stage in self.up:
            x = stage(x)
        return self.head(x)


class UNetGenerator(DeepGenerator):
    """U-Net generator (thesis §3.3.2 item 2), with the appendix code's shape bug fixed.

    Encoder: the ResNet's stem and ``n_down`` stride-2 stages, keeping each stage's output
    ``e₁ … eₙ`` (``eᵢ`` has ``cᵢ = min(f·2ⁱ, max_filters)`` channels at ``H/2ⁱ``). Middle: a
    *padded* 3×3 conv → IN → ReLU at the bottleneck (the appendix's unpadded one shrinks the
    map by 2 px so no concatenation could match). Decoder stage ``k = n … 1``: concatenate the
    running feature map with ``eₖ`` along channels (``2cₖ`` channels), then a 3×3 stride-2
    transposed conv to ``c_{k−1}`` channels at ``H/2^{k−1}``. Head: 7×7 conv to RGB, tanh.

    Parameters
    ----------
    in_channels, out_channels
        3 and 3 for DSCM → H&E.
    base_filters
        Filters of the 7×7 stem (``c₀``).
    n_down
        Downsamplings; H and W must be multiples of ``2**n_down``.
    max_filters
        Cap on the channel count (as CycleGAN's U-Net caps at 8× base), which keeps deep
        variants such as the thesis's 7-downsampling model at a sane size.

    Notes
    -----
    Parameter count, RGB in and out: ``(3·49c₀ + c₀) + Σ_{i=1..n} (9c_{i−1}cᵢ + cᵢ)
    + (9cₙ² + cₙ) + Σ_{k=1..n} (18cₖc_{k−1} + c_{k−1}) + (3·49c₀ + 3)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_filters: int = 64,
        n_down: int = 3,
        max_filters: int = 512,
    ) -> None:
        super().__init__()
        if n_down < 1 or base_filters < 1 or max_filters < base_filters:
            raise ValueError(
                f"UNetGenerator: need n_down ≥ 1 and 1 ≤ base_filters ≤ max_filters, got "
                f"n_down={n_down}, base_filters={base_filters}, max_filters={max_filters}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_filters": base_filters,
            "n_down": n_down,
            "max_filters": max_filters,
        }
        self.in_channels = in_channels
        self.n_down = n_down
        ch = [min(base_filters * 2**i, max_filters) for i in range(n_down + 1)]
        self.channels = tuple(ch)
        """Channels ``c₀ … cₙ`` of the encoder levels (full resolution first)."""
        self.stem = conv_block(in_channels, ch[0], 7)
        self.down = nn.ModuleList(conv_block(ch[i], ch[i + 1], 3, stride=2) for i in range(n_down))
        self.middle = conv_block(ch[n_down], ch[n_down], 3)
        # up[j] runs at level k = n_down - j: input cat(x, e_k) has 2·c_k channels.
        self.up = nn.ModuleList(up_block(2 * ch[k], ch[k - 1]) for k in range(n_down, 0, -1))
        self.head = _head(ch[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` in [-1, 1] to the same shape in [-1, 1]."""
        check_input(x, "UNetGenerator", self.in_channels, self.size_multiple)
        x = self.stem(x)
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.middle(x)
        for stage, skip in zip(self.up, reversed(skips), strict=True):
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)
