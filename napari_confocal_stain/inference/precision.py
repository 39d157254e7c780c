"""Which float precision a model runs in: fp32, or bf16/fp16 autocast where it pays.

``precision="auto"`` is bf16 (else fp16) autocast on CUDA, fp32 on MPS, and on the CPU bf16
only if a one-off calibration per model (:func:`cpu_precision`) finds it both faster and
within tolerance of fp32 (CPUs with bf16 matrix units, e.g. AMX, can gain; without them bf16
is emulated and many times slower).
"""

from __future__ import annotations

import time
import warnings
import weakref
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.tiling import round_up
from napari_confocal_stain.inference.dense_norm import make_seamless
from napari_confocal_stain.inference.geometry import (
    in_channels,
    min_size,
    model_device,
    parameters_version,
    size_multiple,
)

__all__ = [
    "CPU_BF16_MIN_SPEEDUP",
    "CPU_BF16_TOLERANCE",
    "autocast",
    "cpu_precision",
    "resolve_precision",
]

CPU_BF16_TOLERANCE = {"mean_abs": 0.01, "max_abs": 0.06}
"""bf16 on the CPU must stay this close to fp32 (output in [0, 1]) to be chosen by ``auto``."""


CPU_BF16_MIN_SPEEDUP = 1.10
"""…and be at least this much faster."""

CPU_CALIBRATION_MIN_SECONDS = 0.02
"""A timed fp32 run shorter than this is mostly call overhead, not arithmetic: the calibration
image grows (to at most :data:`CPU_CALIBRATION_MAX_SIZE`) until fp32 takes this long."""

CPU_CALIBRATION_MAX_SIZE = 512
"""Largest side of the calibration image."""


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32" or device.type == "meta":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_CALIBRATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_precision(model: nn.Module, *, size: int = 96, repeats: int = 2) -> dict[str, Any]:
    """Decide once per model whether bf16 autocast beats fp32 on this CPU (cached).

    Runs the engine's copy of the model (channels-last, as :func:`stain_region` does) on a fixed
    smooth test image of ``size²`` (rounded to the model's multiple; doubled, up to
    :data:`CPU_CALIBRATION_MAX_SIZE`, while an fp32 pass takes under
    :data:`CPU_CALIBRATION_MIN_SECONDS`) in fp32 and under bf16 autocast, ``repeats`` times
    each after a warm-up, and picks bf16 only if it is :data:`CPU_BF16_MIN_SPEEDUP` × faster
    and within :data:`CPU_BF16_TOLERANCE`. A bf16 warm-up over 3× slower than fp32 (bf16
    emulated on a CPU without bf16 units: 20× slower) ends the timing early. Under a second
    once per model for the bundled models on a 2-core CPU.

    Parameters
    ----------
    model
        The generator (on the CPU).
    size
        Starting side of the calibration image.
    repeats
        Timed runs per precision (the median is used).

    Returns
    -------
    dict
        ``precision`` ("fp32" or "bf16"), ``size`` (the side used), ``fp32_s``, ``bf16_s``,
        ``mean_abs``, ``max_abs``.
    """
    key = parameters_version(model)
    hit = _CALIBRATION.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    net = make_seamless(model)  # what the engine runs: its copy, channels-last
    side = max(round_up(size, size_multiple(model)), min_size(model))
    x = _calibration_image(model, side)
    # A cheap model on a small image times call overhead, not arithmetic (a 12 kFLOP/px
    # model: 3 ms in either precision at 96², 2× apart at 512²): grow the image until it
    # does not.
    while side < CPU_CALIBRATION_MAX_SIZE:
        with torch.inference_mode():
            net(x)
            t0 = time.perf_counter()
            net(x)
            if time.perf_counter() - t0 >= CPU_CALIBRATION_MIN_SECONDS:
                break
        side = min(CPU_CALIBRATION_MAX_SIZE, round_up(2 * side, size_multiple(model)))
        x = _calibration_image(model, side)
    outs: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16"):
            with autocast(torch.device("cpu"), prec):
                t0 = time.perf_counter()
                y = net(x)  # warm-up
                runs = [time.perf_counter() - t0]
                # bf16 emulated on a CPU without bf16 units is many times slower: one run
                # (even with its warm-up overhead) already says so, skip the rest.
                if prec == "fp32" or runs[0] < 3 * times["fp32"]:
                    runs = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        y = net(x)
                        runs.append(time.perf_counter() - t0)
            outs[prec] = y.float()
            times[prec] = float(np.median(runs))
    diff = (outs["fp32"] - outs["bf16"]).abs() / 2.0  # [-1, 1] → [0, 1] scale
    result = {
        "size": side,
        "fp32_s": times["fp32"],
        "bf16_s": times["bf16"],
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
    }
    ok = (
        result["mean_abs"] <= CPU_BF16_TOLERANCE["mean_abs"]
        and result["max_abs"] <= CPU_BF16_TOLERANCE["max_abs"]
        and times["fp32"] >= CPU_BF16_MIN_SPEEDUP * times["bf16"]
    )
    result["precision"] = "bf16" if ok else "fp32"
    _CALIBRATION[model] = (key, result)
    return result


def _calibration_image(model: nn.Module, side: int) -> torch.Tensor:
    """A fixed smooth ``(1, C, side, side)`` test image on the model's device (channels-last)."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    chans = in_channels(model)
    img = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(chans)])
    x = torch.as_tensor(img[None], dtype=torch.float32).to(model_device(model))
    return x.contiguous(memory_format=torch.channels_last) if chans > 1 else x


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """The precision actually used: "fp32", "bf16" or "fp16" (see the module docstring).

    Explicit "fp16" on the CPU falls back to fp32 with a warning (CPU fp16 convolutions are
    emulated and slow on most CPUs); explicit "bf16" on the CPU is honoured.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if device.type == "mps":
        if precision == "bf16":
            warnings.warn("bf16 is not used on MPS; running in fp32", RuntimeWarning, stacklevel=3)
            return "fp32"
        return "fp32" if precision == "auto" else precision
    if device.type == "cpu":
        if precision == "fp16":
            warnings.warn(
                "fp16 is not supported for CPU inference; running in fp32 instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return "fp32"
        if precision == "auto":
            return cpu_precision(model)["precision"] if model is not None else "fp32"
        return precision
    return "fp32"
