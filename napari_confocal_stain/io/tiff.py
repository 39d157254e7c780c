"""Lazy, tile-granular access to the channels and pyramid levels of a TIFF file.

:func:`open_tiff` reads only the TIFF headers (IFDs, tile/strip offset tables, OME or
ImageJ metadata) and returns one :class:`TiffPlane` per channel and per pyramid level.
A ``TiffPlane`` is a 2-D numpy-like array: slicing it reads and decodes only the tiles
or strips under the slice, with positional reads (``os.pread``) so dask threads never
wait on a shared file position. Planes pickle as the file path, so dask graphs built
on them can be shipped to other processes.

How a region is read depends on how the file stores its pixels:

``tiled``
    Only the tiles intersecting the region (adjacent tiles in one read).
``contiguous``
    Uncompressed strips stored back to back (what most writers, and presumably the
    Vivascope, produce for raw data): pixel rows are addressed directly, so a region
    costs its own bytes, one read per row (or one read for wide regions), however
    large the strips are.
``strips``
    Compressed strips: a strip spans the full image width and must be decoded as a
    whole, so a region costs ``rows × full width`` of decoding. This is inherent to
    the format; a compressed single-strip file is decoded completely for any region.

The same machinery is used whatever the pyramid flavour: tifffile series levels
(OME-TIFF SubIFDs, SVS, ...), generic SubIFD pyramids, and pyvips pyramids (reduced
pages in the main IFD chain), which tifffile groups into ``series.levels``.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io.paths import check_file, os_problem, read_head
from napari_confocal_stain.io.pyramid import StoredImage

__all__ = [
    "TIFF_MAGIC",
    "TIFF_SUFFIXES",
    "TiffImage",
    "TiffPlane",
    "is_tiff",
    "open_tiff",
    "tiff_pixel_size_um",
    "tiff_structure_problem",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2", ".svs", ".ndpi", ".scn", ".qptiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""The first four bytes of a TIFF (little- and big-endian) or BigTIFF file."""

# Plausible pixel sizes of a microscope image. Values outside are writer defaults
# (pyvips: 1 px/mm = 1000 µm, 72 dpi = 353 µm), not measurements.
_PIXEL_SIZE_RANGE_UM = (0.005, 20.0)
# Round dpi values written by imaging software that knows no physical size.
_DEFAULT_DPI = {72, 96, 150, 200, 300, 600, 1200, 2400, 4800}
# Merge adjacent tiles into one read up to this many bytes.
_MAX_MERGED_READ = 32 << 20


def is_tiff(path: str | Path) -> bool:
    """Return whether ``path`` is a file that starts with a TIFF or BigTIFF signature.

    Parameters
    ----------
    path
        File to check (only its first 4 bytes are read).

    Returns
    -------
    bool
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGIC
    except OSError:
        return False


# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ... IFD8).
_TYPE_SIZES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
    16: 8, 17: 8, 18: 8,
}  # fmt: skip
# Image directories checked before handing the file to tifffile; files with more (long
# stacks) are checked that far only.
_MAX_CHECKED_IFDS = 4096


def tiff_structure_problem(path: str | Path, size: int | None = None) -> str | None:
    """Check a TIFF's chain of image directories (IFDs) against the file's length.

    A truncated file keeps its header but loses what lies past the cut: directories,
    tag values (tile tables) or pixel data. This walks the directory chain and the
    out-of-line tag values it points to, reading a few bytes per directory.

    Parameters
    ----------
    path
        A file that starts with a TIFF signature.
    size
        Its size in bytes (looked up if not given).

    Returns
    -------
    str or None
        What is wrong (``"is truncated: ..."``, ``"is corrupt: ..."``), or ``None``.
    """
    size = os.path.getsize(path) if size is None else size
    try:
        with open(path, "rb") as fh:
            return _walk_ifds(fh, size)
    except OSError as exc:
        return os_problem(exc)


def _walk_ifds(fh: Any, size: int) -> str | None:
    head = fh.read(16)
    bo = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    if big:
        if len(head) < 16:
            return f"is truncated: its {len(head)} bytes end inside the BigTIFF header"
        cnt_fmt, entry_size, off_fmt = "Q", 20, "Q"
        first = struct.unpack(bo + "Q", head[8:16])[0]
    else:
        if len(head) < 8:
            return f"is truncated: its {len(head)} bytes end inside the TIFF header"
        cnt_fmt, entry_size, off_fmt = "H", 12, "I"
        first = struct.unpack(bo + "I", head[4:8])[0]
    cnt_size, off_size = struct.calcsize(cnt_fmt), struct.calcsize(off_fmt)
    if first == 0:
        return "holds no image (its header points to no image directory)"
    offset, seen = first, set()
    for n in range(_MAX_CHECKED_IFDS):
        if offset == 0:
            return None
        if offset in seen:
            return f"is corrupt: its image directories form a loop (at byte {offset})"
        seen.add(offset)
        if offset + cnt_size > size:
            return (
                f"is truncated: image directory {n} should be at byte {offset}, past the "
                f"end of the file ({size} bytes)"
            )
        fh.seek(offset)
        (count,) = struct.unpack(bo + cnt_fmt, fh.read(cnt_size))
        end = offset + cnt_size + count * entry_size + off_size
        if end > size:
            return (
                f"is truncated: image directory {n} (bytes {offset}-{end}) runs past the "
                f"end of the file ({size} bytes)"
            )
        table = fh.read(count * entry_size + off_size)
        for i in range(count):
            entry = table[i * entry_size : (i + 1) * entry_size]
            tag, typ = struct.unpack(bo + "HH", entry[:4])
            (n_values,) = struct.unpack(bo + off_fmt, entry[4 : 4 + off_size])
            nbytes = n_values * _TYPE_SIZES.get(typ, 0)
            if nbytes > off_size:
                (at,) = struct.unpack(bo + off_fmt, entry[4 + off_size :])
                if at + nbytes > size:
                    return (
                        f"is truncated: tag {tag} of image directory {n} holds {nbytes} "
                        f"bytes at byte {at}, past the end of the file ({size} bytes)"
                    )
        (offset,) = struct.unpack(bo + off_fmt, table[count * entry_size :])
    return None


class _TiffSource:
    """One open TIFF file shared by all its planes: positional reads and decoders.

    Pickles as its path; the file is reopened lazily in the receiving process.
    ``bytes_read`` counts the bytes of pixel data read so far (diagnostics).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._fd: int | None = None
        self._fh: Any = None  # fallback file object where os.pread does not exist
        self._tif: tifffile.TiffFile | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def close(self) -> None:
        """Close the file descriptor and the tifffile handle (reopened on next use)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def tiff(self) -> tifffile.TiffFile:
        """The (lazily opened) tifffile handle, used for headers and decoders only."""
        with self._lock:
            if self._tif is None:
                try:
                    self._tif = tifffile.TiffFile(self.path)
                except OSError as exc:
                    raise MosaicError(self.path, os_problem(exc)) from exc
                except Exception as exc:
                    raise MosaicError(
                        self.path,
                        f"cannot be read as a TIFF file any more ({type(exc).__name__}: "
                        f"{exc}); was it changed after it was opened?",
                    ) from exc
            return self._tif

    def set_tiff(self, tif: tifffile.TiffFile) -> None:
        """Adopt an already open tifffile handle of this file."""
        self._tif = tif

    def _pread(self, size: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            if self._fd is None:
                with self._lock:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
            chunks = []
            got = 0
            while got < size:
                # Linux returns at most ~2 GiB per call; loop until done or EOF.
                part = os.pread(self._fd, min(size - got, 1 << 30), offset + got)
                if not part:
                    break
                chunks.append(part)
                got += len(part)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        with self._lock:  # pragma: no cover - Windows
            if self._fh is None:
                self._fh = open(self.path, "rb")  # kept open for reuse
            self._fh.seek(offset)
            return self._fh.read(size)

    def pread(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes at ``offset``; a short read means the file is truncated."""
        try:
            data = self._pread(size, offset)
        except OSError as exc:
            raise MosaicError(self.path, os_problem(exc)) from exc
        if len(data) != size:
            raise MosaicError(
                self.path,
                f"is truncated: {size} bytes of image data expected at byte {offset}, "
                f"only {len(data)} there",
            )
        with self._count_lock:
            self.bytes_read += size
        return data


@dataclass
class _PlaneSpec:
    """Where one channel of one pyramid level lives in the file (picklable)."""

    shape: tuple[int, int]
    dtype: str  # native-order numpy dtype string of the decoded data
    file_dtype: str  # numpy dtype string in the file's byte order
    kind: str  # "contiguous" | "tiled" | "strips"
    chunk: tuple[int, int]  # tile (or strip) height and width
    offsets: np.ndarray
    bytecounts: np.ndarray
    segments_per_plane: int  # tiles or strips in one separate-sample plane
    tiles_across: int
    sample_plane: int  # separate-sample (planar) index
    sample_contig: int  # index in the interleaved samples of a pixel
    samples_contig: int  # interleaved samples per pixel
    page_ref: tuple[int, int, int]  # series, level and page index (to rebuild the decoder)
    jpegtables: bytes | None = None
    nodata: float = 0
    level: int = 0  # index in the slide's pyramid (for messages)


class TiffPlane:
    """One channel of one pyramid level of a TIFF file, as a lazy 2-D array.

    Supports basic slicing (``plane[y0:y1, x0:x1]``, step 1) and ``np.asarray``; only
    the tiles or strips under the slice are read. Use it as the source of
    ``dask.array.from_array``.

    Attributes
    ----------
    shape, dtype, ndim
        As for a numpy array (dtype in native byte order).
    kind
        ``"tiled"``, ``"strips"`` or ``"contiguous"`` (see the module docstring).
    chunk
        The file's tile (or strip) height and width.
    """

    ndim = 2

    def __init__(self, source: _TiffSource, spec: _PlaneSpec, keyframe: Any = None) -> None:
        self._source = source
        self._spec = spec
        self._decode: Any = None
        self._jpegheader: bytes | None = None
        self._lock = threading.Lock()
        if keyframe is not None and spec.kind != "contiguous":
            # Take the decoder now so the TiffFile (and its Python tuples of tile
            # offsets, ~70 bytes per tile) can be released after opening.
            self._decode = keyframe.decode
            self._jpegheader = keyframe.jpegheader

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self._source, "spec": self._spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["spec"])

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"TiffPlane({self._source.path!r}, shape={s.shape}, dtype={s.dtype}, "
            f"kind={s.kind}, chunk={s.chunk})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self._spec.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._spec.dtype)

    @property
    def kind(self) -> str:
        return self._spec.kind

    @property
    def chunk(self) -> tuple[int, int]:
        return self._spec.chunk

    @property
    def path(self) -> str:
        return self._source.path

    @property
    def chunk_bytes(self) -> int:
        """Bytes one read decodes at least: a tile or strip, all its samples (0 if none)."""
        s = self._spec
        if s.kind == "contiguous":
            return 0
        return s.chunk[0] * s.chunk[1] * s.samples_contig * np.dtype(s.file_dtype).itemsize

    @property
    def bytes_read(self) -> int:
        """Bytes of pixel data read from this plane's file so far (all its planes)."""
        return self._source.bytes_read

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:, :]
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 2 or any(k is Ellipsis for k in key):
            key = tuple(k for k in key if k is not Ellipsis)
        key = key + (slice(None),) * (2 - len(key))
        bounds = []
        squeeze = []
        for axis, (k, n) in enumerate(zip(key, self._spec.shape, strict=True)):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("TiffPlane supports step-1 slices only")
                bounds.append((start, max(start, stop)))
            else:
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis of size {n}")
                bounds.append((i, i + 1))
                squeeze.append(axis)
        (y0, y1), (x0, x1) = bounds
        out = self.read_region(y0, y1, x0, x1)
        return out.squeeze(axis=tuple(squeeze)) if squeeze else out

    def read_region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read rows ``y0:y1`` and columns ``x0:x1`` (clipped to the image) as numpy."""
        h, w = self._spec.shape
        y0, y1 = max(0, y0), min(h, y1)
        x0, x1 = max(0, x0), min(w, x1)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=self._spec.dtype)
        if out.size == 0:
            return out
        if self._spec.nodata:
            out[...] = self._spec.nodata
        try:
            if self._spec.kind == "contiguous":
                self._read_contiguous(out, y0, y1, x0, x1)
            else:
                self._read_segments(out, y0, y1, x0, x1)
        except MosaicError:
            raise
        except Exception as exc:  # a codec or layout surprise means a damaged file
            raise MosaicError(
                self._source.path,
                f"level {self._spec.level}, rows {y0}:{y1}, cols {x0}:{x1} cannot be read "
                f"({type(exc).__name__}: {exc}); the file is corrupt",
            ) from exc
        return out

    # -- contiguous uncompressed data: address rows directly ---------------------------
    def _read_contiguous(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        s = self._spec
        h, w = s.shape
        fdt = np.dtype(s.file_dtype)
        px = fdt.itemsize * s.samples_contig  # bytes per pixel
        base = int(s.offsets[0]) + s.sample_plane * h * w * px
        rows = y1 - y0
        if (x1 - x0) * 4 >= 3 * w or rows == 1:
            # Wide regions: one read of whole rows wastes less than many small reads.
            data = self._source.pread(rows * w * px, base + y0 * w * px)
            arr = np.frombuffer(data, fdt).reshape(rows, w, s.samples_contig)
            out[...] = arr[:, x0:x1, s.sample_contig]
            return
        span = (x1 - x0) * px
        for i, y in enumerate(range(y0, y1)):
            data = self._source.pread(span, base + (y * w + x0) * px)
            out[i] = np.frombuffer(data, fdt).reshape(x1 - x0, s.samples_contig)[
                :, s.sample_contig
            ]

    # -- tiles and compressed strips ------------------------------------------------
    def _decoder(self) -> Any:
        with self._lock:
            if self._decode is None:
                si, li, pi = self._spec.page_ref
                tif = self._source.tiff()
                level = tif.series[si].levels[li]
                page = level.pages[pi]
                keyframe = page.keyframe if page.keyframe is not None else level.keyframe
                self._jpegheader = keyframe.jpegheader
                self._decode = keyframe.decode
            return self._decode

    def _read_segments(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        s = self._spec
        th, tw = s.chunk
        ty0, ty1 = y0 // th, (y1 - 1) // th + 1
        tx0, tx1 = x0 // tw, (x1 - 1) // tw + 1
        base = s.sample_plane * s.segments_per_plane
        wanted = [
            (base + ty * s.tiles_across + tx, ty, tx)
            for ty in range(ty0, ty1)
            for tx in range(tx0, tx1)
        ]
        decode = self._decoder()
        kwargs: dict[str, Any] = {}
        if s.jpegtables is not None:
            kwargs["jpegtables"] = s.jpegtables
        if self._jpegheader is not None:
            kwargs["jpegheader"] = self._jpegheader
        present = [t for t in wanted if s.offsets[t[0]] > 0 and s.bytecounts[t[0]] > 0]
        present.sort(key=lambda t: int(s.offsets[t[0]]))
        # Group segments that follow each other in the file into one read.
        groups: list[list[tuple[int, int, int]]] = []
        for t in present:
            if groups:
                last = groups[-1][-1][0]
                end = int(s.offsets[last]) + int(s.bytecounts[last])
                start0 = int(s.offsets[groups[-1][0][0]])
                if int(s.offsets[t[0]]) == end and end - start0 < _MAX_MERGED_READ:
                    groups[-1].append(t)
                    continue
            groups.append([t])
        for group in groups:
            start = int(s.offsets[group[0][0]])
            last = group[-1][0]
            data = self._source.pread(
                int(s.offsets[last]) + int(s.bytecounts[last]) - start, start
            )
            view = memoryview(data)
            for index, ty, tx in group:
                a = int(s.offsets[index]) - start
                seg = view[a : a + int(s.bytecounts[index])]
                try:
                    decoded = decode(bytes(seg), index, **kwargs)[0]
                    if decoded is None:
                        raise ValueError("the decoder returned no data")
                except Exception as exc:  # any codec error means a damaged file
                    what = "tile" if s.kind == "tiled" else "strip"
                    raise MosaicError(
                        self._source.path,
                        f"{what} {index - base} of level {s.level} (rows {ty * th}:"
                        f"{min((ty + 1) * th, s.shape[0])}, cols {tx * tw}:"
                        f"{min((tx + 1) * tw, s.shape[1])}) cannot be decoded "
                        f"({type(exc).__name__}: {exc}); the file is corrupt",
                    ) from exc
                # decoded: (depth, rows, cols, contiguous samples)
                tile = decoded[0, :, :, s.sample_contig if decoded.shape[-1] > 1 else 0]
                ty_start, tx_start = ty * th, tx * tw
                ya, yb = max(y0, ty_start), min(y1, ty_start + tile.shape[0])
                xa, xb = max(x0, tx_start), min(x1, tx_start + tile.shape[1])
                if ya < yb and xa < xb:
                    out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[
                        ya - ty_start : yb - ty_start, xa - tx_start : xb - tx_start
                    ]


@dataclass
class TiffImage(StoredImage):
    """Headers of a TIFF image: its channels, pyramid levels and physical pixel size.

    A :class:`~napari_confocal_stain.io.pyramid.StoredImage` whose ``axes`` is tifffile's
    axes string of the series (e.g. ``"CYX"``, ``"YXS"``), plus:

    Attributes
    ----------
    storage
        ``"tiled"``, ``"strips"`` or ``"contiguous"`` (level 0).
    compression
        Name of the level-0 compression.
    series_index
        Index of the tifffile series used.
    """

    storage: str = "tiled"
    compression: str = "none"
    series_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _plausible(um: float) -> bool:
    return math.isfinite(um) and _PIXEL_SIZE_RANGE_UM[0] <= um <= _PIXEL_SIZE_RANGE_UM[1]


_UNIT_TO_UM = {
    "um": 1.0,
    "µm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "å": 1e-4,
    "angstrom": 1e-4,
}


def unit_to_um(unit: str | None) -> float | None:
    """Return how many µm one ``unit`` is (``None`` if the unit is unknown)."""
    if unit is None:
        return None
    return _UNIT_TO_UM.get(str(unit).strip().lower().replace("\\u00b5", "µ"))


def _ome_pixels(tif: tifffile.TiffFile, series_index: int) -> dict[str, Any] | None:
    """The OME ``Pixels`` element (as attributes + channel names) of one image."""
    xml = tif.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.endswith("}Image") or el.tag == "Image"]
    if not images:
        return None
    image = images[series_index] if series_index < len(images) else images[0]
    pixels = next((el for el in image if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    info: dict[str, Any] = dict(pixels.attrib)
    info["channel_names"] = [
        el.attrib.get("Name")
        for el in pixels
        if el.tag.endswith("}Channel") or el.tag == "Channel"
    ]
    return info


def tiff_pixel_size_um(
    tif: tifffile.TiffFile, page: Any, series_index: int = 0
) -> tuple[float | None, str]:
    """Level-0 pixel size in µm from OME, ImageJ or TIFF resolution tags.

    Parameters
    ----------
    tif
        The open file.
    page
        Its level-0 page (for the XResolution/ResolutionUnit tags).
    series_index
        Which OME image to look at.

    Returns
    -------
    tuple
        ``(pixel size in µm or None, description of the source)``. Writer defaults
        (1 px/mm from pyvips, round dpi values, unit-less ``(1, 1)``) and implausible
        values (outside 0.005-20 µm) give ``None``.
    """
    ome = _ome_pixels(tif, series_index)
    if ome is not None and ome.get("PhysicalSizeX"):
        factor = unit_to_um(ome.get("PhysicalSizeXUnit", "µm"))
        try:
            value = float(ome["PhysicalSizeX"]) * (factor if factor is not None else math.nan)
        except ValueError:
            value = math.nan
        if _plausible(value):
            return value, "OME PhysicalSizeX"
        return None, f"OME PhysicalSizeX {ome['PhysicalSizeX']} ignored (implausible)"

    try:
        xres = float(page.get_resolution()[0])
        unit = int(page.resolutionunit)
    except Exception:
        return None, "no resolution tags"
    if xres <= 0 or not math.isfinite(xres):
        return None, "no usable resolution"
    ij = tif.imagej_metadata or {}
    if unit == 1:  # RESUNIT.NONE: only ImageJ says what the unit is
        factor = unit_to_um(ij.get("unit")) if ij else None
        if factor is None:
            return None, "resolution has no unit"
        value = factor / xres
        source = f"ImageJ resolution ({ij.get('unit')})"
    elif unit in (2, 3, 4, 5):
        per_unit_um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}[unit]
        if unit == 2 and round(xres, 6) in _DEFAULT_DPI:
            return None, f"resolution {xres:g} dpi ignored (a writer default)"
        value = per_unit_um / xres
        source = "TIFF XResolution/ResolutionUnit"
    else:
        return None, f"unknown ResolutionUnit {unit}"
    # TIFF rationals are often float32 in disguise (0.75 µm -> 0.7499999712): round.
    value = float(f"{value:.6g}")
    if _plausible(value):
        return value, source
    return None, f"resolution {value:g} µm/px ignored (implausible; a writer default?)"


def _channel_layout(level: Any, path: str) -> list[tuple[int, int, int]]:
    """Return ``(page index, separate-sample index, contiguous-sample index)`` per channel."""
    keyframe = level.keyframe
    if keyframe.imagedepth > 1:
        raise MosaicError(
            path, f"holds a 3-D volume (depth {keyframe.imagedepth}), not a 2-D image"
        )
    spp = int(keyframe.samplesperpixel)
    planar = keyframe.planarconfig == 2
    axes, shape = level.axes, level.shape
    extra = [(ax, n) for ax, n in zip(axes, shape, strict=True) if ax not in "YX" and n > 1]
    if len(extra) > 1:
        dims = ", ".join(f"{ax}={n}" for ax, n in extra)
        raise MosaicError(
            path,
            f"has several non-spatial dimensions ({dims}); expected a 2-D image with its "
            "channels along one axis",
        )
    n = extra[0][1] if extra else 1
    pages = level.pages
    if spp == 1 and len(pages) == n:
        return [(c, 0, 0) for c in range(n)]
    if len(pages) == 1 and spp == n:
        return [(0, c, 0) if planar else (0, 0, c) for c in range(n)]
    raise MosaicError(
        path,
        f"has an unsupported layout (axes {axes}, shape {shape}, {len(pages)} pages of "
        f"{spp} samples)",
    )


def _plane_spec(
    level: Any, page_index: int, sample_plane: int, sample_contig: int, ref: tuple[int, int]
) -> _PlaneSpec:
    keyframe = level.keyframe
    page = level.pages[page_index]
    if page is None:
        raise ValueError("missing page")
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
    h, w = int(keyframe.imagelength), int(keyframe.imagewidth)
    spp = int(keyframe.samplesperpixel)
    planar = keyframe.planarconfig == 2
    samples_contig = 1 if planar else spp
    file_dtype = np.dtype(keyframe.parent.byteorder + keyframe.dtype.char)
    if keyframe.is_tiled:
        th, tw = int(keyframe.tilelength), int(keyframe.tilewidth)
    else:
        th, tw = min(int(keyframe.rowsperstrip) or h, h), w
    tiles_across = math.ceil(w / tw)
    per_plane = math.ceil(h / th) * tiles_across
    nbytes = h * w * spp * file_dtype.itemsize
    contiguous = (
        keyframe.compression == 1
        and keyframe.predictor == 1
        and keyframe.fillorder == 1
        and not keyframe.is_subsampled
        and keyframe.bitspersample in (8, 16, 32, 64)
        and keyframe.sampleformat in (1, 2, 3)
        and len(offsets) > 0
        and (keyframe.is_tiled is False or tw == w)
        and int(bytecounts.sum()) == nbytes
        and bool(np.all(offsets[1:] == offsets[:-1] + bytecounts[:-1]))
    )
    if contiguous:
        kind = "contiguous"
    elif keyframe.is_tiled:
        kind = "tiled"
    else:
        kind = "strips"
    nodata = keyframe.nodata if keyframe.nodata is not None else 0
    return _PlaneSpec(
        shape=(h, w),
        dtype=keyframe.dtype.newbyteorder("=").str,
        file_dtype=file_dtype.str,
        kind=kind,
        chunk=(th, tw),
        offsets=offsets,
        bytecounts=bytecounts,
        segments_per_plane=per_plane,
        tiles_across=tiles_across,
        sample_plane=sample_plane,
        sample_contig=sample_contig,
        samples_contig=samples_contig,
        page_ref=(ref[0], ref[1], page_index),
        jpegtables=getattr(page, "jpegtables", None),
        nodata=float(nodata) if np.isfinite(nodata) else 0.0,
    )


def _check_extent(spec: _PlaneSpec, size: int, path: str) -> None:
    """Raise if the plane's data would lie past the end of the file (truncated file)."""
    if spec.kind == "contiguous":
        fdt = np.dtype(spec.file_dtype)
        nbytes = spec.shape[0] * spec.shape[1] * spec.samples_contig * fdt.itemsize
        end = int(spec.offsets[0]) + nbytes * (spec.sample_plane + 1)
    else:
        used = spec.bytecounts > 0
        end = int((spec.offsets[used] + spec.bytecounts[used]).max()) if used.any() else 0
    if end > size:
        raise MosaicError(
            path,
            f"is truncated: its image data runs to byte {end} but the file has {size} bytes",
        )


def _level_fits(
    shape: tuple[int, int], shape0: tuple[int, int], previous: tuple[int, int]
) -> bool:
    """Whether ``shape`` is a plausible reduced level of ``shape0`` smaller than ``previous``."""
    if not (shape[0] < previous[0] and shape[1] < previous[1]) or min(shape) < 1:
        return False
    fy, fx = shape0[0] / shape[0], shape0[1] / shape[1]
    # Same downsampling on both axes, up to the rounding of odd sizes.
    return abs(fy - fx) <= max(fy, fx) * 0.05 + 2.0 * max(fy, fx) / min(shape0)


def _compression_name(keyframe: Any) -> str:
    try:
        return tifffile.COMPRESSION(keyframe.compression).name.lower()
    except ValueError:
        return str(keyframe.compression)


def _other_channel_names(tif: tifffile.TiffFile) -> list[str] | None:
    """Channel names written by tifffile's JSON ``shaped`` metadata or ImageJ labels."""
    for meta in tif.shaped_metadata or ():
        for key in ("channel_names", "channels", "Channel", "channel"):
            value = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(value, dict):
                value = value.get("Name")
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
    ij = tif.imagej_metadata or {}
    labels = ij.get("Labels")
    if isinstance(labels, (list, tuple)) and all(isinstance(v, str) for v in labels):
        return list(labels)
    return None


def open_tiff(path: str | Path) -> TiffImage:
    """Read the headers of a TIFF file and return lazy planes for its channels and levels.

    Parameters
    ----------
    path
        A TIFF, BigTIFF or OME-TIFF file (tiled or stripped, any compression tifffile
        and imagecodecs decode, pyramidal or not).

    Returns
    -------
    TiffImage
        Nothing but headers is read.

    Raises
    ------
    MosaicError
        If the file is missing, not a TIFF, truncated or corrupt, empty, a volume or a
        stack, or of an unsupported layout.
    """
    path = str(path)
    size, tif = _open_checked(path)
    source = _TiffSource(path)
    source.set_tiff(tif)
    try:
        series_list = tif.series
        if not series_list:
            raise MosaicError(path, "holds no image")
        # The largest series is the image; the others are thumbnails, labels, macros.
        sizes = []
        for s in series_list:
            kf = s.keyframe
            sizes.append(int(kf.imagelength) * int(kf.imagewidth) if kf is not None else 0)
        si = int(np.argmax(sizes))
        series = series_list[si]
        level0 = series.levels[0]
        kf0 = level0.keyframe
        if kf0.dtype is None:  # tifffile knows no numpy type for it (e.g. 12-bit samples)
            raise MosaicError(
                path,
                f"has an unsupported sample format ({kf0.bitspersample} bits per sample, "
                f"SampleFormat {int(kf0.sampleformat)})",
            )
        layout = _channel_layout(level0, path)
        levels = _level_planes(source, series_list, si, sizes, layout, size)
        n_channels = len(layout)
        ome = _ome_pixels(tif, si)
        names: list[str | None] = [None] * n_channels
        found = ome.get("channel_names") if ome else None
        if not found:
            found = _other_channel_names(tif)
        if found and len(found) == n_channels:
            names = list(found)
        pixel_size, pixel_source = tiff_pixel_size_um(tif, level0.pages[0] or kf0, si)
        # Everything needed is now in the planes: drop tifffile's page tree.
        source.close()
        return TiffImage(
            path=path,
            levels=levels,
            channel_names=names,
            dtype=np.dtype(kf0.dtype),
            pixel_size_um=pixel_size,
            pixel_size_source=pixel_source,
            axes=str(series.axes),
            storage=levels[0][0].kind,
            compression=_compression_name(kf0),
            series_index=si,
            extra={"is_ome": bool(tif.is_ome), "series_kind": str(series.kind)},
        )
    except MosaicError:
        source.close()
        raise
    except Exception as exc:
        source.close()
        raise MosaicError(
            path, f"cannot be read as an image ({type(exc).__name__}: {exc}); corrupt?"
        ) from exc


def _open_checked(path: str) -> tuple[int, tifffile.TiffFile]:
    """The file's size and its open TiffFile, after the cheap checks (magic, structure)."""
    size = check_file(path)
    if size == 0:
        raise MosaicError(path, "is empty (0 bytes)")
    head = read_head(path, 8)
    if head[:4] not in TIFF_MAGIC:
        raise MosaicError(path, f"is not a TIFF file (it starts with {head!r})")
    problem = tiff_structure_problem(path, size)
    if problem is not None:
        raise MosaicError(path, problem)
    try:
        return size, tifffile.TiffFile(path)
    except OSError as exc:
        raise MosaicError(path, os_problem(exc)) from exc
    except Exception as exc:
        raise MosaicError(
            path, f"cannot be read as a TIFF file ({type(exc).__name__}: {exc}); corrupt?"
        ) from exc


def _level_planes(
    source: _TiffSource,
    series_list: list,
    si: int,
    sizes: list[int],
    layout: list,
    size: int,
) -> list[list[TiffPlane]]:
    """Planes of every pyramid level of series ``si``: its own levels, else fitting series.

    A level must be a reduced copy of level 0 (same dtype and channel layout, each smaller
    than the one before); the first of the series' own levels that is not ends the pyramid.
    """
    path = source.path
    series = series_list[si]
    level0 = series.levels[0]
    kf0 = level0.keyframe
    dtype = np.dtype(kf0.dtype)
    shape0 = (int(kf0.imagelength), int(kf0.imagewidth))
    candidates = [(si, li, level) for li, level in enumerate(series.levels)]
    if len(candidates) == 1:
        # Some writers (tifffile "shaped" files with SubIFDs per channel page) leave
        # the reduced levels as separate series: take those that fit, largest first.
        others = [(sj, 0, s.levels[0]) for sj, s in enumerate(series_list) if sj != si]
        others.sort(key=lambda t: -sizes[t[0]])
        candidates += others
    levels: list[list[TiffPlane]] = []
    previous = (shape0[0] + 1, shape0[1] + 1)
    for n, (sj, li, level) in enumerate(candidates):
        kf = level.keyframe
        shape = (int(kf.imagelength), int(kf.imagewidth))
        lay = layout
        if n > 0:
            fits = np.dtype(kf.dtype) == dtype and _level_fits(shape, shape0, previous)
            if fits:
                try:
                    lay = _channel_layout(level, path)
                except MosaicError:
                    lay = []
            if not fits or len(lay) != len(layout):
                if sj == si:
                    break  # not a reduced copy of level 0: ignore it and what follows
                continue
        planes = []
        for page_index, sample_plane, sample_contig in lay:
            spec = _plane_spec(level, page_index, sample_plane, sample_contig, (sj, li))
            spec.level = len(levels)
            _check_extent(spec, size, path)
            page = level.pages[page_index]
            keyframe = page.keyframe if page.keyframe is not None else level.keyframe
            planes.append(TiffPlane(source, spec, keyframe))
        levels.append(planes)
        previous = shape
    return levels
