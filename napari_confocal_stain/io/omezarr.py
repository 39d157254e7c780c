"""Reading two-channel OME-Zarr (OME-NGFF 0.4 and 0.5) images lazily with zarr >= 3.

Understands ``multiscales`` (axes, datasets, ``coordinateTransformations`` scale) at the
group root, under ``attributes.ome`` (NGFF 0.5, zarr v3) or one level down in a
``bioformats2raw.layout`` container, and ``omero.channels[].label`` for the channel
names. A bare zarr array ``(C, Y, X)`` / ``(Y, X, C)`` is accepted too. Opening reads
only the JSON metadata; a :class:`ZarrPlane` slice reads only the chunks under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io.paths import check_folder, is_file, os_problem
from napari_confocal_stain.io.pyramid import StoredImage
from napari_confocal_stain.io.tiff import unit_to_um

__all__ = ["ZarrImage", "ZarrPlane", "is_zarr", "open_omezarr"]

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
_PIXEL_SIZE_RANGE_UM = (0.005, 20.0)


def is_zarr(path: str | Path) -> bool:
    """Return whether ``path`` is a directory holding zarr (v2 or v3) metadata.

    Parameters
    ----------
    path
        Directory to check.

    Returns
    -------
    bool
    """
    p = Path(path)
    try:
        if not p.is_dir():
            return False
    except OSError:  # a looping link, an unreadable parent
        return False
    return any(is_file(p / m) for m in _ZARR_MARKERS)


class ZarrPlane:
    """One channel of one level of a zarr array, as a lazy 2-D array.

    Parameters
    ----------
    array
        The N-D zarr array of one level.
    y_axis, x_axis
        Indices of the spatial axes.
    index
        Integer index for every other axis (the channel, and 0 for singleton t/z).
    path
        The store, for messages.
    level
        The level's index in the slide's pyramid, for messages.
    """

    ndim = 2

    def __init__(
        self,
        array: Any,
        y_axis: int,
        x_axis: int,
        index: dict[int, int],
        path: str = "",
        level: int = 0,
    ) -> None:
        self.array = array
        self.y_axis = y_axis
        self.x_axis = x_axis
        self.index = dict(index)
        self.path = str(path)
        self.level = int(level)
        self.shape = (int(array.shape[y_axis]), int(array.shape[x_axis]))
        self.dtype = np.dtype(array.dtype)
        chunks = array.chunks
        self.chunk = (int(chunks[y_axis]), int(chunks[x_axis]))
        self.chunk_bytes = math.prod(int(c) for c in chunks) * self.dtype.itemsize
        self.kind = "tiled"

    def __repr__(self) -> str:
        return f"ZarrPlane({self.array!r}, shape={self.shape}, index={self.index})"

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key))
        full: list[Any] = []
        for axis in range(len(self.array.shape)):
            if axis == self.y_axis:
                full.append(key[0])
            elif axis == self.x_axis:
                full.append(key[1])
            else:
                full.append(self.index.get(axis, 0))
        try:
            out = np.asarray(self.array[tuple(full)])
        except IndexError:
            raise
        except Exception as exc:  # a codec error, a damaged or unreadable chunk file
            raise MosaicError(self.path or None, self._read_problem(key, exc)) from exc
        if self.y_axis > self.x_axis and out.ndim == 2:
            out = out.T  # (X, Y) storage order: present it as (Y, X)
        return out

    def _read_problem(self, key: tuple[Any, ...], exc: Exception) -> str:
        where = []
        for name, k, n in zip(("rows", "cols"), key, self.shape, strict=False):
            if isinstance(k, slice):
                a, b, _ = k.indices(n)
                where.append(f"{name} {a}:{b}")
            else:
                where.append(f"{name} {int(k)}")
        cause = os_problem(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        return (
            f"array {self.array.path!r} (level {self.level}), {', '.join(where)} cannot be "
            f"read ({cause}); a chunk of the store is damaged"
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:, :]
        return arr if dtype is None else arr.astype(dtype)


@dataclass
class ZarrImage(StoredImage):
    """Metadata and lazy planes of an OME-Zarr image.

    A :class:`~napari_confocal_stain.io.pyramid.StoredImage` whose ``axes`` are the axis
    names in storage order (e.g. ``"cyx"``) and ``channel_names`` the ``omero`` labels, plus:

    Attributes
    ----------
    version
        NGFF version string (``""`` for a bare array).
    """

    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _axes_of(ms: dict[str, Any], ndim: int) -> tuple[list[str], list[str | None], list[str]]:
    """Names, units and types of the axes (NGFF 0.4+ dicts, 0.3 strings, older: tczyx)."""
    axes = ms.get("axes")
    if axes is None:
        names = list("tczyx"[-ndim:]) if ndim <= 5 else [f"d{i}" for i in range(ndim)]
        return names, [None] * ndim, ["" for _ in names]
    names, units, types = [], [], []
    for ax in axes:
        if isinstance(ax, str):
            names.append(ax.lower())
            units.append(None)
            types.append("")
        else:
            names.append(str(ax.get("name", "")).lower())
            units.append(ax.get("unit"))
            types.append(str(ax.get("type", "")).lower())
    return names, units, types


def _scale_of(transforms: Any, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", ())) == ndim:
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    return scale


class _BadMetadata(ValueError):
    """OME-NGFF metadata of the wrong structure (said in words)."""


def _find_multiscales(node: Any) -> tuple[Any, dict[str, Any] | None, dict[str, Any], str]:
    """Return ``(group, multiscale dict, ome attrs, version)`` of the first image found."""
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs) if isinstance(attrs.get("ome"), dict) else attrs
    ms = ome.get("multiscales")
    if ms is not None and not (isinstance(ms, list) and ms and isinstance(ms[0], dict)):
        raise _BadMetadata("'multiscales' is not a list of objects")
    if ms:
        version = str(ome.get("version") or ms[0].get("version") or "")
        return node, ms[0], ome, version
    if "bioformats2raw.layout" in ome or "bioformats2raw.layout" in attrs:
        try:
            child = node["0"]
        except KeyError:
            child = None
        if child is not None and isinstance(child, zarr.Group):
            return _find_multiscales(child)
    return node, None, ome, ""


def _plausible(um: float) -> bool:
    return math.isfinite(um) and _PIXEL_SIZE_RANGE_UM[0] <= um <= _PIXEL_SIZE_RANGE_UM[1]


def _bare_array_image(path: str, arr: Any) -> ZarrImage:
    shape = tuple(int(n) for n in arr.shape)
    if len(shape) == 2:
        c_axis, y_axis, x_axis = None, 0, 1
    elif len(shape) == 3:
        # The channel axis is the short one: first (C, Y, X) or last (Y, X, C).
        c_axis = 0 if shape[0] <= shape[2] else 2
        y_axis, x_axis = (1, 2) if c_axis == 0 else (0, 1)
    else:
        raise MosaicError(path, f"is a zarr array of shape {shape}; expected (C, Y, X)")
    n = shape[c_axis] if c_axis is not None else 1
    planes = [
        ZarrPlane(arr, y_axis, x_axis, {} if c_axis is None else {c_axis: c}, path)
        for c in range(n)
    ]
    axes = "".join(
        "yx"[[y_axis, x_axis].index(i)] if i != c_axis else "c" for i in range(len(shape))
    )
    return ZarrImage(
        path=path,
        levels=[planes],
        channel_names=[None] * n,
        dtype=np.dtype(arr.dtype),
        pixel_size_um=None,
        pixel_size_source="bare zarr array (no NGFF metadata)",
        axes=axes,
        version="",
    )


def open_omezarr(path: str | Path) -> ZarrImage:
    """Read the metadata of an OME-Zarr image and return lazy planes per channel and level.

    Parameters
    ----------
    path
        The ``.zarr`` directory (the image group, or a bioformats2raw container).

    Returns
    -------
    ZarrImage

    Raises
    ------
    MosaicError
        If it is not zarr, has no multiscales, or has several non-spatial dimensions.
    """
    path = str(path)
    check_folder(path)
    try:
        node = zarr.open(path, mode="r")
    except OSError as exc:
        raise MosaicError(path, os_problem(exc)) from exc
    except Exception as exc:
        raise MosaicError(
            path, f"cannot be opened as zarr ({type(exc).__name__}: {exc}); bad metadata?"
        ) from exc
    try:
        return _image_of(path, node)
    except MosaicError:
        raise
    except OSError as exc:
        raise MosaicError(path, os_problem(exc)) from exc
    except _BadMetadata as exc:
        raise MosaicError(path, f"has invalid OME-NGFF metadata: {exc}") from exc
    except Exception as exc:  # malformed JSON structure: wrong types, missing keys
        raise MosaicError(
            path, f"has invalid OME-NGFF metadata ({type(exc).__name__}: {exc})"
        ) from exc


def _dataset_problem(path: str, group: Any, name: Any) -> str:
    """Why a dataset listed in the multiscales cannot be opened: missing, a file, or bad."""
    where = Path(path, str(group.path or ""), str(name))
    if is_file(where):
        return f"lists the dataset {name!r}, which is a file, not a zarr array"
    try:
        zarr.open_array(str(where), mode="r")
    except FileNotFoundError:
        return f"lacks the dataset {name!r} it lists"
    except Exception as exc:
        return f"lists the dataset {name!r}, whose zarr metadata is invalid ({exc})"
    return f"lacks the dataset {name!r} it lists"


def _image_of(path: str, node: Any) -> ZarrImage:
    if isinstance(node, zarr.Array):
        return _bare_array_image(path, node)
    group, ms, ome, version = _find_multiscales(node)
    if ms is None:
        raise MosaicError(path, "is a zarr group without OME-NGFF 'multiscales' metadata")
    datasets = ms.get("datasets") or []
    if not datasets:
        raise MosaicError(path, "has OME-NGFF multiscales without datasets")
    arrays = [_dataset_array(path, group, ds) for ds in datasets]
    ndim = len(arrays[0].shape)
    names, units, types = _axes_of(ms, ndim)
    y_axis, x_axis, c_axis = _image_axes(path, names, types, tuple(arrays[0].shape))
    n = int(arrays[0].shape[c_axis]) if c_axis is not None else 1
    levels: list[list[ZarrPlane]] = []
    previous = None
    for arr in arrays:
        shape = (int(arr.shape[y_axis]), int(arr.shape[x_axis]))
        if previous is not None and not (shape[0] < previous[0] and shape[1] < previous[1]):
            break
        if c_axis is not None and int(arr.shape[c_axis]) != n:
            break
        channel = [{} if c_axis is None else {c_axis: c} for c in range(n)]
        levels.append([ZarrPlane(arr, y_axis, x_axis, ch, path, len(levels)) for ch in channel])
        previous = shape
    scale = _scale_of(datasets[0].get("coordinateTransformations"), ndim)
    global_scale = _scale_of(ms.get("coordinateTransformations"), ndim)
    pixel_size, pixel_source = _pixel_size(scale[x_axis] * global_scale[x_axis], units[x_axis])
    labels: list[str | None] = [None] * n
    omero = ome.get("omero") or dict(group.attrs).get("omero")
    if isinstance(omero, dict):
        chans = omero.get("channels") or []
        if len(chans) == n:
            labels = [c.get("label") if isinstance(c, dict) else None for c in chans]
    return ZarrImage(
        path=path,
        levels=levels,
        channel_names=labels,
        dtype=np.dtype(arrays[0].dtype),
        pixel_size_um=pixel_size,
        pixel_size_source=pixel_source,
        axes="".join(n[:1] for n in names),
        version=version,
        extra={"group": str(group.path or "")},
    )


def _dataset_array(path: str, group: Any, ds: Any) -> Any:
    """The zarr array a multiscales dataset entry names."""
    if not isinstance(ds, dict) or "path" not in ds:
        raise _BadMetadata(f"a dataset has no 'path': {ds!r}")
    try:
        arr = group[str(ds["path"])]
    except (KeyError, TypeError) as exc:
        raise MosaicError(path, _dataset_problem(path, group, ds["path"])) from exc
    if not isinstance(arr, zarr.Array):
        raise MosaicError(path, f"lists the dataset {ds['path']!r}, which is not an array")
    return arr


def _image_axes(
    path: str, names: list[str], types: list[str | None], shape0: tuple[int, ...]
) -> tuple[int, int, int | None]:
    """Indices of the y, x and channel (or None) axes; other axes must have length 1."""
    ndim = len(shape0)
    if len(names) != ndim:
        raise MosaicError(path, f"lists {len(names)} axes for {ndim}-D arrays")
    pairs = list(zip(names, types, strict=True))
    space = [i for i, (n, t) in enumerate(pairs) if t == "space" or n in "zyx"]
    if "y" in names and "x" in names:
        y_axis, x_axis = names.index("y"), names.index("x")
    elif len(space) >= 2:
        y_axis, x_axis = space[-2], space[-1]
    else:
        raise MosaicError(path, f"has no two spatial axes (axes {names})")
    c_axis = next((i for i, (n, t) in enumerate(pairs) if t == "channel" or n == "c"), None)
    others = [i for i in range(ndim) if i not in (y_axis, x_axis, c_axis) and shape0[i] > 1]
    if others:
        dims = ", ".join(f"{names[i]}={shape0[i]}" for i in others)
        raise MosaicError(
            path, f"has extra non-spatial dimensions ({dims}); expected a 2-D image with channels"
        )
    return y_axis, x_axis, c_axis


def _pixel_size(sx: float, unit: str | None) -> tuple[float | None, str]:
    """Pixel size in µm from an NGFF x scale and its axis unit, and where it came from."""
    if unit is None:
        if sx != 1.0 and _plausible(sx):
            return sx, "NGFF scale (no unit given: taken as µm)"
        return None, "NGFF scale has no unit"
    factor = unit_to_um(unit)
    if factor is None:
        return None, f"NGFF axis unit {unit!r} unknown"
    if _plausible(sx * factor):
        return sx * factor, "NGFF coordinateTransformations scale"
    return None, f"NGFF scale {sx} {unit} ignored (implausible)"
