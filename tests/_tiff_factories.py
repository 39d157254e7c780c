"""Writers of small real test slides (pyvips, tifffile, zarr) for the reader tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyvips
import tifffile
import zarr


def image(shape: tuple[int, ...], dtype: Any = np.uint8, seed: int = 0) -> np.ndarray:
    """Random image with a smooth ramp, spanning a good part of the dtype's range."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    h, w = shape[-2], shape[-1]
    ramp = (np.arange(h)[:, None] / max(1, h - 1) + np.arange(w)[None, :] / max(1, w - 1)) / 2
    base = 0.6 * ramp + 0.4 * rng.random(shape)
    if dt.kind == "f":
        return base.astype(dt)
    top = np.iinfo(dt).max
    return (base * top).astype(dt)


def write_pyvips(
    path: str | Path,
    arr: np.ndarray,
    *,
    tiled: bool = True,
    pyramid: bool = False,
    subifd: bool = False,
    compression: str = "none",
    tile_size: int = 256,
    pixel_size_um: float | None = None,
) -> Path:
    """Write a (Y, X) or (Y, X, bands) array with pyvips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = pyvips.Image.new_from_array(np.ascontiguousarray(arr))
    kw: dict[str, Any] = {"compression": compression}
    if tiled:
        kw.update(tile=True, tile_width=tile_size, tile_height=tile_size)
    if pyramid:
        kw.update(pyramid=True, subifd=subifd)
    if pixel_size_um is not None:
        # pyvips takes pixels per millimetre.
        kw.update(xres=1000.0 / pixel_size_um, yres=1000.0 / pixel_size_um)
    img.tiffsave(str(path), **kw)
    return path


def write_tiff(path: str | Path, arr: np.ndarray, **kwargs: Any) -> Path:
    """Write with ``tifffile.imwrite``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, **kwargs)
    return path


def write_tiff_pyramid(
    path: str | Path, levels: list[np.ndarray], *, tile: tuple[int, int] = (256, 256), **kw: Any
) -> Path:
    """Write level 0 with its reduced levels as SubIFDs (tifffile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=tile, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, tile=tile)
    return path


def write_vivascope(folder: str | Path, r: np.ndarray, f: np.ndarray, **pyvips_kw: Any) -> Path:
    """A Vivascope mosaic folder: DET#1/highres_raw.tif (R) and DET#2/highres_raw.tif (F)."""
    folder = Path(folder)
    write_pyvips(folder / "DET#1" / "highres_raw.tif", r, **pyvips_kw)
    write_pyvips(folder / "DET#2" / "highres_raw.tif", f, **pyvips_kw)
    return folder


def write_omezarr(
    path: str | Path,
    data: np.ndarray,
    *,
    version: str = "0.4",
    labels: list[str] | None = None,
    pixel_size_um: float | None = 0.5,
    unit: str | None = "micrometer",
    n_levels: int = 2,
    chunks: int = 256,
) -> Path:
    """A (C, Y, X) OME-Zarr image with ``n_levels`` levels (2x2 means), NGFF 0.4 or 0.5."""
    path = Path(path)
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    level = data
    datasets = []
    scale = pixel_size_um if pixel_size_um is not None else 1.0
    for k in range(n_levels):
        arr = group.create_array(
            str(k), shape=level.shape, chunks=(1, chunks, chunks), dtype=level.dtype
        )
        arr[...] = level
        s = scale * 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, s, s]}],
            }
        )
        c, h, w = level.shape
        level = (
            level[:, : h // 2 * 2, : w // 2 * 2]
            .reshape(c, h // 2, 2, w // 2, 2)
            .mean(axis=(2, 4))
            .astype(data.dtype)
        )
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}]
    for name in "yx":
        ax: dict[str, Any] = {"name": name, "type": "space"}
        if unit is not None:
            ax["unit"] = unit
        axes.append(ax)
    multiscale = {"name": path.stem, "axes": axes, "datasets": datasets}
    omero = {"channels": [{"label": lb} for lb in labels]} if labels else None
    if version == "0.5":
        ome: dict[str, Any] = {"version": "0.5", "multiscales": [multiscale]}
        if omero:
            ome["omero"] = omero
        group.attrs["ome"] = ome
    else:
        multiscale["version"] = "0.4"
        group.attrs["multiscales"] = [multiscale]
        if omero:
            group.attrs["omero"] = omero
    return path


def tree_snapshot(root: str | Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything under ``root``."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def rchar() -> int:
    """Bytes this process has read through read()-like system calls (Linux /proc)."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")
