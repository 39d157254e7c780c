"""napari-confocal-stain: digital H&E staining of ex vivo confocal microscopy mosaics.

The public API is imported lazily so that ``import napari_confocal_stain`` stays
cheap (no torch, no pyvips) for napari's plugin discovery and for the CLI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ConfocalMosaic": "napari_confocal_stain.io.mosaic",
    "open_mosaic": "napari_confocal_stain.io.readers",
    "find_mosaics": "napari_confocal_stain.io.readers",
    "flag_hallucinations": "napari_confocal_stain.measure.flags",
    "linear_stain": "napari_confocal_stain.core.linear_stain",
    "write_synthetic_mosaic": "napari_confocal_stain.io.synthetic",
}

__all__ = [
    "ConfocalMosaic",
    "__version__",
    "find_mosaics",
    "flag_hallucinations",
    "linear_stain",
    "open_mosaic",
    "write_synthetic_mosaic",
]

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.io.mosaic import ConfocalMosaic
    from napari_confocal_stain.io.readers import find_mosaics, open_mosaic
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic
    from napari_confocal_stain.measure.flags import flag_hallucinations


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
