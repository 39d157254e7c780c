"""Slide measurements built on the models: calibrated hallucination flags.

``measure`` sits above ``core``, ``io``, ``models`` and ``engine``: it may use all of them,
and the shells (CLI, napari) call it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "FlagCalibration": "napari_confocal_stain.measure.flags",
    "SIGNALS": "napari_confocal_stain.measure.flags",
    "flag_hallucinations": "napari_confocal_stain.measure.flags",
    "flag_signals": "napari_confocal_stain.measure.flags",
    "load_calibration": "napari_confocal_stain.measure.flags",
    "reasons_text": "napari_confocal_stain.measure.flags",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
