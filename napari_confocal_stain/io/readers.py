"""Open any supported confocal slide as one :class:`ConfocalMosaic`.

Accepted inputs (see :func:`open_mosaic`):

* a Vivascope mosaic folder: ``DET#1/highres_raw.tif`` is R, ``DET#2/highres_raw.tif``
  is F (or a folder holding exactly one such mosaic);
* an R TIFF with ``f_path=`` its F TIFF, or a folder with one ``*_R.tif``/``*_F.tif`` pair;
* one two-channel TIFF / OME-TIFF (channel axis first or last, or OME ``C``);
* a two-channel OME-Zarr (NGFF 0.4/0.5).

Opening reads headers plus a bounded sample of one coarse level (for the normalisation
statistics and display contrast) and nothing else, whatever size the file declares; every
level of ``r`` and ``f`` is a lazy dask array. Every failure a user can cause (a missing,
unreadable, looping, truncated, corrupt or mislabelled input) is a :class:`MosaicError`
naming the file and the problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dask.base import tokenize

from napari_confocal_stain.core.normalize import (
    NORMALIZATION_MODES,
    apply_normalization,
    display_limits,
    normalization_stats,
)
from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io.mosaic import ConfocalMosaic
from napari_confocal_stain.io.naming import RAW_NAMES, detector_number, rf_pair, rf_role
from napari_confocal_stain.io.omezarr import is_zarr, open_omezarr
from napari_confocal_stain.io.paths import (
    check_file,
    check_folder,
    is_dir,
    is_file,
    list_folder,
    read_head,
)
from napari_confocal_stain.io.pyramid import (
    FULL_READ_PIXELS,
    MAX_CHUNK_BYTES,
    MAX_DASK_CHUNKS,
    MAX_LEVEL_PIXELS,
    as_dask,
    dask_chunks,
    extend_pyramid,
    sample_blocks,
    stats_level_index,
)
from napari_confocal_stain.io.tiff import TIFF_MAGIC, TIFF_SUFFIXES, open_tiff
from napari_confocal_stain.io.values import CheckedPlane, needs_value_check

__all__ = ["DEFAULT_PIXEL_SIZE_UM", "find_mosaics", "open_mosaic"]

DEFAULT_PIXEL_SIZE_UM = 0.75
"""Vivascope 2500 pixel size, used when the file records none."""

_R_WORDS = {"r", "refl", "reflect", "reflectance", "reflectivity", "rcm"}
_F_WORDS = {"f", "fl", "fluo", "fluor", "fluorescence", "fcm"}
_SKIP_WORDS = {"", "-", "_", "x", "skip", "none"}


# --------------------------------------------------------------------------- finding
def _det_dirs(folder: Path) -> dict[int, Path]:
    """``{1: DET#1 folder, 2: DET#2 folder}`` for the detector sub-folders present."""
    found: dict[int, Path] = {}
    try:
        entries = list_folder(folder)
    except MosaicError:
        return found
    for entry in entries:
        n = detector_number(entry.name)
        if n is not None and is_dir(entry):
            found.setdefault(n, Path(entry.path))
    return found


def _raw_file(det: Path) -> Path | None:
    """The detector's image file (whatever it is: opening it says if it is not a file)."""
    named = [e for e in list_folder(det) if e.name.lower() in RAW_NAMES]
    named.sort(key=lambda e: not is_file(e))
    return Path(named[0].path) if named else None


def find_mosaics(folder: str | os.PathLike[str]) -> list[Path]:
    """Find the Vivascope mosaic folders (with ``DET#1``/``DET#2`` sub-folders) under a folder.

    Parameters
    ----------
    folder
        Where to look, recursively (the folder itself counts). Hidden folders, zarr
        stores and the inside of a mosaic are not searched.

    Returns
    -------
    list of pathlib.Path
        Sorted. A mosaic with only one of its two detector folders is listed too;
        opening it says which is missing.

    Raises
    ------
    MosaicError
        If ``folder`` is not a folder.
    """
    root = Path(folder).expanduser()
    check_folder(root)
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(root):
        here = Path(dirpath)
        if _det_dirs(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".") and not d.lower().endswith(".zarr") and not is_zarr(here / d)
        ]
    return sorted(found)


def _pairs_in(entries: list[os.DirEntry[str]]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Complete R/F pairs among a folder's entries (see :mod:`.naming`), and unpaired halves."""
    halves: dict[str, dict[str, Path]] = {}
    for entry in entries:
        role = rf_role(entry.name)
        if role is not None:
            halves.setdefault(role[1], {}).setdefault(role[0], Path(entry.path))
    pairs = [(h["R"], h["F"]) for h in halves.values() if "R" in h and "F" in h]
    single = [p for h in halves.values() if len(h) == 1 for p in h.values()]
    return pairs, single


def _pair_name(path: Path) -> str:
    role = rf_role(path.name)
    return role[1] if role is not None else _stem(path)


# ------------------------------------------------------------------------- channels
def _role(label: Any) -> str | None:
    """``"R"``, ``"F"``, ``"skip"`` or ``None`` (unrecognised) for a channel label."""
    if label is None:
        return "skip"
    text = str(label).strip().lower()
    if text in _SKIP_WORDS:
        return "skip"
    tokens = set(re.split(r"[^a-z0-9]+", text)) - {""}
    is_r = bool(tokens & _R_WORDS) or "reflect" in text
    is_f = bool(tokens & _F_WORDS) or "fluor" in text
    if is_r and not is_f:
        return "R"
    if is_f and not is_r:
        return "F"
    return None


def _pick_channels(names: Sequence[str | None], channels: Any, path: str) -> tuple[int, int, str]:
    """Return ``(R index, F index, how the order was decided)``."""
    n = len(names)

    def index_of(value: Any, role: str) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            i = int(value)
            if not -n <= i < n:
                raise MosaicError(path, f"has {n} channels; channel {i} for {role} does not exist")
            return i % n
        matches = [i for i, nm in enumerate(names) if nm is not None and str(nm) == str(value)]
        if len(matches) != 1:
            raise MosaicError(
                path, f"has no single channel named {value!r} for {role} (channels: {list(names)})"
            )
        return matches[0]

    if channels is None:
        if n == 1:
            raise MosaicError(
                path,
                "has one channel, but R and F are both needed: pass f_path= with the F file, "
                "or open a folder with *_R.tif/*_F.tif, or a two-channel file",
            )
        if n != 2:
            raise MosaicError(
                path,
                f"has {n} channels where 2 (R and F) are expected; pass channels=... to say "
                "which two are R and F (e.g. channels={'r': 0, 'f': 2})",
            )
        roles = [_role(nm) if nm is not None else None for nm in names]
        if sorted(r for r in roles if r in ("R", "F")) == ["F", "R"]:
            return roles.index("R"), roles.index("F"), f"channel names {list(names)}"
        return 0, 1, "default (first channel R, second F)"

    if isinstance(channels, Mapping):
        keyed = {str(k).strip().upper(): v for k, v in channels.items()}
        if set(keyed) != {"R", "F"}:
            raise ValueError(f"channels mapping needs keys 'r' and 'f', got {list(channels)}")
        ri, fi = index_of(keyed["R"], "R"), index_of(keyed["F"], "F")
    elif isinstance(channels, Sequence) and not isinstance(channels, (str, bytes)):
        items = list(channels)
        if len(items) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items
        ):
            ri, fi = index_of(items[0], "R"), index_of(items[1], "F")
        else:
            if len(items) != n:
                raise MosaicError(
                    path,
                    f"has {n} channels but channels= gives {len(items)} labels; give one "
                    "label ('R', 'F' or None) per channel, (r_index, f_index), "
                    "or {'r': .., 'f': ..}",
                )
            roles = [_role(v) for v in items]
            if roles.count("R") != 1 or roles.count("F") != 1 or None in roles:
                raise ValueError(
                    f"channels={items!r} must label exactly one channel 'R' and one 'F' "
                    "(others None)"
                )
            ri, fi = roles.index("R"), roles.index("F")
    else:
        raise ValueError(f"channels must be a sequence or a mapping, got {channels!r}")
    if ri == fi:
        raise ValueError(f"channels= selects channel {ri} for both R and F")
    return ri, fi, "argument"


# ------------------------------------------------------------------------ assembling
def _check_dtype(dtype: np.dtype, path: str) -> None:
    if dtype.kind in "uif":
        return
    kind = {
        "b": "boolean (1-bit mask)",
        "c": "complex",
        "O": "object",
        "U": "text",
        "S": "bytes",
        "V": "structured",
        "M": "date",
        "m": "time",
    }.get(dtype.kind, dtype.kind)
    raise MosaicError(
        path,
        f"holds {kind} data ({dtype}); confocal intensities must be real numbers "
        "(uint8, uint16 or float32)",
    )


def _file_stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    return st.st_mtime_ns, st.st_size


def _to_dask_levels(planes: list[Any], path: str, tag: str) -> list[Any]:
    stamp = _file_stamp(path)
    out = []
    for k, plane in enumerate(planes):
        name = f"confocal-{tag}-L{k}-{tokenize(path, stamp, tag, k, plane.shape)}"
        out.append(
            as_dask(plane, name=name, chunks=dask_chunks(plane.shape, plane.chunk, plane.kind))
        )
    return out


def _stats_sample(
    r_planes: list[Any], f_planes: list[Any]
) -> tuple[np.ndarray, np.ndarray, int, str]:
    """R and F pixels for the statistics: a small level whole, or blocks of a large one."""
    shapes = [p.shape for p in r_planes]
    k = stats_level_index(shapes)
    h, w = shapes[k]
    if h * w > FULL_READ_PIXELS:
        (r_s, f_s), desc = sample_blocks([r_planes[k], f_planes[k]])
        desc = f"{desc} from level {k} ({h}x{w} px)"
    else:
        r_s, f_s = np.asarray(r_planes[k][:, :]), np.asarray(f_planes[k][:, :])
        desc = f"level {k} ({h}x{w} px)"
    return r_s, f_s, k, desc


def _check_sizes(planes: list[Any], path: str) -> None:
    """Refuse sizes whose opening or reading costs too much, whatever the file declares."""
    h, w = planes[0].shape
    if h * w > MAX_LEVEL_PIXELS:
        raise MosaicError(
            path,
            f"declares {h}x{w} px ({h * w / 1e9:.0f} Gpx), more than the "
            f"{MAX_LEVEL_PIXELS / 1e9:.1f} Gpx this reader opens: is its header damaged?",
        )
    for k, plane in enumerate(planes):
        ys, xs = dask_chunks(plane.shape, plane.chunk, plane.kind)
        if len(ys) * len(xs) > MAX_DASK_CHUNKS:
            raise MosaicError(
                path,
                f"declares level {k} of {plane.shape[0]}x{plane.shape[1]} px, which would be "
                f"cut into {len(ys) * len(xs)} pieces of {ys[0]}x{xs[0]} px (at most "
                f"{MAX_DASK_CHUNKS} are allowed): is its header damaged?",
            )
        nbytes = int(getattr(plane, "chunk_bytes", 0))
        if nbytes > MAX_CHUNK_BYTES:
            th, tw = plane.chunk
            raise MosaicError(
                path,
                f"stores level {k} in chunks of {th}x{tw} px ({nbytes / 2**30:.1f} GiB each "
                f"when decoded); reading any pixel decodes a whole chunk and at most "
                f"{MAX_CHUNK_BYTES >> 20} MiB is allowed: save it tiled (e.g. 512x512 tiles)",
            )


def _checked(planes: list[Any], path: str, role: str) -> list[Any]:
    """Planes whose reads refuse NaN/inf or negative values (float and signed data)."""
    if not planes or not needs_value_check(planes[0].dtype):
        return planes
    return [CheckedPlane(p, path, k, role) for k, p in enumerate(planes)]


def _assemble(
    r_planes: list[Any],
    f_planes: list[Any],
    *,
    r_file: str,
    f_file: str,
    r_tag: str,
    f_tag: str,
    layout: str,
    name: str,
    source: str,
    normalization: str,
    pixel_size_um: float | None,
    file_pixel_size: float | None,
    metadata: dict[str, Any],
) -> ConfocalMosaic:
    r_dtype, f_dtype = np.dtype(r_planes[0].dtype), np.dtype(f_planes[0].dtype)
    r_planes, f_planes = _common_levels(r_planes, f_planes, r_file, f_file, source)

    r_s, f_s, k, desc = _stats_sample(r_planes, f_planes)
    stats = normalization_stats(r_s, f_s, normalization, dtype=r_dtype, f_dtype=f_dtype)
    stats["source_level"] = k
    stats["source"] = desc
    # Display contrast of the normalised modes, from the same bounded sample: napari
    # would otherwise compute it from the data (a whole level, for a built one).
    limits = {
        m: list(display_limits(apply_normalization(x, stats[m]["low"], stats[m]["high"])))
        for m, x in (("r", r_s), ("f", f_s))
    }

    r_stored = _to_dask_levels(r_planes, r_file, r_tag)
    f_stored = _to_dask_levels(f_planes, f_file, f_tag)
    r_norm = [apply_normalization(a, stats["r"]["low"], stats["r"]["high"]) for a in r_stored]
    f_norm = [apply_normalization(a, stats["f"]["low"], stats["f"]["high"]) for a in f_stored]
    r_levels, n_stored = extend_pyramid(r_norm)
    f_levels, _ = extend_pyramid(f_norm)

    size, size_source = _pixel_size(pixel_size_um, file_pixel_size, metadata)
    meta = {
        **metadata,
        "levels_from_file": n_stored > 1,
        "n_file_levels": n_stored,
        "n_built_levels": len(r_levels) - n_stored,
        "pixel_size_source": size_source,
        "norm_stats": stats,
        "contrast_limits": limits,
        "dtypes": {"r": r_dtype.name, "f": f_dtype.name},
    }
    return ConfocalMosaic(
        r=r_levels,
        f=f_levels,
        pixel_size_um=size,
        source=source,
        layout=layout,
        name=name,
        dtype=r_dtype.name if r_dtype == f_dtype else f"{r_dtype.name}/{f_dtype.name}",
        normalization=normalization,
        files={"r": r_file, "f": f_file},
        metadata=meta,
        r_raw=list(r_planes[:n_stored]),
        f_raw=list(f_planes[:n_stored]),
    )


def _common_levels(
    r_planes: list[Any], f_planes: list[Any], r_file: str, f_file: str, source: str
) -> tuple[list[Any], list[Any]]:
    """The stored levels both modes have (same shapes), checked and wrapped for reading.

    Levels past the first that differ are left out: the pyramid builds them instead.
    """
    _check_dtype(np.dtype(r_planes[0].dtype), r_file)
    _check_dtype(np.dtype(f_planes[0].dtype), f_file)
    if r_planes[0].shape != f_planes[0].shape:
        (rh, rw), (fh, fw) = r_planes[0].shape, f_planes[0].shape
        raise MosaicError(
            source,
            f"R and F differ in size: R is {rh}x{rw} px ({r_file}), F is {fh}x{fw} px "
            f"({f_file}); they must be the same size",
        )
    n_common = 0
    for rp, fp in zip(r_planes, f_planes, strict=False):
        if rp.shape != fp.shape:
            break
        n_common += 1
    r_planes, f_planes = r_planes[:n_common], f_planes[:n_common]
    _check_sizes(r_planes, r_file)
    _check_sizes(f_planes, f_file)
    return _checked(r_planes, r_file, "R"), _checked(f_planes, f_file, "F")


def _pixel_size(
    pixel_size_um: float | None, file_pixel_size: float | None, metadata: dict[str, Any]
) -> tuple[float, str]:
    """The pixel size to use and where it came from (pops ``pixel_size_source``)."""
    found = metadata.pop("pixel_size_source", None)
    if pixel_size_um is not None:
        return float(pixel_size_um), "argument"
    if file_pixel_size is not None:
        return float(file_pixel_size), found or "file"
    return DEFAULT_PIXEL_SIZE_UM, f"default {DEFAULT_PIXEL_SIZE_UM} µm ({found or 'none in file'})"


def _image_meta(img: Any) -> dict[str, Any]:
    if hasattr(img, "storage"):  # TiffImage
        return {
            "storage": img.storage,
            "compression": img.compression,
            "tile": list(img.levels[0][0].chunk),
            "axes": img.axes,
        }
    return {"axes": img.axes, "ngff_version": img.version, "tile": list(img.levels[0][0].chunk)}


# --------------------------------------------------------------------------- openers
def _open_pair(
    r_path: Path, f_path: Path, *, layout: str, name: str, source: str, **kw: Any
) -> ConfocalMosaic:
    for p, role in ((r_path, "R"), (f_path, "F")):
        check_file(p, f"the {role} image")
    r_img, f_img = open_tiff(r_path), open_tiff(f_path)
    for img, role in ((r_img, "R"), (f_img, "F")):
        if img.n_channels != 1:
            raise MosaicError(
                img.path,
                f"has {img.n_channels} channels; the {role} image of a pair must have one",
            )
    file_size = r_img.pixel_size_um if r_img.pixel_size_um is not None else f_img.pixel_size_um
    src = r_img.pixel_size_source if r_img.pixel_size_um is not None else f_img.pixel_size_source
    meta = {
        "channel_names": ["R", "F"],
        "channel_order_source": "files",
        "pixel_size_source": src,
        "r": _image_meta(r_img),
        "f": _image_meta(f_img),
    }
    if (
        r_img.pixel_size_um is not None
        and f_img.pixel_size_um is not None
        and abs(r_img.pixel_size_um - f_img.pixel_size_um) > 1e-6 * r_img.pixel_size_um
    ):
        meta["pixel_size_note"] = (
            f"R says {r_img.pixel_size_um:g} µm, F says {f_img.pixel_size_um:g} µm; R's is used"
        )
    return _assemble(
        [lv[0] for lv in r_img.levels],
        [lv[0] for lv in f_img.levels],
        r_file=str(r_path),
        f_file=str(f_path),
        r_tag="r",
        f_tag="f",
        layout=layout,
        name=name,
        source=source,
        file_pixel_size=file_size,
        metadata=meta,
        **kw,
    )


def _open_vivascope(folder: Path, source: str, **kw: Any) -> ConfocalMosaic:
    dets = _det_dirs(folder)
    files: dict[int, Path] = {}
    for n in (1, 2):
        role = "R" if n == 1 else "F"
        det = dets.get(n)
        if det is None:
            for entry in list_folder(folder):
                if detector_number(entry.name) == n:
                    check_folder(entry.path)  # says why it is not a usable folder
            raise MosaicError(
                folder / f"DET#{n}",
                f"is missing: a Vivascope mosaic needs DET#1 (R) and DET#2 (F), "
                f"so {role} is missing in {folder}",
            )
        raw = _raw_file(det)
        if raw is None:
            raise MosaicError(
                det / "highres_raw.tif", f"is missing ({role} of the mosaic {folder})"
            )
        files[n] = raw
    return _open_pair(
        files[1], files[2], layout="vivascope", name=folder.name, source=source, **kw
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", *TIFF_SUFFIXES, ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_multichannel(
    path: Path, source: str, channels: Any, kind: str, **kw: Any
) -> ConfocalMosaic:
    img = open_omezarr(path) if kind == "ome-zarr" else open_tiff(path)
    ri, fi, order = _pick_channels(img.channel_names, channels, str(path))
    meta = {
        "channel_names": list(img.channel_names),
        "channel_indices": {"r": ri, "f": fi},
        "channel_order_source": order,
        "pixel_size_source": img.pixel_size_source,
        **_image_meta(img),
    }
    return _assemble(
        [lv[ri] for lv in img.levels],
        [lv[fi] for lv in img.levels],
        r_file=str(path),
        f_file=str(path),
        r_tag=f"c{ri}",
        f_tag=f"c{fi}",
        layout=kind,
        name=_stem(path),
        source=source,
        file_pixel_size=img.pixel_size_um,
        metadata=meta,
        **kw,
    )


def _list(paths: Sequence[Any]) -> str:
    return "; ".join(str(p) for p in paths)


def _open_folder(folder: Path, source: str, channels: Any, **kw: Any) -> ConfocalMosaic:
    if _det_dirs(folder):
        return _open_vivascope(folder, source, **kw)
    mosaics = find_mosaics(folder)
    if len(mosaics) == 1:
        return _open_vivascope(mosaics[0], source, **kw)
    if len(mosaics) > 1:
        raise MosaicError(
            folder,
            f"holds {len(mosaics)} Vivascope mosaics; open one of them: {_list(mosaics)}",
        )
    entries = list_folder(folder)
    pairs, single = _pairs_in(entries)
    if len(pairs) == 1:
        r, f = pairs[0]
        return _open_pair(r, f, layout="tiff-pair", name=_pair_name(r), source=source, **kw)
    if len(pairs) > 1:
        listed = _list(f"{r.name} + {f.name}" for r, f in pairs)
        raise MosaicError(
            folder,
            f"holds {len(pairs)} R/F TIFF pairs; open one with open_mosaic(R, f_path=F): {listed}",
        )
    images = [
        Path(e.path)
        for e in entries
        if not e.name.startswith(".")
        and (
            (is_file(e) and e.name.lower().endswith(TIFF_SUFFIXES))
            or (is_dir(e) and is_zarr(e.path))
        )
    ]
    if single and len(images) == len(single):
        raise MosaicError(
            single[0],
            "has no partner: an *_R.tif needs an *_F.tif of the same name (and back); "
            f"unpaired: {_list(p.name for p in single)}",
        )
    if len(images) == 1:
        return _open_path(images[0], source, channels=channels, **kw)
    if len(images) > 1:
        raise MosaicError(folder, f"holds {len(images)} images; open one of them: {_list(images)}")
    visible = [e.name for e in entries if not e.name.startswith(".")]
    if folder.name.lower().endswith(".zarr"):
        raise MosaicError(
            folder,
            "has no zarr metadata (.zgroup, .zattrs, .zarray or zarr.json): not a zarr "
            "store, or an incomplete copy of one",
        )
    problem = "is empty" if not visible else "holds no slide"
    raise MosaicError(
        folder,
        f"{problem}: expected a Vivascope mosaic (DET#1/highres_raw.tif + "
        "DET#2/highres_raw.tif), an *_R.tif/*_F.tif pair, a two-channel TIFF or an OME-Zarr",
    )


def _check_tiff_head(path: Path, what: str = "") -> None:
    """Raise unless ``path`` starts like a TIFF (empty and other files named as such)."""
    head = read_head(path, 8)
    suffix = f" ({what})" if what else ""
    if not head:
        raise MosaicError(path, f"is empty (0 bytes){suffix}")
    if head[:4] not in TIFF_MAGIC:
        raise MosaicError(
            path,
            f"is not a TIFF file (it starts with {head!r}){suffix}; expected a TIFF, an "
            "OME-Zarr folder or a Vivascope mosaic folder",
        )


def _open_path(path: Path, source: str, *, channels: Any, **kw: Any) -> ConfocalMosaic:
    if is_dir(path):
        check_folder(path)
        if is_zarr(path):
            return _open_multichannel(path, source, channels, "ome-zarr", **kw)
        return _open_folder(path, source, channels, **kw)
    check_file(path)
    # A detector file of a Vivascope mosaic stands for its mosaic.
    if (
        path.name.lower() in RAW_NAMES
        and detector_number(path.parent.name) is not None
        and channels is None
        and _det_dirs(path.parent.parent)
    ):
        return _open_vivascope(path.parent.parent, source, **kw)
    _check_tiff_head(path)
    if channels is None:
        pair = rf_pair(path)
        if pair is not None:
            img = open_tiff(path)  # headers only; a one-channel *_R/*_F file has a partner
            if img.n_channels == 1:
                img.levels[0][0]._source.close()
                return _open_pair(
                    *pair, layout="tiff-pair", name=_pair_name(pair[0]), source=source, **kw
                )
    return _open_multichannel(path, source, channels, "multichannel-tiff", **kw)


def open_mosaic(
    path: str | os.PathLike[str],
    *,
    f_path: str | os.PathLike[str] | None = None,
    channels: Sequence[Any] | Mapping[str, Any] | None = None,
    normalization: str = "percentile",
    pixel_size_um: float | None = None,
) -> ConfocalMosaic:
    """Open a confocal R/F slide lazily as a normalised multiscale :class:`ConfocalMosaic`.

    Parameters
    ----------
    path
        One of: a Vivascope mosaic folder (``DET#1/highres_raw.tif`` = R,
        ``DET#2/highres_raw.tif`` = F); a folder holding exactly one mosaic, or one
        ``*_R.tif``/``*_F.tif`` pair, or one image; an R TIFF (with ``f_path``); a
        two-channel TIFF/OME-TIFF; a two-channel OME-Zarr folder.
    f_path
        The F TIFF when ``path`` is the R TIFF of an explicit pair.
    channels
        Which channels of a multichannel file are R and F: one label per channel in file
        order (``("F", "R")``; ``None`` skips a channel), ``(r_index, f_index)``, or
        ``{"r": index_or_name, "f": index_or_name}``. Default: from channel names
        (R/reflectance, F/fluorescence), else the first channel is R, the second F.
    normalization
        ``"percentile"`` (default), ``"independent"``, ``"global"``, ``"average"`` or
        ``"dtype"``; see :mod:`napari_confocal_stain.core.normalize`.
    pixel_size_um
        Overrides the level-0 pixel size from the file (default 0.75 if it has none).

    Returns
    -------
    ConfocalMosaic
        ``r`` and ``f``: lists of float32 dask arrays in [0, 1], level 0 first, down to
        the first level whose larger side is at most 1024 px.

    Raises
    ------
    MosaicError
        For anything wrong with the input, naming the file or folder at fault.
    ValueError
        For invalid arguments.
    """
    if normalization not in NORMALIZATION_MODES:
        raise ValueError(
            f"unknown normalization {normalization!r}; expected one of "
            f"{', '.join(NORMALIZATION_MODES)}"
        )
    if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")
    p = Path(path).expanduser()
    source = str(p)
    kw: dict[str, Any] = {"normalization": normalization, "pixel_size_um": pixel_size_um}
    if f_path is not None:
        fp = Path(f_path).expanduser()
        if is_dir(p):
            raise MosaicError(p, "is a folder; with f_path=, path must be the R TIFF file")
        for q, role in ((p, "R"), (fp, "F")):
            check_file(q, f"the {role} image")
            _check_tiff_head(q, f"the {role} image")
        return _open_pair(p, fp, layout="tiff-pair", name=_pair_name(p), source=source, **kw)
    return _open_path(p, source, channels=channels, **kw)
