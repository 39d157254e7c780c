"""Whole-slide export: stain or despeckled R → pyramidal OME-Zarr / OME-TIFF, resumable.

See :func:`export_slide` and ``docs/export.md``.
"""

from napari_confocal_stain.export.plan import ExportPlan, parse_region
from napari_confocal_stain.export.runner import (
    ExportCancelled,
    default_context,
    export_slide,
    output_format,
)

__all__ = [
    "ExportCancelled",
    "ExportPlan",
    "default_context",
    "export_slide",
    "output_format",
    "parse_region",
]
