"""DespeckleNN: a small fully convolutional net that removes speckle from reflectance.

Speckle is multiplicative, ``Y = X ⊙ S`` with ``E[S] = 1`` (thesis §3.2.1, Combalia §2.1). The
net is a stack of ``layers`` convolutions (``filters`` kernels of ``kernel × kernel``, "same"
padding, BatchNorm, PReLU), a 1×1 convolution to one channel, an optional activation, and a
skip connection from the input that turns the CNN's output into a clean image. The skip is where
the variants of the thesis (Fig. 3.2) differ:

``"multiplicative"``  ``y = x · net(x)``: the net predicts the inverse noise ``1/S``
                      (Combalia: 7 × 64 filters, tanh on the last layer).
``"divisive"``        ``y = x / net(x)``: the net predicts ``S``. Unstable (the thesis drops it
                      after it fails to converge); the denominator is clamped to at least
                      ``div_eps`` so a prediction near or below 0 cannot blow up to ±inf/NaN.
``"log-add"``         ``y = exp(log x + net(log x))``: noise becomes additive in log space
                      (thesis best: M=3, K=32, N=5, SSIM 0.414 → 0.960 at L=1).
``"log-subtract"``    ``y = exp(log x − net(log x))``: the net predicts ``log S`` itself.

Inputs and outputs are ``(B, 1, H, W)`` reflectance in [0, 1]; the output is clamped to [0, 1]
(the appendix code applies a sigmoid to ``exp(·)``, which maps every output into (0.5, 1) — a bug
we do not copy). Any ``H × W`` works: every convolution is "same" with reflection padding,
falling back to replicate padding on inputs smaller than the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SKIPS = ("multiplicative", "divisive", "log-add", "log-subtract")
"""The skip connections DespeckleNN supports."""

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
"""Final activations DespeckleNN accepts, by name."""


class SamePad2d(nn.Module):
    """Pad by ``pad`` pixels on every side, reflecting where the input is large enough.

    Reflection needs ``pad < size``; on smaller inputs (a 1–4 px sliver at a slide's edge) we
    replicate instead, so the despeckler accepts any ``H × W``.

    Parameters
    ----------
    pad
        Pixels added on each side.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return x
        mode = "reflect" if self.pad < min(x.shape[-2:]) else "replicate"
        return F.pad(x, (self.pad,) * 4, mode=mode)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class DespeckleNN(nn.Module):
    """Speckle-removal CNN with a multiplicative, divisive or log-space skip connection.

    Parameters
    ----------
    skip
        One of :data:`SKIPS` (see the module docstring for the formulas).
    layers
        ``M``, the number of ``kernel × kernel`` convolution layers (each Conv → BatchNorm →
        PReLU) before the final 1×1 convolution.
    filters
        ``K``, the number of filters of every hidden layer.
    kernel
        ``N``, the (odd) kernel size of the hidden layers.
    dilation
        One dilation rate for every layer, or one per layer (e.g. ``(1, 2, 3, 4, 3, 2, 1)``,
        the ID-CNN of Wang et al. 2017), which widens the receptive field at the same cost.
    final_activation
        ``None`` or one of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"softplus"``, applied to the
        1×1 convolution's output before the skip.
    eps
        Added before the logarithm of the log-space variants (and subtracted after ``exp``, so
        a net that outputs 0 is exactly the identity).
    div_eps
        Lower bound of the divisive variant's denominator.
    clamp_output
        Clamp the result to [0, 1]. Training code may switch this off to keep gradients for
        out-of-range predictions.

    Notes
    -----
    The PReLU slopes are per channel (He et al. 2015's channel-wise form). Parameter count:
    ``(N²·1·K + K) + (M−1)(N²·K² + K) + M·(2K + K) + (K + 1)`` — convolutions with bias,
    BatchNorm weight and bias, PReLU slopes, and the final 1×1 convolution.
    """

    def __init__(
        self,
        skip: str = "log-add",
        layers: int = 3,
        filters: int = 32,
        kernel: int = 5,
        dilation: int | Sequence[int] = 1,
        final_activation: str | None = None,
        eps: float = 1e-5,
        div_eps: float = 1e-3,
        clamp_output: bool = True,
    ) -> None:
        super().__init__()
        if skip not in SKIPS:
            raise ValueError(f"DespeckleNN: skip must be one of {SKIPS}, got {skip!r}")
        if layers < 1 or filters < 1:
            raise ValueError(
                f"DespeckleNN: layers and filters must be ≥ 1, got {layers}, {filters}"
            )
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"DespeckleNN: kernel must be a positive odd size, got {kernel}")
        if final_activation is not None and final_activation not in ACTIVATIONS:
            raise ValueError(
                f"DespeckleNN: final_activation must be None or one of "
                f"{tuple(ACTIVATIONS)}, got {final_activation!r}"
            )
        dilations = (dilation,) * layers if isinstance(dilation, int) else tuple(dilation)
        if len(dilations) != layers or any(int(d) < 1 for d in dilations):
            raise ValueError(
                f"DespeckleNN: dilation must be a positive int or {layers} positive ints "
                f"(one per layer), got {dilation!r}"
            )
        dilations = tuple(int(d) for d in dilations)

        self.skip = skip
        self.eps = float(eps)
        self.div_eps = float(div_eps)
        self.clamp_output = bool(clamp_output)
        self.dilations = dilations
        self.config: dict[str, Any] = {
            "skip": skip,
            "layers": int(layers),
            "filters": int(filters),
            "kernel": int(kernel),
            "dilation": int(dilation) if isinstance(dilation, int) else list(dilations),
            "final_activation": final_activation,
            "eps": self.eps,
            "div_eps": self.div_eps,
            "clamp_output": self.clamp_output,
        }

        stages: list[nn.Module] = []
        in_ch = 1
        for d in dilations:
            stages.append(
                nn.Sequential(
                    SamePad2d(d * (kernel - 1) // 2),
                    nn.Conv2d(in_ch, filters, kernel, dilation=d),
                    nn.BatchNorm2d(filters),
                    nn.PReLU(filters),
                )
            )
            in_ch = filters
        stages.append(nn.Conv2d(filters, 1, 1))  # "merges" the K channels into one image
        if final_activation is not None:
            stages.append(ACTIVATIONS[final_activation]())
        self.net = nn.Sequential(*stages)

    @property
    def halo(self) -> int:
        """Receptive-field radius in pixels: a tile needs this much context on each side."""
        kernel = self.config["kernel"]
        return sum(d * (kernel - 1) // 2 for d in self.dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Despeckle ``x`` of shape ``(B, 1, H, W)`` in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(
                f"DespeckleNN expects a (B, 1, H, W) reflectance tensor, got {tuple(x.shape)}"
            )
        if self.skip == "multiplicative":
            y = x * self.net(x)
        elif self.skip == "divisive":
            # Clamp, not "+ eps": a prediction of -eps would still divide by zero.
            y = x / self.net(x).clamp_min(self.div_eps)
        else:
            log_x = torch.log(x.clamp_min(0) + self.eps)
            residual = self.net(log_x)
            log_y = log_x + residual if self.skip == "log-add" else log_x - residual
            y = torch.exp(log_y) - self.eps
        if self.clamp_output:
            y = y.clamp(0.0, 1.0)
        return y
