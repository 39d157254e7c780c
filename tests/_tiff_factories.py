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


def write_declared_tiff(
    path: str | Path,
    shape: tuple[int, int],
    *,
    dtype: Any = np.uint8,
    samples: int = 1,
    tile: tuple[int, int] = (512, 512),
    fill: float = 0,
    tiles: dict[int, np.ndarray | bytes] | None = None,
    compress: bool = True,
    tile_bytes: bytes | None = None,
) -> Path:
    """A tiled TIFF declaring ``shape`` px that costs little disk: tiles share their bytes.

    Every tile's offset points at one encoded tile of ``fill`` (deflate, or raw), so a
    200000² image takes a few MB (its tile tables). ``tiles`` gives other contents for
    some tile indices (row-major), e.g. a tile holding NaN, or bytes stored as they are
    (garbage for a corrupt tile); ``tile_bytes`` replaces the shared tile's bytes (so a
    huge tile need not be encoded). ``samples`` > 1 stores that
    many interleaved channels per pixel. Written by hand (classic TIFF, little-endian):
    tifffile writes every tile it declares.
    """
    import struct
    import zlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dt = np.dtype(dtype).newbyteorder("<")
    h, w = (int(v) for v in shape)
    th, tw = tile
    n_tiles = -(-h // th) * -(-w // tw)

    def encode(block: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(block, dtype=dt).tobytes()
        return zlib.compress(raw, 6) if compress else raw

    default = (
        tile_bytes if tile_bytes is not None else encode(np.full((th, tw, samples), fill, dt))
    )
    extra = {
        int(i): t
        if isinstance(t, bytes)
        else encode(np.broadcast_to(t.reshape(th, tw, -1), (th, tw, samples)))
        for i, t in (tiles or {}).items()
    }
    sample_format = {"u": 1, "i": 2, "f": 3, "b": 1, "c": 6}[dt.kind]
    entries: list[tuple[int, int, int, bytes]] = []  # tag, type, count, value bytes

    def short(tag: int, *values: int) -> None:
        entries.append((tag, 3, len(values), struct.pack(f"<{len(values)}H", *values)))

    def long(tag: int, values: Any) -> None:
        arr = np.asarray(values, "<u4")
        entries.append((tag, 4, arr.size, arr.tobytes()))

    long(256, [w])
    long(257, [h])
    short(258, *([dt.itemsize * 8] * samples))
    short(259, 8 if compress else 1)
    short(262, 1)
    short(277, samples)
    short(284, 1)
    long(322, [tw])
    long(323, [th])
    # Offsets and byte counts are filled in once the layout is known.
    long(324, np.zeros(n_tiles))
    long(325, np.zeros(n_tiles))
    if samples > 1:
        short(338, *([0] * (samples - 1)))
    short(339, *([sample_format] * samples))
    entries.sort(key=lambda e: e[0])

    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    cursor = ifd_offset + ifd_size
    value_at: dict[int, int] = {}
    for tag, _typ, _count, value in entries:
        if len(value) > 4:
            value_at[tag] = cursor
            cursor += len(value) + (len(value) & 1)
    data_start = cursor
    offsets = np.full(n_tiles, data_start, "<u4")
    counts = np.full(n_tiles, len(default), "<u4")
    blobs = [default]
    pos = data_start + len(default)
    for i, blob in sorted(extra.items()):
        offsets[i], counts[i] = pos, len(blob)
        blobs.append(blob)
        pos += len(blob)
    if pos >= 1 << 32:
        raise ValueError("declared TIFF too large for a classic TIFF")
    entries = [
        (tag, typ, count, offsets.tobytes() if tag == 324 else counts.tobytes())
        if tag in (324, 325)
        else (tag, typ, count, value)
        for tag, typ, count, value in entries
    ]
    with open(path, "wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd_offset))
        fh.write(struct.pack("<H", len(entries)))
        for tag, typ, count, value in entries:
            field = struct.pack("<I", value_at[tag]) if tag in value_at else value.ljust(4, b"\0")
            fh.write(struct.pack("<HHI", tag, typ, count) + field)
        fh.write(struct.pack("<I", 0))
        for tag, _typ, _count, value in entries:
            if tag in value_at:
                assert fh.tell() == value_at[tag]
                fh.write(value + b"\0" * (len(value) & 1))
        assert fh.tell() == data_start
        for blob in blobs:
            fh.write(blob)
    return path


def write_declared_zarr(
    path: str | Path,
    shape: tuple[int, int],
    *,
    channels: int = 2,
    n_levels: int = 2,
    chunks: int = 1024,
    dtype: Any = np.uint8,
    version: str = "0.4",
) -> Path:
    """An OME-Zarr declaring ``(channels, *shape)`` px at level 0 with no chunk written.

    Every level (each half the one above) reads as the fill value (0) everywhere;
    the store holds only metadata.
    """
    path = Path(path)
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    h, w = shape
    datasets = []
    for k in range(n_levels):
        group.create_array(
            str(k),
            shape=(channels, max(1, h >> k), max(1, w >> k)),
            chunks=(1, chunks, chunks),
            dtype=dtype,
            fill_value=0,
        )
        s = 0.5 * 2**k
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, s, s]}]}
        )
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "yx"
    ]
    multiscale = {"name": path.stem, "axes": axes, "datasets": datasets}
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        multiscale["version"] = "0.4"
        group.attrs["multiscales"] = [multiscale]
    return path
