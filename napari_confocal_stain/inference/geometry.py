"""What the engine needs to know about a model's geometry: size multiple, context, channels.

Model requirements (model-agnostic): any ``nn.Module`` mapping ``(B, C, h, w) → (B, C', h, w)``.
The engine reads ``model.size_multiple`` (else ``2**model.n_down``, else 1) for the multiple
that ``h`` and ``w`` must be, ``model.min_size`` (else the multiple) for their minimum, and,
for halo tiling, ``model.halo`` (else a measured receptive field) for the context.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = [
    "in_channels",
    "min_size",
    "model_device",
    "parameters_version",
    "receptive_radius",
    "size_multiple",
]


def size_multiple(model: nn.Module) -> int:
    """Height/width multiple a model needs: ``size_multiple``, else ``2**n_down``, else 1."""
    mult = getattr(model, "size_multiple", None)
    if mult is None and getattr(model, "n_down", None) is not None:
        mult = 2 ** int(model.n_down)
    return max(1, int(mult or 1))


def min_size(model: nn.Module) -> int:
    """Smallest height/width a model accepts: ``model.min_size``, else its size multiple."""
    return max(int(getattr(model, "min_size", 0) or 0), size_multiple(model))


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (the CPU for a parameter-free model)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def parameters_version(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter is updated in place (invalidates derived copies)."""
    return tuple(p._version for p in model.parameters())


def in_channels(model: nn.Module) -> int:
    """Input channels: the first declared ``in_channels``, else the first convolution's.

    A model that folds its input before the first convolution (space-to-depth) declares its
    own ``in_channels``; the engine's wrappers hold the model as a submodule, and
    ``modules()`` visits it before its convolutions.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            return int(m.in_channels)
        declared = getattr(m, "in_channels", None)
        if isinstance(declared, int) and not isinstance(declared, bool):
            return declared
    return 3


def receptive_radius(model: nn.Module, *, channels: int = 1) -> int:
    """Context (pixels each side) a fully convolutional model's output depends on.

    ``model.halo`` if it has one; otherwise measured by perturbing the centre pixel of a
    random probe image and finding how far the output changes.
    """
    halo = getattr(model, "halo", None)
    if halo is not None:
        return int(halo)
    side = 129
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, channels, side, side), generator=gen) * 0.8 + 0.1
    x2 = x.clone()
    x2[..., side // 2, side // 2] += 0.05
    dev = model_device(model)
    with torch.inference_mode():
        diff = (model(x.to(dev)) - model(x2.to(dev))).abs().sum(dim=(0, 1)).cpu().numpy()
    ys, xs = np.nonzero(diff > 0)
    if len(ys) == 0:
        return 0
    radius = int(max(np.abs(ys - side // 2).max(), np.abs(xs - side // 2).max()))
    if radius >= side // 2 - 1:
        raise ValueError("despeckle model's receptive field is too large to tile safely")
    return radius
