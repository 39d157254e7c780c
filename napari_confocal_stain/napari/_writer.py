"""npe2 writer: an RGB (or grey) image layer → pyramidal OME-Zarr or OME-TIFF.

The layer's full-resolution data is streamed in blocks (a multiscale layer's level 0, a
lazy dask array is computed block by block) into the same layout as the whole-slide
export (:func:`napari_confocal_stain.export.export_array`). Float pixels are taken
as [0, 1] (what the plugin's stain layers hold) or mapped through the layer's contrast
limits when they are not; the layer's ``scale`` (µm per pixel in this plugin) becomes the
pixel size. To stain a whole slide at full resolution use the GAN-stain widget's Export
(or ``confocal-stain stain``): a layer holds only what the viewer has computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_confocal_stain.engine.pipeline import to_uint8

__all__ = ["write_image_layer"]


class _AsUint8:
    """A lazily sliced view of a layer's array as uint8 (converts only what is sliced)."""

    def __init__(self, array: Any, contrast_limits: Any) -> None:
        self.array = array
        shape = tuple(int(n) for n in array.shape)
        self.shape = shape
        self.dtype = np.dtype(np.uint8)
        self.src_dtype = np.dtype(array.dtype)
        lo, hi = (0.0, 1.0) if contrast_limits is None else (float(v) for v in contrast_limits)
        if self.src_dtype.kind == "f" and (lo, hi) == (0.0, 1.0):
            self.lo, self.hi = 0.0, 1.0
        elif self.src_dtype == np.uint8:
            self.lo, self.hi = 0.0, 255.0
        else:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1.0

    def __getitem__(self, key: Any) -> np.ndarray:
        block = np.asarray(self.array[key])
        if self.src_dtype == np.uint8:
            return block
        return to_uint8((block.astype(np.float32) - self.lo) / (self.hi - self.lo))


def write_image_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one image layer to ``path`` (``*.ome.zarr`` or ``*.ome.tif``).

    Parameters
    ----------
    path
        Destination chosen in napari's save dialog.
    data
        The layer's data (an array, or a list of arrays for a multiscale layer).
    attributes
        The layer's attributes (``rgb``, ``scale``, ``contrast_limits``, ``name``, …).

    Returns
    -------
    list of str
        ``[path]`` when written; ``[]`` when the layer is not a 2-D RGB or grey image
        (napari then reports that no writer could save it).

    Raises
    ------
    OutputError
        The file could not be written (permission, read-only or full disk, a folder in the
        way, …): one line naming the file and the problem, which napari shows as one
        notification. Nothing is left at ``path`` or beside it.
    """
    from napari_confocal_stain.errors import USER_ERROR, OutputError, explain
    from napari_confocal_stain.export import export_array

    level0 = data[0] if attributes.get("multiscale") or isinstance(data, list) else data
    shape = tuple(int(n) for n in level0.shape)
    rgb = len(shape) == 3 and shape[-1] in (3, 4)
    if not (len(shape) == 2 or rgb):
        return []
    scale = attributes.get("scale") or (1.0, 1.0)
    px = float(scale[-2]) if float(scale[-2]) > 0 else 1.0
    view = _AsUint8(level0, None if rgb else attributes.get("contrast_limits"))
    try:
        out = export_array(
            view,
            path,
            pixel_size_um=px,
            name=str(attributes.get("name") or "image"),
            overwrite=True,  # napari's save dialog has already asked about replacing
        )
    except Exception as exc:
        message, status = explain(exc, path)
        if status != USER_ERROR:
            raise  # a bug: napari shows it with its traceback
        if str(path) in message:
            raise OutputError(None, message) from exc
        raise OutputError(path, f"not saved: {message}") from exc
    return [str(out)]
