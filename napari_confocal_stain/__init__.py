"""napari-confocal-stain: digital H&E staining of ex vivo confocal microscopy mosaics.

The headless API in one import::

    from napari_confocal_stain import (
        open_mosaic, linear_stain, load_model, stain_region, despeckle_region,
        StainPipeline, StainSettings, hallucination_maps, flag_hallucinations,
        export_slide,
    )

Names are imported lazily, so ``import napari_confocal_stain`` stays cheap (no torch, no
pyvips) for napari's plugin discovery and for the command line.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that owns it.
_LAZY = {
    "ConfocalMosaic": "napari_confocal_stain.io.mosaic",
    "open_mosaic": "napari_confocal_stain.io.readers",
    "find_mosaics": "napari_confocal_stain.io.readers",
    "write_synthetic_mosaic": "napari_confocal_stain.io.synthetic",
    "linear_stain": "napari_confocal_stain.core.linear_stain",
    "hallucination_maps": "napari_confocal_stain.core.metrics",
    "flag_hallucinations": "napari_confocal_stain.measure.flags",
    "load_model": "napari_confocal_stain.inference.device",
    "stain_region": "napari_confocal_stain.inference.region",
    "despeckle_region": "napari_confocal_stain.inference.despeckle",
    "StainPipeline": "napari_confocal_stain.engine.pipeline",
    "StainSettings": "napari_confocal_stain.engine.pipeline",
    "export_slide": "napari_confocal_stain.export",
}

__all__ = [
    "ConfocalMosaic",
    "StainPipeline",
    "StainSettings",
    "__version__",
    "despeckle_region",
    "export_slide",
    "find_mosaics",
    "flag_hallucinations",
    "hallucination_maps",
    "linear_stain",
    "load_model",
    "open_mosaic",
    "stain_region",
    "write_synthetic_mosaic",
]

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.core.metrics import hallucination_maps
    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings
    from napari_confocal_stain.export import export_slide
    from napari_confocal_stain.inference.despeckle import despeckle_region
    from napari_confocal_stain.inference.device import load_model
    from napari_confocal_stain.inference.region import stain_region
    from napari_confocal_stain.io.mosaic import ConfocalMosaic
    from napari_confocal_stain.io.readers import find_mosaics, open_mosaic
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic
    from napari_confocal_stain.measure.flags import flag_hallucinations


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
