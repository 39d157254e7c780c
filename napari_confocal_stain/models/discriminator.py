"""PatchGAN discriminator (Isola et al. 2017; CycleGAN's ``NLayerDiscriminator``).

It classifies overlapping patches rather than whole images, which models high-frequency
"correctness" (thesis §3.3): each output pixel sees a 70×70 input patch for ``n_layers=3``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def patchgan_receptive_field(n_layers: int) -> int:
    """Receptive field (pixels) of one output of an ``n_layers`` PatchGAN.

    Walks the layers backwards: ``n_layers`` 4×4 stride-2 convolutions, then two 4×4 stride-1
    ones; ``r ← (r − 1)·stride + kernel``.

    Parameters
    ----------
    n_layers
        Stride-2 layers of the discriminator.

    Returns
    -------
    int
        70 for ``n_layers=3``, 34 for 2, 142 for 4.
    """
    r = 1
    for stride in reversed([2] * n_layers + [1, 1]):
        r = (r - 1) * stride + 4
    return r


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4×4 convs, LeakyReLU(0.2), InstanceNorm, one logit per 70×70 patch.

    Layout (CycleGAN's): conv(in→f, stride 2) → LReLU; for ``i = 1 … n_layers−1``:
    conv(stride 2, channels ×2 up to 8f) → IN → LReLU; conv(stride 1, up to 8f) → IN → LReLU;
    conv(→1, stride 1). Zero padding of 1 everywhere, as in CycleGAN.

    Parameters
    ----------
    in_channels
        Image channels (3 for RGB in [-1, 1]).
    base_filters
        Filters of the first layer (``ndf``).
    n_layers
        Stride-2 layers; 3 gives the 70×70 PatchGAN (thesis Table 2: "#layers D = 3").
    norm
        ``"instance"`` (default) or ``"none"``. InstanceNorm couples every output to the whole
        image through its statistics; ``"none"`` gives the pure convolutional stack whose
        receptive field is exactly :func:`patchgan_receptive_field`.

    Notes
    -----
    Parameter count with ``f = base_filters`` and ``n_layers = 3``, RGB:
    ``(48f + f) + (16f·2f + 2f) + (16·2f·4f + 4f) + (16·4f·8f + 8f) + (16·8f + 1)``
    (2,764,737 for f = 64, CycleGAN's figure).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_filters: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if n_layers < 1 or base_filters < 1:
            raise ValueError(
                f"NLayerDiscriminator: need n_layers ≥ 1 and base_filters ≥ 1, got "
                f"{n_layers}, {base_filters}"
            )
        if norm not in ("instance", "none"):
            raise ValueError(
                f"NLayerDiscriminator: norm must be 'instance' or 'none', got {norm!r}"
            )
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "base_filters": base_filters,
            "n_layers": n_layers,
            "norm": norm,
        }
        self.in_channels = in_channels
        self.n_layers = n_layers
        f = base_filters

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1)]
            if norm == "instance":
                layers.append(nn.InstanceNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, f, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for i in range(1, n_layers):
            prev, mult = mult, min(2**i, 8)
            layers += block(f * prev, f * mult, stride=2)
        prev, mult = mult, min(2**n_layers, 8)
        layers += block(f * prev, f * mult, stride=1)
        layers.append(nn.Conv2d(f * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Input patch size (pixels) seen by one output logit."""
        return patchgan_receptive_field(self.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per patch, shape ``(B, 1, h, w)`` (30×30 for a 256² input)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NLayerDiscriminator expects a (B, {self.in_channels}, H, W) tensor, "
                f"got {tuple(x.shape)}"
            )
        return self.model(x)
