"""Choose the torch device a model runs on."""

from __future__ import annotations

import warnings

import torch

from napari_confocal_stain.errors import ConfocalStainError


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
