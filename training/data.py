"""Training data: tissue crops, spatial and per-slide splits, pseudo-confocal pairs, samplers.

Everything here is plain numpy (plus a thin ``torch.utils.data.Dataset`` wrapper), following
thesis §3.1 and Combalia §2.3:

* **Tissue crops.** A crop is kept when an Otsu tissue mask covers enough of it *and* the mean
  grey level of every mode (R and F, or the inverted luminance of H&E) reaches a minimum
  (thesis: "only patches with a minimum mean grey level on both modes").
* **Resolution.** H&E is resized from its native µm/px to the confocal 0.75 µm/px (Combalia:
  1630² crops at 0.47 µm/px → 1024²), so structures have the same size in both domains.
* **Splits.** By slide (no slide in two splits), or — for the one-slide demonstration — by
  disjoint horizontal bands of one slide (:func:`band_regions`).
* **Pseudo-confocal pairs** from real H&E, whose H&E is the known answer: the hematoxylin
  optical density of ``skimage.color.rgb2hed`` becomes the F-like nuclear signal, the eosin
  density the R-like signal, with multiplicative speckle on R.
* **Reproducible sampling.** Every random choice of sample ``i`` comes from
  ``numpy.random.default_rng([seed, i])``: a run resumed at iteration ``k`` draws exactly the
  crops, flips and speckle an uninterrupted run would, with no RNG state to save.

Crops written to disk by ``python -m training extract-crops`` are :mod:`training.crops`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.color import rgb2hed
from skimage.filters import gaussian, threshold_otsu
from skimage.transform import rescale

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.core.linear_stain import linear_stain
from napari_confocal_stain.errors import MosaicError
from training.noise import add_speckle

__all__ = [
    "CM_PIXEL_SIZE_UM",
    "SAMPLE_KINDS",
    "YUV_LUMA",
    "Compose",
    "CropDataset",
    "HEImage",
    "PairedCropSampler",
    "RandomCrop",
    "RandomFlip",
    "TissueRegion",
    "band_regions",
    "band_split_defaults",
    "box_mean",
    "check_disjoint",
    "crop_positions",
    "dscm_tensor",
    "extract_crops",
    "hed_scale",
    "inverted_luma",
    "load_he_regions",
    "otsu_tissue_mask",
    "pseudo_confocal",
    "read_he",
    "regions_in",
    "resize_to_pixel_size",
    "split_by_slide",
    "split_regions",
    "stack_batch",
    "tile_grid_regions",
    "tissue_signal_he",
    "to_unit_float",
    "valid_crop_origins",
]

CM_PIXEL_SIZE_UM = 0.75
"""Pixel size of the Vivascope 2500 mosaics, the resolution every model is trained at."""
YUV_LUMA = (0.299, 0.587, 0.114)
"""BT.601 luma weights of the YUV Y channel (Combalia's "inverse of the Y channel")."""

SAMPLE_KINDS = ("he", "pseudo", "reflectance", "cm")
"""What a :class:`PairedCropSampler` can draw."""


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class HEImage:
    """An H&E image in memory.

    Attributes
    ----------
    rgb
        ``(H, W, 3)`` float32 in [0, 1].
    pixel_size_um
        µm per pixel of ``rgb``.
    name
        Slide name (file stem), used to split by slide.
    source
        The file it was read from.
    """

    rgb: np.ndarray
    pixel_size_um: float
    name: str
    source: str


_MPP = re.compile(r"MPP\s*=\s*([0-9.]+)")


def read_he(path: str | Path, pixel_size_um: float | None = None) -> HEImage:
    """Read an H&E slide or image at full resolution.

    Parameters
    ----------
    path
        An Aperio ``.svs`` / TIFF (level 0 through tifffile + imagecodecs, which decodes the
        JPEG tiles), or a PNG / JPEG.
    pixel_size_um
        µm/px; default: the Aperio ``MPP =`` tag or the TIFF resolution tags, else
        :data:`CM_PIXEL_SIZE_UM` (the image is taken to be at confocal resolution already).

    Returns
    -------
    HEImage

    Raises
    ------
    MosaicError
        Missing, unreadable or not an RGB image.
    """
    path = Path(path)
    if not path.is_file():
        raise MosaicError(path, "H&E image not found")
    found: float | None = None
    try:
        if path.suffix.lower() in (".svs", ".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                rgb = page.asarray()
                match = _MPP.search(page.description or "")
                if match:
                    found = float(match.group(1))
                else:
                    found = _tiff_um_per_px(page)
        else:
            from skimage.io import imread

            rgb = imread(path)
    except MosaicError:
        raise
    except Exception as exc:  # any decoder failure becomes one clear message
        raise MosaicError(path, f"cannot read the image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise MosaicError(path, f"expected an RGB image, got shape {rgb.shape}")
    rgb = to_unit_float(rgb[..., :3])
    size = pixel_size_um if pixel_size_um is not None else (found or CM_PIXEL_SIZE_UM)
    if not (np.isfinite(size) and size > 0):
        raise MosaicError(path, f"pixel size must be positive, got {size!r}")
    return HEImage(rgb=rgb, pixel_size_um=float(size), name=path.stem, source=str(path))


def _tiff_um_per_px(page: Any) -> float | None:
    """µm/px from TIFF XResolution + ResolutionUnit (2 = inch, 3 = cm), if present."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if num <= 0 or den <= 0 or unit not in (2, 3):
        return None
    per_unit = num / den  # pixels per inch or per cm
    return (25400.0 if unit == 2 else 10000.0) / per_unit


def to_unit_float(a: np.ndarray) -> np.ndarray:
    """An image as float32 in [0, 1] (integers divided by their type's maximum)."""
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) / np.iinfo(a.dtype).max).astype(np.float32)
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def resize_to_pixel_size(
    image: np.ndarray, from_um: float, to_um: float = CM_PIXEL_SIZE_UM
) -> np.ndarray:
    """Resample an image from ``from_um`` to ``to_um`` µm/px (anti-aliased when shrinking).

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, C)`` float image.
    from_um, to_um
        Source and target pixel sizes.

    Returns
    -------
    numpy.ndarray
        float32, ``round(H · from_um / to_um)`` rows (same for columns).
    """
    scale = float(from_um) / float(to_um)
    if abs(scale - 1.0) < 1e-6:
        return np.asarray(image, dtype=np.float32)
    channel_axis = -1 if image.ndim == 3 else None
    out = rescale(
        image, scale, order=1, channel_axis=channel_axis, anti_aliasing=scale < 1, mode="reflect"
    )
    return out.astype(np.float32)


# ------------------------------------------------------------------------------- signals


def inverted_luma(rgb: np.ndarray) -> np.ndarray:
    """``1 − Y`` of YUV: H&E turned into a reflectance-like image (Combalia §3.1).

    Tissue is dark in H&E and bright in reflectance; inverting the luma makes the histology
    structures bright on a dark background, as in RCM.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` float in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 in [0, 1].
    """
    y = np.asarray(rgb, dtype=np.float32) @ np.asarray(YUV_LUMA, dtype=np.float32)
    return np.clip(1.0 - y, 0.0, 1.0)


def tissue_signal_he(rgb: np.ndarray) -> np.ndarray:
    """Where H&E has tissue: the inverted luma (bright tissue, dark glass)."""
    return inverted_luma(rgb)


def otsu_tissue_mask(*modes: np.ndarray, smooth_sigma: float = 2.0) -> np.ndarray:
    """Tissue mask by Otsu's threshold on the (smoothed) mean of the modes.

    Parameters
    ----------
    *modes
        One or more ``(H, W)`` images where tissue is brighter than background (R and F of a
        confocal slide, or :func:`inverted_luma` of H&E).
    smooth_sigma
        Gaussian σ (pixels) applied first, so speckle and single nuclei do not punch holes.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool.
    """
    if not modes:
        raise ValueError("otsu_tissue_mask needs at least one image")
    mean = np.mean([np.asarray(m, dtype=np.float32) for m in modes], axis=0)
    if smooth_sigma > 0:
        mean = gaussian(mean, sigma=smooth_sigma, preserve_range=True)
    if float(mean.max()) == float(mean.min()):
        return np.zeros(mean.shape, bool)
    return mean > threshold_otsu(mean)


def hed_scale(rgb: np.ndarray, mask: np.ndarray | None = None, q: float = 99.5) -> np.ndarray:
    """Hematoxylin and eosin optical densities that map to 1 in :func:`pseudo_confocal`.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` H&E in [0, 1].
    mask
        Tissue mask; the percentiles are taken over tissue only (default: all pixels).
    q
        Percentile.

    Returns
    -------
    numpy.ndarray
        ``[h_max, e_max]``, float64, each > 0.
    """
    hed = rgb2hed(np.asarray(rgb, dtype=np.float64))
    sel = (slice(None),) if mask is None or not mask.any() else (mask,)
    scale = np.array(
        [np.percentile(hed[..., 0][sel], q), np.percentile(hed[..., 1][sel], q)], np.float64
    )
    return np.maximum(scale, 1e-6)


def pseudo_confocal(
    rgb: np.ndarray,
    scale: Sequence[float],
    rng: np.random.Generator | None = None,
    *,
    speckle: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A pseudo-confocal R/F pair from H&E, whose true H&E is ``rgb`` itself.

    ``F = clip(H_od / h_max)``: nuclei (hematoxylin) bright, as the nuclear fluorescence of
    acridine-orange stained tissue. ``R = clip(E_od / e_max) ⊙ S``: cytoplasm and collagen
    (eosin) bright, as reflectance, with multiplicative speckle ``S``.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` H&E in [0, 1].
    scale
        ``(h_max, e_max)`` from :func:`hed_scale` (computed once per slide, so every crop of
        the slide is mapped alike).
    rng
        Random generator for the speckle.
    speckle
        Keyword arguments of :func:`training.noise.add_speckle` (``model``, ``looks``,
        ``sigma``), or ``None`` for no speckle.

    Returns
    -------
    (r, f)
        Two ``(H, W)`` float32 images in [0, 1].
    """
    hed = rgb2hed(np.asarray(rgb, dtype=np.float64))
    f = np.clip(hed[..., 0] / scale[0], 0.0, 1.0).astype(np.float32)
    r = np.clip(hed[..., 1] / scale[1], 0.0, 1.0).astype(np.float32)
    if speckle:
        r = add_speckle(r, rng=rng, **dict(speckle))
    return r, f


def dscm_tensor(r: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The generators' input: the Gareau linear stain of ``(r, f)`` as ``(3, H, W)`` in [-1, 1]."""
    rgb = linear_stain(np.asarray(r, np.float32), np.asarray(f, np.float32))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)


# -------------------------------------------------------------------------------- crops


def crop_positions(shape: tuple[int, int], size: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of a regular grid of ``size``² crops with ``overlap`` pixels shared.

    Parameters
    ----------
    shape
        ``(H, W)`` of the image.
    size
        Crop side.
    overlap
        Pixels shared by neighbouring crops (0 ≤ overlap < size).

    Returns
    -------
    list of (y, x)
        Crops that fit entirely inside the image, row-major.
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need size ≥ 1 and 0 ≤ overlap < size, got {size}, {overlap}")
    step = size - overlap
    ys = range(0, shape[0] - size + 1, step)
    xs = range(0, shape[1] - size + 1, step)
    return [(y, x) for y in ys for x in xs]


def box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``a`` over every ``size``² window, indexed by its top-left corner."""
    s = np.pad(np.cumsum(np.cumsum(a, 0, dtype=np.float64), 1), ((1, 0), (1, 0)))
    total = s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]
    return total / (size * size)


def extract_crops(
    modes: Sequence[np.ndarray],
    size: int,
    overlap: int = 0,
    *,
    mask: np.ndarray | None = None,
    min_tissue: float = 0.5,
    min_mean: float | Sequence[float] = 0.05,
) -> list[tuple[int, int]]:
    """Grid crops that hold tissue (thesis §3.1, Combalia §2.3).

    Parameters
    ----------
    modes
        The modes (``(H, W)`` each, tissue bright): ``(R, F)`` of a confocal slide, or
        ``(inverted_luma(he),)``.
    size, overlap
        Crop side and overlap (see :func:`crop_positions`).
    mask
        Tissue mask (default: :func:`otsu_tissue_mask` of the modes).
    min_tissue
        Minimum fraction of the crop inside the mask.
    min_mean
        Minimum mean grey level of *every* mode over the crop (one value, or one per mode).

    Returns
    -------
    list of (y, x)
        Top-left corners of the kept crops.
    """
    if not modes:
        raise ValueError("extract_crops needs at least one mode")
    shape = modes[0].shape
    mins = [float(min_mean)] * len(modes) if np.isscalar(min_mean) else list(min_mean)
    if len(mins) != len(modes):
        raise ValueError(f"min_mean has {len(mins)} values for {len(modes)} modes")
    if mask is None:
        mask = otsu_tissue_mask(*modes)
    if shape[0] < size or shape[1] < size:
        return []
    tissue = box_mean(mask.astype(np.float32), size)
    means = [box_mean(np.asarray(m, np.float32), size) for m in modes]
    kept = []
    for y, x in crop_positions(shape, size, overlap):
        if tissue[y, x] >= min_tissue and all(
            m[y, x] >= t for m, t in zip(means, mins, strict=True)
        ):
            kept.append((y, x))
    return kept


def valid_crop_origins(
    mask: np.ndarray, size: int, min_tissue: float = 0.3, stride: int = 4
) -> np.ndarray:
    """Every top-left corner (on a ``stride`` grid) whose ``size``² crop is mostly tissue.

    Random crops are drawn among these, so a training crop is never just glass.

    Parameters
    ----------
    mask
        ``(H, W)`` bool tissue mask of a region.
    size
        Crop side.
    min_tissue
        Minimum tissue fraction of the crop.
    stride
        Grid step of the candidate corners.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int array of ``(y, x)``; empty if the region is smaller than ``size``.
    """
    h, w = mask.shape
    if h < size or w < size:
        return np.zeros((0, 2), int)
    frac = box_mean(mask.astype(np.float32), size)[::stride, ::stride]
    ys, xs = np.nonzero(frac >= min_tissue)
    return np.stack([ys * stride, xs * stride], axis=1)


# -------------------------------------------------------------------------------- splits


def band_regions(
    shape: tuple[int, int], bands: int = 6, order: Sequence[str] = ("source", "target", "heldout")
) -> dict[str, list[Box]]:
    """Split an image into disjoint horizontal bands assigned to splits in turn.

    Band ``k`` covers rows ``[k·H // bands, (k+1)·H // bands)`` and all columns and goes to
    ``order[k % len(order)]``; interleaving gives every split a share of the slide's top,
    middle and bottom.

    Parameters
    ----------
    shape
        ``(H, W)``.
    bands
        Number of bands.
    order
        Split names, cycled over the bands.

    Returns
    -------
    dict
        Split name → list of :data:`Box`.
    """
    if bands < len(order):
        raise ValueError(f"need at least {len(order)} bands for splits {tuple(order)}")
    h, w = shape
    out: dict[str, list[Box]] = {name: [] for name in order}
    for k in range(bands):
        out[order[k % len(order)]].append((k * h // bands, (k + 1) * h // bands, 0, w))
    return out


def band_split_defaults() -> dict[str, Any]:
    """The ``data`` entries every command starts from: the CC0 slide in 6 interleaved bands.

    ``he`` (the slides), ``pixel_size_um`` (None: from the file), ``bands`` and ``order``
    (band ``k`` goes to ``order[k % 3]``), read by :func:`split_regions`. The shipped models
    were trained and scored on this split; a fresh dict each call.
    """
    return {
        "he": ["${NCS_DATA}/he/cmu_small_region.svs"],
        "pixel_size_um": None,
        "bands": 6,
        "order": ["source", "target", "heldout"],
    }


def split_by_slide(names: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Assign whole slides to ``"train"`` or ``"val"`` (Combalia: 80 / 20 by origin slide).

    Parameters
    ----------
    names
        Slide names (duplicates are one slide).
    val_fraction
        Fraction of slides in validation; at least one slide goes to each split when there
        are two or more.
    seed
        Shuffle seed.

    Returns
    -------
    dict
        Slide name → ``"train"`` or ``"val"``.
    """
    unique = sorted(set(names))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    n_val = round(val_fraction * len(unique))
    if len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    else:
        n_val = 0
    return {name: ("val" if i < n_val else "train") for i, name in enumerate(order)}


# -------------------------------------------------------------------- regions of H&E slides


@dataclass
class TissueRegion:
    """One rectangular piece of an H&E slide at 0.75 µm/px, with its tissue mask.

    Attributes
    ----------
    rgb
        ``(H, W, 3)`` float32 in [0, 1] (H&E), or ``None`` for a confocal region.
    mask
        ``(H, W)`` bool tissue mask (Otsu over the whole slide, then cut).
    hed_scale
        The slide's ``(h_max, e_max)`` (see :func:`hed_scale`).
    slide, box
        Where it comes from (``box`` in 0.75 µm/px pixels of the resized slide).
    modes
        ``(H, W, 2)`` float32 R and F in [0, 1] of a confocal region (``rgb`` is then None).
    """

    rgb: np.ndarray | None
    mask: np.ndarray
    hed_scale: np.ndarray
    slide: str
    box: Box
    modes: np.ndarray | None = None
    _origins: dict[tuple[int, float], np.ndarray] = field(default_factory=dict, repr=False)

    def origins(self, size: int, min_tissue: float) -> np.ndarray:
        """Cached :func:`valid_crop_origins` for this region."""
        key = (size, min_tissue)
        if key not in self._origins:
            self._origins[key] = valid_crop_origins(self.mask, size, min_tissue)
        return self._origins[key]


def load_he_regions(
    paths: Sequence[str | Path],
    *,
    bands: int = 6,
    order: Sequence[str] = ("source", "target", "heldout"),
    pixel_size_um: float | None = None,
    cache: dict | None = None,
) -> dict[str, list[TissueRegion]]:
    """Read H&E slides, resize them to 0.75 µm/px and cut them into split regions.

    Parameters
    ----------
    paths
        H&E slides or images (see :func:`read_he`).
    bands, order
        The band split of every slide (see :func:`band_regions`); ``bands=0`` puts each
        whole slide into ``order[i % len(order)]`` (a split by slide).
    pixel_size_um
        Overrides the pixel size of every file.
    cache
        Optional dict reused between calls (keyed by path), to read a slide once.

    Returns
    -------
    dict
        Split name → regions.
    """
    out: dict[str, list[TissueRegion]] = {name: [] for name in order}
    for i, path in enumerate(paths):
        key = (str(path), pixel_size_um)
        if cache is not None and key in cache:
            rgb, mask, scale, name = cache[key]
        else:
            he = read_he(path, pixel_size_um)
            rgb = resize_to_pixel_size(he.rgb, he.pixel_size_um)
            mask = otsu_tissue_mask(tissue_signal_he(rgb))
            scale = hed_scale(rgb, mask)
            name = he.name
            if cache is not None:
                cache[key] = (rgb, mask, scale, name)
        if bands == 0:
            boxes = {order[i % len(order)]: [(0, rgb.shape[0], 0, rgb.shape[1])]}
        else:
            boxes = band_regions(rgb.shape[:2], bands, order)
        for split, split_boxes in boxes.items():
            for y0, y1, x0, x1 in split_boxes:
                out[split].append(
                    TissueRegion(
                        rgb=rgb[y0:y1, x0:x1],
                        mask=mask[y0:y1, x0:x1],
                        hed_scale=scale,
                        slide=name,
                        box=(y0, y1, x0, x1),
                    )
                )
    return out


# ------------------------------------------------------------------------ paired transforms


class RandomCrop:
    """The same random ``size``² crop of every array (``(H, W)`` or ``(H, W, C)``)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list:
        h, w = arrays[0].shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"cannot crop {self.size}² from a {h}×{w} image")
        y = int(rng.integers(0, h - self.size + 1))
        x = int(rng.integers(0, w - self.size + 1))
        return [a[y : y + self.size, x : x + self.size] for a in arrays]


class RandomFlip:
    """The same random horizontal / vertical flips (and 90° turn, optional) of every array."""

    def __init__(self, rotate: bool = False) -> None:
        self.rotate = bool(rotate)

    def __call__(self, arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list:
        flip_v, flip_h, turn = rng.integers(0, 2, size=3)
        out = []
        for a in arrays:
            if flip_v:
                a = a[::-1]
            if flip_h:
                a = a[:, ::-1]
            if self.rotate and turn:
                a = np.rot90(a)
            out.append(np.ascontiguousarray(a))
        return out


class Compose:
    """Apply paired transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list:
        arrays = list(arrays)
        for t in self.transforms:
            arrays = t(arrays, rng)
        return arrays


# -------------------------------------------------------------------------------- samplers


class PairedCropSampler:
    """Draw random tissue crops from regions, deterministically per sample index.

    Sample ``i`` uses ``default_rng([seed, i])``: it picks a region (weighted by its number of
    valid crop positions), a valid position, flips, and — for pseudo-confocal samples — the
    speckle. The same ``(seed, i)`` always gives the same sample, so a resumed run needs no
    RNG state.

    Parameters
    ----------
    regions
        Where crops come from.
    kind
        ``"he"`` → ``{"he": (3, s, s) in [-1, 1]}``; ``"pseudo"`` → ``{"dscm": (3, s, s) in
        [-1, 1], "r", "f": (1, s, s) in [0, 1], "he": the true H&E}``; ``"reflectance"`` →
        ``{"clean": (1, s, s) inverted luma in [0, 1]}`` (despeckle training; the noise is
        added by the trainer); ``"cm"`` → ``{"dscm", "r", "f"}`` from real confocal regions.
    seed
        Base seed.
    min_tissue
        Minimum tissue fraction of a crop.
    speckle
        Speckle of the pseudo-confocal R (see :func:`pseudo_confocal`).
    flips
        Random flips (and 90° turns).
    """

    def __init__(
        self,
        regions: Sequence[TissueRegion],
        kind: str,
        seed: int = 0,
        *,
        min_tissue: float = 0.3,
        speckle: Mapping[str, Any] | None = None,
        flips: bool = True,
    ) -> None:
        if kind not in SAMPLE_KINDS:
            raise ValueError(f"kind must be one of {SAMPLE_KINDS}, got {kind!r}")
        if not regions:
            raise ValueError(f"no regions to sample {kind!r} crops from")
        self.regions = list(regions)
        self.kind = kind
        self.seed = int(seed)
        self.min_tissue = float(min_tissue)
        self.speckle = dict(speckle) if speckle else None
        self.flip = RandomFlip(rotate=True) if flips else None

    def _pick(self, size: int, rng: np.random.Generator) -> tuple[TissueRegion, int, int]:
        counts = np.array([len(r.origins(size, self.min_tissue)) for r in self.regions], float)
        if counts.sum() == 0:
            raise ValueError(
                f"no {size}² crop of the {self.kind!r} regions has ≥ {self.min_tissue:.0%} "
                f"tissue; use smaller crops or a lower min_tissue"
            )
        k = int(rng.choice(len(self.regions), p=counts / counts.sum()))
        origins = self.regions[k].origins(size, self.min_tissue)
        y, x = origins[int(rng.integers(len(origins)))]
        return self.regions[k], int(y), int(x)

    def sample(self, index: int, size: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as a dict of float32 CHW arrays (see the class docstring)."""
        rng = np.random.default_rng([self.seed, int(index)])
        region, y, x = self._pick(size, rng)
        if self.kind == "cm":
            if region.modes is None:
                raise ValueError(f"region {region.slide} {region.box} holds no R/F modes")
            rf = region.modes[y : y + size, x : x + size]
            if self.flip is not None:
                (rf,) = self.flip([rf], rng)
            r, f = rf[..., 0], rf[..., 1]
            return {"dscm": dscm_tensor(r, f), "r": r[None].copy(), "f": f[None].copy()}
        if region.rgb is None:
            raise ValueError(f"region {region.slide} {region.box} holds no H&E")
        rgb = region.rgb[y : y + size, x : x + size]
        if self.flip is not None:
            (rgb,) = self.flip([rgb], rng)
        return self.convert(rgb, region.hed_scale, rng)

    def convert(
        self, rgb: np.ndarray, scale: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Turn an H&E crop into this sampler's sample kind."""
        he = np.ascontiguousarray(rgb.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)
        if self.kind == "he":
            return {"he": he}
        if self.kind == "reflectance":
            return {"clean": inverted_luma(rgb)[None]}
        r, f = pseudo_confocal(rgb, scale, rng, speckle=self.speckle)
        return {"dscm": dscm_tensor(r, f), "r": r[None], "f": f[None], "he": he}

    def batch(self, indices: Sequence[int], size: int) -> dict[str, torch.Tensor]:
        """Stack the samples ``indices`` into tensors ``(B, C, size, size)``."""
        samples = [self.sample(i, size) for i in indices]
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def stack_batch(columns: Mapping[str, Sequence[np.ndarray]]) -> dict[str, torch.Tensor]:
    """``{name: (B, …) float32 tensor}`` from per-sample arrays (one contiguous copy each)."""
    return {
        k: torch.from_numpy(np.ascontiguousarray(np.stack(v), dtype=np.float32))
        for k, v in columns.items()
    }


class CropDataset(torch.utils.data.Dataset):
    """A map-style dataset view of a :class:`PairedCropSampler` (``len`` samples of ``size``²).

    Parameters
    ----------
    sampler
        The sampler.
    size
        Crop side.
    length
        Number of samples (an "epoch").
    offset
        Index of the first sample (e.g. ``epoch · length``), so epochs differ.
    """

    def __init__(self, sampler: PairedCropSampler, size: int, length: int, offset: int = 0):
        self.sampler, self.size, self.length, self.offset = sampler, int(size), int(length), offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        sample = self.sampler.sample(self.offset + i, self.size)
        return {k: torch.from_numpy(v) for k, v in sample.items()}


def tile_grid_regions(
    regions: Sequence[TissueRegion], size: int, min_tissue: float = 0.5, limit: int | None = None
) -> list[tuple[TissueRegion, int, int]]:
    """Non-overlapping ``size``² tissue tiles of regions (held-out evaluation tiles).

    Parameters
    ----------
    regions
        Held-out regions.
    size
        Tile side.
    min_tissue
        Minimum tissue fraction of a tile.
    limit
        Keep at most this many (evenly spaced in the list).

    Returns
    -------
    list of (region, y, x)
    """
    tiles = []
    for region in regions:
        for y, x in extract_crops(
            [region.mask.astype(np.float32)],
            size,
            mask=region.mask,
            min_tissue=min_tissue,
            min_mean=0.0,
        ):
            tiles.append((region, y, x))
    if limit is not None and len(tiles) > limit:
        keep = np.linspace(0, len(tiles) - 1, limit).round().astype(int)
        tiles = [tiles[i] for i in keep]
    return tiles


# --------------------------------------------------------------------- regions of a config


def split_regions(data: Mapping[str, Any]) -> dict[str, list[TissueRegion]]:
    """:func:`load_he_regions` of a command's ``data`` section.

    Reads ``he`` (the slides), ``bands``, ``order`` and ``pixel_size_um``.
    """
    return load_he_regions(
        data["he"],
        bands=int(data["bands"]),
        order=data["order"],
        pixel_size_um=data.get("pixel_size_um"),
    )


def regions_in(
    regions: Mapping[str, Sequence[TissueRegion]], splits: Sequence[str]
) -> list[TissueRegion]:
    """The regions of ``splits`` (e.g. ``["source", "target"]``), in that order."""
    return [r for s in splits for r in regions[s]]


def check_disjoint(groups: Mapping[str, Sequence[TissueRegion]]) -> None:
    """Refuse groups of regions (training, validation, …) that share a piece of a slide.

    Raises
    ------
    ValueError
        Naming the first two groups that share a ``(slide, box)``.
    """
    boxes = {name: {(r.slide, r.box) for r in rs} for name, rs in groups.items()}
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = boxes[a] & boxes[b]
            if shared:
                raise ValueError(f"{a} and {b} regions overlap: {sorted(shared)}")
