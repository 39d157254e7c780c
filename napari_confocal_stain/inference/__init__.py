"""Running models on regions of any size: devices, precision, tiling strategies, despeckling.

The public entry points: :func:`stain_region` (a generator on a DSCM region, seamless or
with the thesis's tiling strategies), :func:`despeckle_region` (a DespeckleNN on
reflectance), :func:`load_model` and :func:`select_device`.

Layers: :mod:`.geometry` (what a model needs), :mod:`.device` and :mod:`.precision` (where
and how it runs), :mod:`.dense_norm` (seam-free instance norm), :mod:`.executor` (batches,
out-of-memory fallback), :mod:`.background`, the strategies :mod:`.tiled` and
:mod:`.seamless`, and :mod:`.region` / :mod:`.despeckle` on top.
"""

from napari_confocal_stain.inference.background import (
    BACKGROUND_DARKNESS,
    BACKGROUND_TISSUE_FRACTION,
    background_response,
    is_background,
)
from napari_confocal_stain.inference.dense_norm import (
    SUBDIVISIONS,
    DenseInstanceNorm2d,
    SeamlessModel,
    StatsGrid,
    make_seamless,
)
from napari_confocal_stain.inference.despeckle import despeckle_region
from napari_confocal_stain.inference.device import (
    DeviceError,
    available_bytes,
    load_model,
    resolve_device,
    select_device,
)
from napari_confocal_stain.inference.executor import (
    Cancelled,
    Executor,
    RegionRun,
    Runner,
    bytes_per_pixel,
    default_runner,
)
from napari_confocal_stain.inference.geometry import min_size, receptive_radius, size_multiple
from napari_confocal_stain.inference.precision import cpu_precision, resolve_precision
from napari_confocal_stain.inference.region import measure_seam_index, stain_region
from napari_confocal_stain.inference.seamless import default_margin, plan_blocks, run_region

__all__ = [
    "BACKGROUND_DARKNESS",
    "BACKGROUND_TISSUE_FRACTION",
    "SUBDIVISIONS",
    "Cancelled",
    "DenseInstanceNorm2d",
    "DeviceError",
    "Executor",
    "RegionRun",
    "Runner",
    "SeamlessModel",
    "StatsGrid",
    "available_bytes",
    "background_response",
    "bytes_per_pixel",
    "cpu_precision",
    "default_margin",
    "default_runner",
    "despeckle_region",
    "is_background",
    "load_model",
    "make_seamless",
    "measure_seam_index",
    "min_size",
    "plan_blocks",
    "receptive_radius",
    "resolve_device",
    "resolve_precision",
    "run_region",
    "select_device",
    "size_multiple",
    "stain_region",
]
