"""Whole-slide export: stain or despeckled R → pyramidal OME-Zarr / OME-TIFF, resumable.

See :func:`export_slide` and ``docs/export.md``. Modules: :mod:`~.driver` (the entry
points and the run loop), :mod:`~.tasks` (what runs on a worker), :mod:`~.workdir` (the
work folder, its manifest, the output put in place), :mod:`~.plan` (geometry),
:mod:`~.store` (the pyramid store), :mod:`~.ometiff` (OME-TIFF assembly),
:mod:`~.distributed` (thread and dask pools).
"""

from napari_confocal_stain.export.driver import default_context, export_array, export_slide
from napari_confocal_stain.export.plan import ExportPlan, parse_region
from napari_confocal_stain.export.tasks import PRODUCTS
from napari_confocal_stain.export.workdir import ExportCancelled, output_format

__all__ = [
    "PRODUCTS",
    "ExportCancelled",
    "ExportPlan",
    "default_context",
    "export_array",
    "export_slide",
    "output_format",
    "parse_region",
]
