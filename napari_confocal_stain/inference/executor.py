"""Running batches of a model on a device: autocast, out-of-memory fallback, cancellation.

:class:`Executor` is the one place the engine calls a model. It runs the engine's copy
(:func:`~napari_confocal_stain.inference.dense_norm.make_seamless`: shares the parameters,
instance norms replaced by a layout-friendly implementation that is plain instance norm
unless a statistics grid is set) channels-last, under ``torch.inference_mode`` and the
chosen precision's autocast. CUDA/MPS out-of-memory raises :class:`DeviceOutOfMemory` so the
caller can halve its batch (or block) and retry; at a batch of one
:meth:`Executor.fall_back` moves the run to the CPU with a warning.
:class:`RegionRun` carries what every tiling strategy needs about one region.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.tiling import round_up
from napari_confocal_stain.errors import ConfocalStainError
from napari_confocal_stain.inference.dense_norm import SeamlessModel, make_seamless
from napari_confocal_stain.inference.device import available_bytes
from napari_confocal_stain.inference.geometry import (
    in_channels,
    min_size,
    model_device,
    parameters_version,
    size_multiple,
)
from napari_confocal_stain.inference.precision import autocast, resolve_precision

__all__ = [
    "Cancelled",
    "DeviceOutOfMemory",
    "Executor",
    "RegionRun",
    "Runner",
    "auto_batch",
    "bytes_per_pixel",
    "default_runner",
]

Runner = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``runner(model, batch) -> output``: the one place a model is called (a test seam)."""


class Cancelled(ConfocalStainError):
    """The caller's ``cancel()`` returned True; the region was not finished."""


_BYTES_PER_PIXEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bytes_per_pixel(model: nn.Module) -> float:
    """Estimated peak activation memory per input pixel of one forward pass (cached).

    Measured by summing every leaf module's output size on a small probe image; the peak of an
    inference pass (where finished activations are freed) is well below that sum for the
    generators here (measured: U-Net base 64, sum 3.8 kB/px; peak RSS of a 1024² seamless
    pass 1.3 kB/px), so 0.4 × the sum is used.
    """
    hit = _BYTES_PER_PIXEL.get(model)
    if hit is not None:
        return hit
    side = max(min_size(model), round_up(64, size_multiple(model)))
    total = 0

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, in_channels(model), side, side), device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    value = max(0.4 * total / (side * side), 64.0)
    _BYTES_PER_PIXEL[model] = value
    return value


def auto_batch(model: nn.Module, window: tuple[int, int], device: torch.device) -> int:
    """Windows per forward pass that fit the device's memory (at most 4 on the CPU)."""
    per = bytes_per_pixel(model) * window[0] * window[1]
    cap = 4 if device.type == "cpu" else 64  # CPU gains nothing from bigger batches
    return int(max(1, min(cap, available_bytes(device) // max(per, 1.0))))


def default_runner(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call the model (the engine wraps this in inference mode and autocast)."""
    return model(x)


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom | torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate" in msg)


class DeviceOutOfMemory(Exception):
    """The current device ran out of memory at the current batch/block size."""


_DEVICE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Executor:
    """Runs batches on a device with autocast; on OOM the caller shrinks, then we move to CPU."""

    def __init__(
        self, model: nn.Module, device: torch.device, precision: str, runner: Runner | None
    ) -> None:
        self.source = model
        self.requested_precision = precision
        self.runner = runner or default_runner
        self._set_device(device)

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        probe = self.model("plain") if device.type == "cpu" else None
        self.precision = resolve_precision(self.requested_precision, device, probe)

    def model(self, kind: str) -> nn.Module:
        """The source model on ``self.device`` ("plain") or the engine's copy ("engine").

        The engine copy (:func:`~napari_confocal_stain.inference.dense_norm.make_seamless`) shares
        the parameters; with no statistics grid set its norms are plain instance norms, so the
        tiled strategies run the same model through the same (channels-last friendly) code.
        """
        src = self.source
        if model_device(src) == self.device or next(iter(src.parameters()), None) is None:
            base = src
        else:
            copies = _DEVICE_COPIES.setdefault(src, {})
            hit = copies.get(str(self.device))
            if hit is None or hit[0] != parameters_version(src):
                hit = (parameters_version(src), copy.deepcopy(src).to(self.device).eval())
                copies[str(self.device)] = hit
            base = hit[1]
        if kind == "plain":
            return base
        copies = _DEVICE_COPIES.setdefault(base, {})
        hit = copies.get("engine")
        if hit is None:
            hit = (None, make_seamless(base))
            copies["engine"] = hit
        return hit[1]

    def forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``net`` on ``x`` (CPU float32) on the device; return float32 on the CPU.

        The engine copy runs channels-last (NHWC): oneDNN's convolutions, and above all its
        transposed convolutions, are faster in that layout (measured: a base-64 U-Net tile
        ≈ 1.4× faster on this CPU), and :class:`DenseInstanceNorm2d` keeps the layout.
        """
        try:
            with torch.inference_mode(), autocast(self.device, self.precision):
                x = x.to(self.device, non_blocking=True)
                if isinstance(net, SeamlessModel) and x.shape[1] > 1:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.runner(net, x)
                return y.float().cpu().contiguous()
        except Exception as exc:
            if _is_oom(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise DeviceOutOfMemory(str(exc)) from exc
            raise

    def fall_back(self, why: str) -> None:
        """Move to the CPU (warns); re-raises if already there."""
        if self.device.type == "cpu":
            raise MemoryError(f"out of memory on the CPU even with the smallest batch: {why}")
        warnings.warn(
            f"out of memory on {self.device} even with a batch of one; continuing on the CPU",
            RuntimeWarning,
            stacklevel=4,
        )
        self._set_device(torch.device("cpu"))


@dataclass
class RegionRun:
    """One region through one model: what every tiling strategy needs.

    Attributes
    ----------
    image
        ``(H, W, C)`` float32 input in [0, 1] (DSCM for a generator).
    model
        The model as given by the caller (its engine copy comes from ``executor``).
    executor
        Runs batches on the device.
    tile
        Window / statistics-tile size ``N``.
    origin
        Image coordinates of a tile-grid line.
    skip_background
        Fill tissue-free windows with the model's background response.
    progress, cancel
        ``progress(done, total)`` after each batch or block; ``cancel()`` polled before each.
    info
        Filled with what happened (``model_pixels``, ``windows``, ``skipped``, …).
    """

    image: np.ndarray
    model: nn.Module
    executor: Executor
    tile: int
    origin: tuple[int, int] = (0, 0)
    skip_background: bool = True
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def multiple(self) -> int:
        """The model's size multiple."""
        return size_multiple(self.model)

    @property
    def min_size(self) -> int:
        """The model's smallest input side."""
        return min_size(self.model)

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("stain_region was cancelled")

    def report(self, done: int, total: int) -> None:
        """Tell the caller's progress callback, if any."""
        if self.progress is not None:
            self.progress(done, total)
