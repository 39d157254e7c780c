"""npe2 reader: confocal mosaics (Vivascope folders, R/F TIFF pairs, 2-channel TIFF/OME-Zarr).

``get_reader`` only *claims* a path after a cheap look (names by the rules of
:mod:`napari_confocal_stain.io.naming`, a TIFF header), so ordinary images still go to
napari's own reader. Neither it nor the reader it returns ever raises: whatever goes wrong
while opening a claimed slide becomes one error notification naming the file, and no layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_confocal_stain.io.naming import RAW_NAMES, detector_number, rf_pair, rf_role
from napari_confocal_stain.io.paths import is_dir

_TIFF = (".tif", ".tiff")


def _is_two_channel_tiff(path: Path) -> bool:
    from napari_confocal_stain.errors import ConfocalStainError
    from napari_confocal_stain.io.tiff import open_tiff

    try:
        return open_tiff(path).n_channels == 2  # headers only
    except ConfocalStainError:
        return False  # not ours to judge: napari's own reader will report it


def _unreadable(path: Path) -> bool:
    """A looping or broken link, or a file this process may not read."""
    from napari_confocal_stain.errors import ConfocalStainError
    from napari_confocal_stain.io.paths import check_file

    try:
        check_file(path)
    except ConfocalStainError:
        return not is_dir(path)
    return False


def _has_detectors(folder: Path) -> bool:
    return any(detector_number(e.name) is not None and is_dir(e) for e in os.scandir(folder))


def _claims(path: Path) -> bool:
    """Whether ``path`` is a slide this plugin opens (a cheap look: names, a TIFF header)."""
    if is_dir(path):
        if path.suffix.lower() == ".zarr" or _has_detectors(path):
            return True
        for entry in os.scandir(path):
            if rf_role(entry.name) is not None:
                return True
            # A folder of several Vivascope mosaics: claim it so the user is told to pick one.
            if not entry.name.startswith(".") and is_dir(entry) and _has_detectors(Path(entry)):
                return True
        return False
    if _looks_like_ours(path) and _unreadable(path):
        return True  # say why it cannot be read (napari's own reader would only fail)
    if not path.name.lower().endswith(_TIFF):
        return False
    if path.name.lower() in RAW_NAMES and detector_number(path.parent.name) is not None:
        return True
    return rf_pair(path) is not None or _is_two_channel_tiff(path)


def _looks_like_ours(path: Path) -> bool:
    """From the name alone: could this be a slide (when looking inside it failed)?"""
    name = path.name.lower()
    return name.endswith((*_TIFF, ".zarr")) or rf_role(path.name) is not None


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list] | None:
    """Return a reader function if ``path`` looks like a confocal R/F mosaic.

    Never raises: a path that cannot even be looked at (a symbolic link loop, no
    permission) is claimed when its name looks like a slide's, so that the reader
    says what is wrong in a notification; otherwise it is left to napari.

    Parameters
    ----------
    path
        One path, or two TIFF paths (R and F) selected together.

    Returns
    -------
    callable or None
        ``None`` lets napari try its other readers.
    """
    try:
        if isinstance(path, (list, tuple)):
            if len(path) == 2 and all(str(p).lower().endswith(_TIFF) for p in path):
                return _napari_read_mosaic
            return None
        p = Path(path)
        if _export_attrs(p) is not None:
            return _napari_read_export
        return _napari_read_mosaic if _claims(p) else None
    except Exception:  # the look inside failed: let the reader say why, if it may be ours
        try:
            p = Path(str(path))
            return _napari_read_mosaic if _looks_like_ours(p) or is_dir(p) else None
        except Exception:
            return None


# napari raises "returned no data" for an empty list (a second message after ours); its
# sentinel [(None,)] says the path was read and holds nothing to show.
def _napari_read_mosaic(path: str | Sequence[str]) -> list:
    return read_mosaic(path) or [(None,)]


def _napari_read_export(path: str) -> list:
    return read_export(path) or [(None,)]


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
    ``(y, x, c)`` views, RGB when there are three channels, in µm. Never raises: a
    damaged export gives one error notification and no layer.
    """
    from napari.utils.notifications import show_error

    try:
        return _export_layers(path)
    except Exception as exc:
        show_error(f"Could not open exported stain {path}: {type(exc).__name__}: {exc}")
        return []


def _export_layers(path: str) -> list:
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
        if (rf_role(first.name) or ("",))[0] == "F" or (rf_role(second.name) or ("",))[0] == "R":
            first, second = second, first
        return open_mosaic(first, f_path=second)
    return open_mosaic(Path(path))


def _shown(path: str | Sequence[str]) -> str:
    return " + ".join(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)


def read_mosaic(path: str | Sequence[str]) -> list:
    """Open a mosaic and return its R and F layers (a notification on bad input).

    Never raises: whatever goes wrong becomes one error notification naming the file,
    and no layer.

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

    from napari_confocal_stain.errors import ConfocalStainError
    from napari_confocal_stain.napari._layers import mosaic_layer_data

    try:
        return mosaic_layer_data(_open(path))
    except ConfocalStainError as exc:
        show_error(f"Could not open confocal slide: {exc}")
    except MemoryError:
        show_error(f"Could not open confocal slide {_shown(path)}: out of memory")
    except Exception as exc:  # a bug or a failure nobody foresaw: still one message
        show_error(f"Could not open confocal slide {_shown(path)}: {type(exc).__name__}: {exc}")
    return []
