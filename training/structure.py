"""Structure-preserving losses for stain training: keep every nucleus of F.

The clinician's objection to the thesis's U-Net is that it erases nuclei. A CycleGAN's losses
do not forbid it: the cycle can encode a nucleus in a colour shade the discriminator accepts.
This module gives a loss that ties the output's *hematoxylin* (what a pathologist reads as a
nucleus) to the input's nuclear signal F:

* :func:`hematoxylin_density` — Ruifrok & Johnston colour deconvolution in torch, the same
  formula as ``skimage.color.rgb2hed`` (``(log rgb / log 1e-6) @ hed_from_rgb``, clipped at
  0), so it is differentiable and agrees with the nuclei detector of
  :mod:`napari_confocal_stain.core.nuclei`, which reads ``rgb2hed``'s hematoxylin.
* :func:`hematoxylin_loss` — ``1 − corr(hp(H(output)), hp(F))``, the Pearson correlation of
  the *local contrast* (map minus its box blur) of the output's hematoxylin and of F, per
  image. Local contrast because nuclei are small bright spots in F and dark purple spots in
  H&E, while the slow background (tissue vs glass, stain intensity) is the generator's and the
  discriminator's business; correlation because F and optical density have no common scale.
  A generator that erases a nucleus loses correlation where F has a peak; one that invents a
  nucleus loses it where F is flat.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = ["HED_FROM_RGB", "hematoxylin_density", "hematoxylin_loss", "local_contrast"]

HED_FROM_RGB = torch.tensor(
    [
        [1.87798274, -1.00767869, -0.55611582],
        [-0.06590806, 1.13473037, -0.1355218],
        [-0.60190736, -0.48041419, 1.57358807],
    ],
    dtype=torch.float64,
)
"""``skimage.color.hed_from_rgb`` (Ruifrok & Johnston's H&E-DAB matrix, inverted)."""


def hematoxylin_density(rgb: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
    """Hematoxylin optical density of RGB images, as ``skimage.color.rgb2hed``'s channel 0.

    Parameters
    ----------
    rgb
        ``(B, 3, H, W)`` in [0, 1].
    clip
        Clip at 0 like ``rgb2hed``. The loss does not: pink eosin-only pixels have a
        *negative* unclipped density, and the clip would give them no gradient, so a
        generator could never be pushed to draw a missing nucleus on eosin.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H, W)`` (≥ 0 if ``clip``; 0 on white, ~0.1–0.3 on nuclei of typical H&E).
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"hematoxylin_density expects (B, 3, H, W), got {tuple(rgb.shape)}")
    od = torch.log(rgb.float().clamp_min(1e-6)) / math.log(1e-6)
    w = HED_FROM_RGB[:, 0].to(device=rgb.device, dtype=od.dtype).view(1, 3, 1, 1)
    h = (od * w).sum(dim=1, keepdim=True)
    return h.clamp_min(0.0) if clip else h


def local_contrast(x: torch.Tensor, window: int = 15) -> torch.Tensor:
    """``x`` minus its ``window × window`` box mean (reflect-padded), per channel."""
    pad = window // 2
    blurred = F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, stride=1)
    return x - blurred


def hematoxylin_loss(
    output: torch.Tensor, f: torch.Tensor, *, window: int = 15, eps: float = 1e-6
) -> torch.Tensor:
    """``1 − corr(local contrast of H(output), local contrast of F)``, averaged over the batch.

    Parameters
    ----------
    output
        ``(B, 3, H, W)`` generator output in [-1, 1].
    f
        ``(B, 1, H, W)`` (or ``(B, H, W)``) nuclear signal of the input, any scale.
    window
        Box size of the local-contrast filter in pixels (15 px = 11 µm at 0.75 µm/px: a
        little more than a nucleus).
    eps
        Keeps the correlation finite on flat images.

    Returns
    -------
    torch.Tensor
        Scalar in [0, 2]: 0 when the hematoxylin contrast is an increasing affine function of
        F's, 1 when unrelated.
    """
    if f.ndim == 3:
        f = f[:, None]
    if output.shape[0] != f.shape[0] or output.shape[-2:] != f.shape[-2:]:
        raise ValueError(
            f"hematoxylin_loss: output {tuple(output.shape)} and F {tuple(f.shape)} differ"
        )
    h = hematoxylin_density((output.float() + 1.0) / 2.0, clip=False)
    a = local_contrast(h, window).flatten(1)
    b = local_contrast(f.float().to(h.device), window).flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)
    return (1.0 - corr).mean()
