"""Where a model runs: choose the torch device, load a model onto it, and size work to it.

``device="auto"`` picks CUDA, then Apple MPS, then the CPU. :func:`load_model` is the one
way the package gets a runnable model: the checkpoint is judged and read by
:func:`napari_confocal_stain.models.checkpoint.read_model` (on the CPU), then placed here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_confocal_stain.errors import ConfocalStainError
from napari_confocal_stain.models.checkpoint import read_model

__all__ = [
    "DeviceError",
    "available_bytes",
    "load_model",
    "resolve_device",
    "select_device",
]


class DeviceError(ConfocalStainError, RuntimeError):
    """The requested torch device does not exist or is not available on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _unavailable(requested: str, why: str, fallback: bool) -> torch.device:
    if not fallback:
        raise DeviceError(
            f"device {requested!r} is not available: {why}. Use device='auto' or 'cpu', "
            f"or pass fallback=True to fall back to the CPU with a warning"
        )
    warnings.warn(
        f"device {requested!r} is not available ({why}); running on the CPU instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return torch.device("cpu")


def select_device(device: str | torch.device = "auto", *, fallback: bool = False) -> torch.device:
    """Resolve a device request to a ``torch.device`` that exists on this machine.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA if available, else Apple MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``, ``"mps"``, or a ``torch.device``.
    fallback
        If the requested accelerator is unavailable, warn (``RuntimeWarning``) and return the
        CPU instead of raising.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        The device is unavailable (and ``fallback`` is false) or the CUDA index is out of range.
    ValueError
        ``device`` is not a device name torch understands.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return _unavailable(str(device), "this torch has no usable CUDA GPU", fallback)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return _unavailable(
                str(device), f"only {count} CUDA device(s), numbered 0–{count - 1}", fallback
            )
        return dev
    if dev.type == "mps":
        if not _mps_available():
            return _unavailable(str(device), "Apple MPS is not available here", fallback)
        return dev
    return _unavailable(str(device), f"device type {dev.type!r} is not supported", fallback)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """As :func:`select_device` with ``fallback=True``; ``"meta"`` is passed through (tests)."""
    if isinstance(device, torch.device | str) and str(device) == "meta":
        return torch.device("meta")
    return select_device(device, fallback=True)


def available_bytes(device: torch.device) -> float:
    """Memory the engine may use on ``device`` (a conservative share of what is free)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    if device.type == "mps":
        try:
            limit = torch.mps.recommended_max_memory()
            return 0.6 * max(limit - torch.mps.driver_allocated_memory(), 0)
        except (AttributeError, RuntimeError):
            return 2e9
    avail = None
    try:
        import psutil  # optional: the test/bench extras have it

        avail = psutil.virtual_memory().available
    except ImportError:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4e9
    return 0.4 * avail  # the machine is shared with the viewer and other work


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    architecture: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    fallback: bool = False,
) -> nn.Module:
    """Load a model, ready for inference on a device.

    Parameters
    ----------
    name_or_path
        The name of a bundled weight file (``models/weights/<name>.safetensors``, see
        :func:`~napari_confocal_stain.models.checkpoint.available_weights`) or the path of a
        checkpoint: a ``.safetensors`` file from
        :func:`~napari_confocal_stain.models.checkpoint.save_checkpoint`, or a legacy ``.pt``
        / ``.pth`` state dict (read with ``weights_only=True``; needs ``architecture``).
    device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; see
        :func:`select_device`.
    dtype
        Cast floating-point weights, e.g. ``torch.float16`` or ``"bf16"``; ``None`` keeps them.
    architecture, kwargs
        Registry name and constructor kwargs for files that do not record them (legacy
        ``.pt``, foreign safetensors). For our checkpoints they may be omitted; if given they
        must agree with the file.
    fallback
        Fall back to the CPU with a warning when ``device`` is unavailable.

    Returns
    -------
    nn.Module
        In eval mode on the device, with a ``checkpoint_meta`` dict attribute (the file's
        metadata plus ``"path"``).

    Raises
    ------
    CheckpointError
        Any problem with the file or its match to the architecture, one line naming the file
        (see :func:`~napari_confocal_stain.models.checkpoint.read_model`).
    DeviceError
        The device is unavailable and ``fallback`` is false.
    """
    model = read_model(name_or_path, dtype, architecture=architecture, kwargs=kwargs)
    return model.to(device=select_device(device, fallback=fallback)).eval()
