"""npe2 reader: confocal mosaics (Vivascope folders, R/F TIFF pairs, 2-channel TIFF/OME-Zarr).

``get_reader`` only *claims* a path after a cheap look (folder names, a TIFF header),
so ordinary images still go to napari's own reader. Errors while opening a claimed
slide become one napari notification instead of a traceback dialog.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_confocal_stain.errors import ConfocalStainError

_PAIR = re.compile(r"^(?P<stem>.*)_(?P<mode>[RF])\.tiff?$", re.IGNORECASE)


def _pair_partner(path: Path) -> Path | None:
    m = _PAIR.match(path.name)
    if not m:
        return None
    other = "F" if m["mode"].upper() == "R" else "R"
    for cand in path.parent.glob(f"{m['stem']}_*"):
        mm = _PAIR.match(cand.name)
        if mm and mm["stem"] == m["stem"] and mm["mode"].upper() == other:
            return cand
    return None


def _is_two_channel_tiff(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
    except Exception:
        return False  # not ours to judge: napari's own reader will report it
    if "C" in axes:
        return shape[axes.index("C")] == 2
    return len(shape) == 3 and 2 in (shape[0], shape[-1])


def _claims(path: Path) -> bool:
    if path.is_dir():
        if path.suffix.lower() == ".zarr":
            return True
        if (path / "DET#1").exists() or (path / "DET#2").exists():
            return True
        if any(_PAIR.match(p.name) for p in path.iterdir()):
            return True
        # A folder of several Vivascope mosaics: claim it so the user is told to pick one.
        return any((p / "DET#1").exists() for p in path.iterdir() if p.is_dir())
    if path.suffix.lower() in (".tif", ".tiff"):
        return _pair_partner(path) is not None or _is_two_channel_tiff(path)
    return False


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list] | None:
    """Return a reader function if ``path`` looks like a confocal R/F mosaic.

    Parameters
    ----------
    path
        One path, or two TIFF paths (R and F) selected together.

    Returns
    -------
    callable or None
        ``None`` lets napari try its other readers.
    """
    if isinstance(path, (list, tuple)):
        if len(path) == 2 and all(str(p).lower().endswith((".tif", ".tiff")) for p in path):
            return read_mosaic
        return None
    p = Path(path)
    try:
        if _export_attrs(p) is not None:
            return read_export
        claimed = _claims(p)
    except OSError:
        return None
    return read_mosaic if claimed else None


def _export_attrs(path: Path) -> dict | None:
    """The NGFF attributes of an OME-Zarr this plugin exported (a stain), else None."""
    import json

    attrs = path / ".zattrs"
    if path.suffix.lower() != ".zarr" or not attrs.is_file():
        return None
    try:
        meta = json.loads(attrs.read_text())
    except (OSError, ValueError):
        return None
    return meta if "napari_confocal_stain" in meta and "multiscales" in meta else None


def read_export(path: str) -> list:
    """Open an exported stain (``confocal-stain stain … --out X.ome.zarr``) as one layer.

    The export stores ``(c, y, x)`` levels (NGFF wants channels first); napari gets lazy
    ``(y, x, c)`` views, RGB when there are three channels, in µm.
    """
    import dask.array as da

    p = Path(path)
    meta = _export_attrs(p)
    if meta is None:
        return []
    ms = meta["multiscales"][0]
    levels, scale = [], None
    for ds in ms["datasets"]:
        arr = da.from_zarr(str(p / ds["path"]))
        levels.append(arr.transpose(1, 2, 0) if arr.shape[0] in (1, 3) else arr)
        if scale is None:
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = tuple(float(v) for v in t["scale"][-2:])
    rgb = levels[0].shape[-1] == 3
    if not rgb:
        levels = [lvl[..., 0] for lvl in levels]
    name = ms.get("name") or p.name.removesuffix(".ome.zarr").removesuffix(".zarr")
    kwargs = {
        "name": name,
        "multiscale": True,
        "rgb": rgb,
        "contrast_limits": (0, 255),
        "metadata": {"export": meta["napari_confocal_stain"]},
    }
    if scale is not None:
        kwargs.update(scale=scale, units=("um", "um"))
    return [(levels, kwargs, "image")]


def _open(path: str | Sequence[str]):
    from napari_confocal_stain.io.readers import open_mosaic

    if isinstance(path, (list, tuple)):
        first, second = (Path(p) for p in path)
        # Order the pair by the _R/_F suffix when the names carry it.
        m = _PAIR.match(first.name)
        if m and m["mode"].upper() == "F":
            first, second = second, first
        return open_mosaic(first, f_path=second)
    p = Path(path)
    if p.is_file():
        partner = _pair_partner(p)
        if partner is not None:
            m = _PAIR.match(p.name)
            r, f = (p, partner) if m["mode"].upper() == "R" else (partner, p)
            return open_mosaic(r, f_path=f)
    return open_mosaic(p)


def read_mosaic(path: str | Sequence[str]) -> list:
    """Open a mosaic and return its R and F layers (a notification on bad input).

    Parameters
    ----------
    path
        As accepted by :func:`get_reader`.

    Returns
    -------
    list of layer-data tuples
        Empty if the slide could not be opened; the reason is shown as a
        notification naming the file.
    """
    from napari.utils.notifications import show_error

    from napari_confocal_stain.napari._layers import mosaic_layer_data

    try:
        mosaic = _open(path)
    except ConfocalStainError as exc:
        show_error(f"Could not open confocal slide: {exc}")
        return []
    return mosaic_layer_data(mosaic)
