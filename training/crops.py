"""``python -m training extract-crops``: tissue crops on disk, their manifest, reading them.

Confocal mosaics give ``<split>/<slide>_y<Y>_x<X>.tif`` (2 × size × size uint16: R, F); H&E
slides give ``<split>/<slide>_y<Y>_x<X>.png`` (plus ``…_rf.tif``, the pseudo-confocal R/F
without speckle, with ``pseudo``). Every crop is at 0.75 µm/px and listed in
``manifest.csv``; whole slides are assigned to ``train`` or ``val``
(:func:`training.data.split_by_slide`). :func:`load_crop_regions` turns a crops folder into
the regions the trainers sample from (``data.cm_crops`` / ``data.he_crops``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_confocal_stain._fs import write_atomic
from napari_confocal_stain.errors import MosaicError
from training.data import (
    CM_PIXEL_SIZE_UM,
    TissueRegion,
    box_mean,
    extract_crops,
    hed_scale,
    otsu_tissue_mask,
    pseudo_confocal,
    read_he,
    resize_to_pixel_size,
    split_by_slide,
    tissue_signal_he,
    to_unit_float,
)
from training.images import png_bytes
from training.tables import csv_text

__all__ = [
    "DEFAULTS",
    "MANIFEST_FIELDS",
    "extract_cm_crops",
    "extract_he_crops",
    "load_crop_regions",
    "read_manifest",
    "run_extract_crops",
]

DEFAULTS: dict[str, Any] = {
    "cm": [],
    "he": [],
    "out": "runs/crops",
    "size": 1024,
    "overlap": 0,
    "min_tissue": 0.5,
    "min_mean": 0.05,
    "val_fraction": 0.2,
    "seed": 0,
    "pseudo": False,
    "pixel_size_um": None,
}
"""Configuration of ``python -m training extract-crops`` (thesis: 1024² crops)."""

MANIFEST_FIELDS = ("file", "slide", "split", "kind", "y", "x", "size", "pixel_size_um")

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------ manifests


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a crops ``manifest.csv`` written by ``python -m training extract-crops``.

    Raises
    ------
    MosaicError
        Missing file or columns.
    """
    path = Path(path)
    if not path.is_file():
        raise MosaicError(path, "crop manifest not found (run `python -m training extract-crops`)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = set(MANIFEST_FIELDS) - set(rows[0] if rows else MANIFEST_FIELDS)
    if missing:
        raise MosaicError(path, f"manifest lacks columns {sorted(missing)}")
    return rows


def _manifest_row(
    name: str, slide: str, split: str, kind: str, y: int, x: int, size: int
) -> dict[str, Any]:
    return {
        "file": name,
        "slide": slide,
        "split": split,
        "kind": kind,
        "y": y,
        "x": x,
        "size": size,
        "pixel_size_um": CM_PIXEL_SIZE_UM,
    }


def _write_rf(path: Path, r: np.ndarray, f: np.ndarray) -> None:
    """R and F in [0, 1] as one 2-page uint16 TIFF."""
    import tifffile

    rf = np.stack([r, f]) * 65535 + 0.5
    buf = io.BytesIO()
    tifffile.imwrite(buf, rf.astype(np.uint16), compression="zlib", photometric="minisblack")
    write_atomic(path, buf.getvalue())


def _check_output(out: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse to write crops into (or above) an input's folder."""
    out = out.resolve()
    for p in inputs:
        folder = Path(p).resolve()
        folder = folder if folder.is_dir() else folder.parent
        if out == folder or folder in out.parents:
            raise MosaicError(out, f"refusing to write crops inside the input folder {folder}")


# ------------------------------------------------------------------------- confocal crops


def _analysis_level(mosaic: Any, win: int) -> int:
    """The coarsest pyramid level on which a crop of ``win`` level-0 pixels is still ≥ 8 px."""
    level = 0
    for k in range(mosaic.levels):
        if win / (mosaic.shape[0] / mosaic.r[k].shape[0]) >= 8:
            level = k
    return level


def _cm_crop_origins(
    mosaic: Any, win: int, step: int, min_tissue: float, min_mean: float | Sequence[float]
) -> Iterator[tuple[int, int]]:
    """Level-0 corners of the crops whose tissue and mean R / F pass, judged on a coarse level."""
    level = _analysis_level(mosaic, win)
    factor = mosaic.shape[0] / mosaic.r[level].shape[0]
    r_lo = np.asarray(mosaic.r[level].compute(), np.float32)
    f_lo = np.asarray(mosaic.f[level].compute(), np.float32)
    mask = otsu_tissue_mask(r_lo, f_lo)
    c = max(1, round(win / factor))
    tissue, mr, mf = (box_mean(a.astype(np.float32), c) for a in (mask, r_lo, f_lo))
    mins = [float(min_mean)] * 2 if np.isscalar(min_mean) else list(min_mean)
    h, w = mosaic.shape
    for y in range(0, h - win + 1, max(step, 1)):
        for x in range(0, w - win + 1, max(step, 1)):
            yl = min(int(y / factor), tissue.shape[0] - 1)
            xl = min(int(x / factor), tissue.shape[1] - 1)
            if tissue[yl, xl] >= min_tissue and mr[yl, xl] >= mins[0] and mf[yl, xl] >= mins[1]:
                yield y, x


def _read_cm_crop(mosaic: Any, y: int, x: int, win: int, size: int) -> list[np.ndarray]:
    """R and F of a level-0 window, resampled to ``size``² at 0.75 µm/px if need be."""
    r = np.asarray(mosaic.r[0][y : y + win, x : x + win].compute(), np.float32)
    f = np.asarray(mosaic.f[0][y : y + win, x : x + win].compute(), np.float32)
    if win == size:
        return [r, f]
    from skimage.transform import resize

    return [
        resize(a, (size, size), order=1, anti_aliasing=win > size).astype(np.float32)
        for a in (r, f)
    ]


def extract_cm_crops(
    mosaics: Sequence[str | Path],
    out: str | Path,
    size: int = 1024,
    overlap: int = 0,
    *,
    min_tissue: float = 0.5,
    min_mean: float | Sequence[float] = 0.05,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Cut tissue crops out of confocal mosaics into ``out`` (thesis §3.1, Combalia §2.3.1).

    The tissue mask (Otsu on the mean of R and F) and the mean grey levels are computed on
    the coarsest pyramid level whose crops are still ≥ 8 px, so a 100k-px slide is never held
    in memory; only the kept crops are read at full resolution. Crops are resized to
    0.75 µm/px if the mosaic has another pixel size.

    Parameters
    ----------
    mosaics
        Paths :func:`napari_confocal_stain.io.readers.open_mosaic` opens.
    out
        Output folder: ``<split>/<slide>_y<Y>_x<X>.tif`` (2 × size × size uint16: R, F) and
        ``manifest.csv``. Must not be inside an input folder.
    size, overlap
        Crop side and overlap in 0.75 µm/px pixels.
    min_tissue, min_mean
        As :func:`training.data.extract_crops`.
    val_fraction, seed
        Split by slide (:func:`training.data.split_by_slide`).
    progress
        ``progress(done, total)`` per slide.

    Returns
    -------
    list of dict
        The manifest rows.
    """
    from napari_confocal_stain.io.readers import open_mosaic

    out = Path(out)
    _check_output(out, mosaics)
    opened = [open_mosaic(p) for p in mosaics]
    splits = split_by_slide([m.name for m in opened], val_fraction, seed)
    rows: list[dict[str, Any]] = []
    for n, mosaic in enumerate(opened):
        zoom = mosaic.pixel_size_um / CM_PIXEL_SIZE_UM  # level-0 px → 0.75 µm px
        win = round(size / zoom)  # crop side in level-0 pixels
        step = round((size - overlap) / zoom)
        split = splits[mosaic.name]
        for y, x in _cm_crop_origins(mosaic, win, step, min_tissue, min_mean):
            name = f"{split}/{mosaic.name}_y{y}_x{x}.tif"
            _write_rf(out / name, *_read_cm_crop(mosaic, y, x, win, size))
            rows.append(_manifest_row(name, mosaic.name, split, "cm", y, x, size))
        if progress:
            progress(n + 1, len(opened))
    write_atomic(out / "manifest.csv", csv_text(rows, MANIFEST_FIELDS))
    return rows


# ------------------------------------------------------------------------------ H&E crops


def extract_he_crops(
    slides: Sequence[str | Path],
    out: str | Path,
    size: int = 1024,
    overlap: int = 0,
    *,
    pseudo: bool = False,
    min_tissue: float = 0.5,
    min_mean: float = 0.05,
    val_fraction: float = 0.2,
    seed: int = 0,
    pixel_size_um: float | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Cut tissue crops out of H&E slides resized to 0.75 µm/px (Combalia §2.3.2).

    As :func:`extract_cm_crops` (``size``, ``overlap``, ``min_tissue``, ``min_mean`` on the
    inverted luma, the split by slide, ``progress``; returns the manifest rows) for
    :func:`training.data.read_he` images, each read whole (so use moderately sized images),
    into ``<split>/<slide>_y<Y>_x<X>.png``. ``pseudo`` also writes the pseudo-confocal R/F of
    each crop (``…_rf.tif``, no speckle: the trainer adds fresh speckle), so the crop is a
    known-answer pair (kind ``pseudo``); ``pixel_size_um`` overrides every file's pixel size.
    """
    out = Path(out)
    _check_output(out, slides)
    splits = split_by_slide([Path(s).stem for s in slides], val_fraction, seed)
    kind = "pseudo" if pseudo else "he"
    rows: list[dict[str, Any]] = []
    for n, path in enumerate(slides):
        he = read_he(path, pixel_size_um)
        rgb = resize_to_pixel_size(he.rgb, he.pixel_size_um)
        signal = tissue_signal_he(rgb)
        mask = otsu_tissue_mask(signal)
        scale = hed_scale(rgb, mask)
        split = splits[he.name]
        for y, x in extract_crops(
            [signal], size, overlap, mask=mask, min_tissue=min_tissue, min_mean=min_mean
        ):
            crop = rgb[y : y + size, x : x + size]
            name = f"{split}/{he.name}_y{y}_x{x}.png"
            write_atomic(out / name, png_bytes(crop))
            if pseudo:
                _write_rf(out / name.replace(".png", "_rf.tif"), *pseudo_confocal(crop, scale))
            rows.append(_manifest_row(name, he.name, split, kind, y, x, size))
        if progress:
            progress(n + 1, len(slides))
    write_atomic(out / "manifest.csv", csv_text(rows, MANIFEST_FIELDS))
    return rows


# ---------------------------------------------------------------------------- reading back


def _crop_region(folder: Path, row: Mapping[str, str]) -> TissueRegion:
    import tifffile
    from skimage.io import imread

    path = folder / row["file"]
    if not path.is_file():
        raise MosaicError(path, "listed in manifest.csv but missing")
    y, x, size = int(row["y"]), int(row["x"]), int(row["size"])
    box = (y, y + size, x, x + size)
    if row["kind"] == "cm":
        rf = tifffile.imread(path).astype(np.float32) / 65535
        modes = np.ascontiguousarray(rf.transpose(1, 2, 0))
        return TissueRegion(
            None, np.ones(modes.shape[:2], bool), np.ones(2), row["slide"], box, modes=modes
        )
    rgb = to_unit_float(imread(path)[..., :3])
    return TissueRegion(rgb, np.ones(rgb.shape[:2], bool), hed_scale(rgb), row["slide"], box)


def load_crop_regions(
    folder: str | Path, split: str | None = None, kind: str | None = None
) -> list[TissueRegion]:
    """Crops written by :func:`extract_cm_crops` / :func:`extract_he_crops` as regions.

    Parameters
    ----------
    folder
        The crops folder (with ``manifest.csv``).
    split
        Keep only ``"train"`` or ``"val"`` crops.
    kind
        Keep only ``"cm"``, ``"he"`` or ``"pseudo"`` crops.

    Returns
    -------
    list of TissueRegion
        H&E crops fill ``rgb`` (and ``hed_scale`` from the crop itself); confocal crops fill
        ``modes``. Crops were kept for their tissue, so their masks are all True.
    """
    folder = Path(folder)
    regions = [
        _crop_region(folder, row)
        for row in read_manifest(folder / "manifest.csv")
        if not ((split and row["split"] != split) or (kind and row["kind"] != kind))
    ]
    if not regions:
        raise MosaicError(folder, f"no crops with split={split!r} kind={kind!r} in manifest.csv")
    return regions


# ----------------------------------------------------------------------------- the command


def _count(counts: dict[str, int], prefix: str, rows: Sequence[Mapping[str, Any]]) -> None:
    for r in rows:
        counts[f"{prefix}/{r['split']}"] = counts.get(f"{prefix}/{r['split']}", 0) + 1


def run_extract_crops(config: Mapping[str, Any], progress: bool = True) -> dict[str, int]:
    """Extract confocal crops (into ``out/cm``) and H&E crops (into ``out/he``).

    Parameters
    ----------
    config
        See :data:`DEFAULTS`.
    progress
        Print one line per slide.

    Returns
    -------
    dict
        Number of crops per kind and split, e.g. ``{"cm/train": 760, "he/val": 40}``.
    """
    out = Path(config["out"])
    if not config.get("cm") and not config.get("he"):
        raise ValueError("extract-crops needs confocal mosaics (cm) and/or H&E slides (he)")
    counts: dict[str, int] = {}

    def report(kind: str) -> Progress | None:
        if not progress:
            return None
        return lambda done, total: print(f"{kind}: {done}/{total} slides", flush=True)

    common = {k: config[k] for k in ("min_tissue", "val_fraction", "seed")}
    size, overlap = int(config["size"]), int(config["overlap"])
    if config.get("cm"):
        rows = extract_cm_crops(
            config["cm"],
            out / "cm",
            size,
            overlap,
            min_mean=config["min_mean"],
            progress=report("cm"),
            **common,
        )
        _count(counts, "cm", rows)
    if config.get("he"):
        rows = extract_he_crops(
            config["he"],
            out / "he",
            size,
            overlap,
            pseudo=bool(config["pseudo"]),
            min_mean=float(config["min_mean"]),
            pixel_size_um=config.get("pixel_size_um"),
            progress=report("he"),
            **common,
        )
        _count(counts, "he", rows)
    return counts
