"""Count a model's floating-point work, to compare throughput with the machine's FLOP/s.

Only convolutions and transposed convolutions are counted (2 FLOPs per multiply-accumulate):
they are > 99 % of the work of every network here; norms and activations are memory-bound.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Conv2d / ConvTranspose2d."""
    kernel = module.weight.shape[2] * module.weight.shape[3]
    if isinstance(module, nn.ConvTranspose2d):
        # Every input element is scattered through a kernel into out_channels/groups outputs.
        return inp.numel() * (module.out_channels // module.groups) * kernel
    # Every output element gathers kernel · in_channels/groups inputs.
    return out.numel() * (module.in_channels // module.groups) * kernel


def count_flops(model: nn.Module, in_shape: tuple[int, int, int] = (3, 256, 256)) -> int:
    """FLOPs (2 × MACs of conv / conv-transpose layers) of one forward pass of one image.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is run once on zeros on its own device and dtype.
    in_shape
        ``(C, H, W)`` of the input image (must suit the model, e.g. a multiple of 2**n_down).

    Returns
    -------
    int
        Total FLOPs for a batch of one.
    """
    total = 0

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * _conv_macs(module, args[0], out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()  # BatchNorm would otherwise update its running statistics
        with torch.no_grad():
            model(torch.zeros((1, *in_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def flops_per_pixel(model: nn.Module, in_shape: tuple[int, int, int] = (3, 256, 256)) -> float:
    """FLOPs per input pixel of one forward pass (see :func:`count_flops`).

    For the fully convolutional generators this is independent of the image size (up to
    rounding at the borders), so it converts a measured pixels-per-second into FLOP/s.

    Parameters
    ----------
    model
        The network.
    in_shape
        ``(C, H, W)`` of the probe input.

    Returns
    -------
    float
        FLOPs divided by ``H · W``.
    """
    return count_flops(model, in_shape) / float(in_shape[1] * in_shape[2])
