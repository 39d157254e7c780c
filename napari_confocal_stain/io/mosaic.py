"""The one object every reader returns: a lazily loaded, normalised R/F mosaic pyramid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask.array as da

from napari_confocal_stain.io.pyramid import downsample_factors

__all__ = ["LAYOUTS", "ConfocalMosaic"]

LAYOUTS = ("vivascope", "tiff-pair", "multichannel-tiff", "ome-zarr")


@dataclass(frozen=True, eq=False)
class ConfocalMosaic:
    """A dual-mode confocal slide: reflectance (R) and fluorescence (F) pyramids.

    Attributes
    ----------
    r, f
        Pyramid levels, level 0 first; each a 2-D ``(Y, X)`` dask array of float32 in
        [0, 1]. ``f[k]`` has the shape of ``r[k]``. Nothing is read until computed.
    pixel_size_um
        Level-0 pixel size in µm (0.75, the Vivascope's, when the file has none).
    source
        The path that was opened.
    layout
        ``"vivascope"``, ``"tiff-pair"``, ``"multichannel-tiff"`` or ``"ome-zarr"``.
    name
        Human-readable slide name (folder or file stem).
    dtype
        Data type on disk, e.g. ``"uint8"``.
    normalization
        Normalisation mode used (see :mod:`napari_confocal_stain.core.normalize`).
    files
        ``{"r": path, "f": path}``; the same file twice for two-channel formats.
    metadata
        Everything else worth keeping: ``channel_names``, ``levels_from_file``,
        ``n_file_levels``, ``norm_stats``, ``pixel_size_source``, ``storage``, ...
    r_raw, f_raw
        The levels stored in the file(s), as read (file dtype, not normalised): lazily
        sliceable planes, ``r_raw[k]`` matching ``r[k]`` for the first ``len(r_raw)`` levels.
        Empty when unknown. Reading a box straight from them decodes only the file's tiles
        under the box (the viewer's fast linear stain uses this).
    """

    r: list[da.Array]
    f: list[da.Array]
    pixel_size_um: float
    source: str
    layout: str
    name: str
    dtype: str
    normalization: str
    files: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    r_raw: list[Any] = field(default_factory=list, repr=False, compare=False)
    f_raw: list[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.r) != len(self.f) or not self.r:
            raise ValueError("r and f must be non-empty lists with one array per level")
        for k, (a, b) in enumerate(zip(self.r, self.f, strict=True)):
            if a.shape != b.shape or a.ndim != 2:
                raise ValueError(f"level {k}: r {a.shape} and f {b.shape} must be equal and 2-D")
        if len(self.r_raw) != len(self.f_raw) or len(self.r_raw) > len(self.r):
            raise ValueError("r_raw and f_raw must have the same length, at most one per level")
        for k, (a, b) in enumerate(zip(self.r_raw, self.f_raw, strict=True)):
            if tuple(a.shape) != tuple(self.r[k].shape) or tuple(b.shape) != tuple(a.shape):
                raise ValueError(f"stored level {k}: r_raw/f_raw shapes differ from level {k}")

    def __repr__(self) -> str:
        h, w = self.shape
        return (
            f"ConfocalMosaic(name={self.name!r}, layout={self.layout!r}, shape={h}x{w}, "
            f"levels={self.levels}, pixel_size_um={self.pixel_size_um:g}, dtype={self.dtype!r}, "
            f"normalization={self.normalization!r}, source={self.source!r})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        h, w = self.r[0].shape
        return int(h), int(w)

    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.r)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every level."""
        return [(int(a.shape[0]), int(a.shape[1])) for a in self.r]

    @property
    def downsample(self) -> list[float]:
        """Level-0 size / level size for each level (1, 2, 4, ...)."""
        return downsample_factors(self.level_shapes)

    def info(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what ``confocal-stain info`` prints).

        Returns
        -------
        dict
            ``name, source, layout, shape, levels, level_shapes, downsample,
            pixel_size_um, dtype, normalization, files, chunks`` (chunk shape per level)
            and the JSON-safe part of ``metadata``.
        """
        return {
            "name": self.name,
            "source": self.source,
            "layout": self.layout,
            "shape": list(self.shape),
            "levels": self.levels,
            "level_shapes": [list(s) for s in self.level_shapes],
            "downsample": self.downsample,
            "pixel_size_um": float(self.pixel_size_um),
            "dtype": self.dtype,
            "normalization": self.normalization,
            "files": dict(self.files),
            "chunks": [[int(c[0][0]), int(c[1][0])] for c in (a.chunks for a in self.r)],
            "metadata": _json_safe(self.metadata),
        }


def _json_safe(value: Any) -> Any:
    """Drop or convert what ``json.dumps`` cannot take (numpy scalars, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)
