"""Training data: tissue crops, spatial and per-slide splits, pseudo-confocal pairs, datasets.

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
"""

from __future__ import annotations

import csv
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
    "EXTRACT_DEFAULTS",
    "SAMPLE_KINDS",
    "YUV_LUMA",
    "Box",
    "CropDataset",
    "HEImage",
    "PairedCropSampler",
    "RandomCrop",
    "RandomFlip",
    "TissueRegion",
    "band_regions",
    "crop_positions",
    "dscm_tensor",
    "extract_cm_crops",
    "extract_crops",
    "extract_he_crops",
    "hed_scale",
    "inverted_luma",
    "load_crop_regions",
    "load_he_regions",
    "otsu_tissue_mask",
    "pseudo_confocal",
    "read_he",
    "read_manifest",
    "resize_to_pixel_size",
    "run_extract_crops",
    "split_by_slide",
    "tile_grid_regions",
    "tissue_signal_he",
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
    rgb = _to_unit_float(rgb[..., :3])
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


def _to_unit_float(a: np.ndarray) -> np.ndarray:
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


def _box_mean(a: np.ndarray, size: int) -> np.ndarray:
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
    tissue = _box_mean(mask.astype(np.float32), size)
    means = [_box_mean(np.asarray(m, np.float32), size) for m in modes]
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
    frac = _box_mean(mask.astype(np.float32), size)[::stride, ::stride]
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


# ------------------------------------------------------------------------------ manifests


MANIFEST_FIELDS = ("file", "slide", "split", "kind", "y", "x", "size", "pixel_size_um")


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


# --------------------------------------------------------------------------- extract-crops


def _tiff_bytes(array: np.ndarray) -> bytes:
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib", photometric="minisblack")
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_manifest(out: Path, rows: list[dict[str, Any]]) -> Path:
    import io

    from training.runstate import write_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_atomic(out / "manifest.csv", buf.getvalue())


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
    progress: Callable[[int, int], None] | None = None,
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
        As :func:`extract_crops`.
    val_fraction, seed
        Split by slide (:func:`split_by_slide`).
    progress
        ``progress(done, total)`` per slide.

    Returns
    -------
    list of dict
        The manifest rows.
    """
    from napari_confocal_stain.io.readers import open_mosaic
    from training.runstate import write_atomic

    out = Path(out)
    _check_output(out, mosaics)
    opened = [open_mosaic(p) for p in mosaics]
    splits = split_by_slide([m.name for m in opened], val_fraction, seed)
    rows: list[dict[str, Any]] = []
    for n, mosaic in enumerate(opened):
        zoom = mosaic.pixel_size_um / CM_PIXEL_SIZE_UM  # level-0 px → 0.75 µm px
        win = round(size / zoom)  # crop side in level-0 pixels
        step = round((size - overlap) / zoom)
        level = 0
        for k in range(mosaic.levels):
            factor = mosaic.shape[0] / mosaic.r[k].shape[0]
            if win / factor >= 8:
                level = k
        factor = mosaic.shape[0] / mosaic.r[level].shape[0]
        r_lo = np.asarray(mosaic.r[level].compute(), np.float32)
        f_lo = np.asarray(mosaic.f[level].compute(), np.float32)
        mask = otsu_tissue_mask(r_lo, f_lo)
        c = max(1, round(win / factor))
        tissue, mr, mf = (_box_mean(a.astype(np.float32), c) for a in (mask, r_lo, f_lo))
        mins = [float(min_mean)] * 2 if np.isscalar(min_mean) else list(min_mean)
        split = splits[mosaic.name]
        h, w = mosaic.shape
        for y in range(0, h - win + 1, max(step, 1)):
            for x in range(0, w - win + 1, max(step, 1)):
                yl = min(int(y / factor), tissue.shape[0] - 1)
                xl = min(int(x / factor), tissue.shape[1] - 1)
                if tissue[yl, xl] < min_tissue or mr[yl, xl] < mins[0] or mf[yl, xl] < mins[1]:
                    continue
                r = np.asarray(mosaic.r[0][y : y + win, x : x + win].compute(), np.float32)
                f = np.asarray(mosaic.f[0][y : y + win, x : x + win].compute(), np.float32)
                if win != size:  # another pixel size: resample to exactly size² at 0.75 µm/px
                    from skimage.transform import resize

                    r, f = (
                        resize(a, (size, size), order=1, anti_aliasing=win > size).astype(
                            np.float32
                        )
                        for a in (r, f)
                    )
                name = f"{split}/{mosaic.name}_y{y}_x{x}.tif"
                rf = np.stack([r, f]) * 65535 + 0.5
                write_atomic(out / name, _tiff_bytes(rf.astype(np.uint16)))
                rows.append(
                    {
                        "file": name,
                        "slide": mosaic.name,
                        "split": split,
                        "kind": "cm",
                        "y": y,
                        "x": x,
                        "size": size,
                        "pixel_size_um": CM_PIXEL_SIZE_UM,
                    }
                )
        if progress:
            progress(n + 1, len(opened))
    _write_manifest(out, rows)
    return rows


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
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Cut tissue crops out of H&E slides resized to 0.75 µm/px (Combalia §2.3.2).

    Parameters
    ----------
    slides
        H&E files (:func:`read_he`; each is read whole, so use moderately sized images).
    out
        Output folder: ``<split>/<slide>_y<Y>_x<X>.png`` and ``manifest.csv``.
    size, overlap
        Crop side and overlap at 0.75 µm/px.
    pseudo
        Also write the pseudo-confocal R/F of each crop (``…_rf.tif``, no speckle: the
        trainer adds fresh speckle), so the crop is a known-answer pair (kind ``pseudo``).
    min_tissue, min_mean
        As :func:`extract_crops` on the inverted luma.
    val_fraction, seed
        Split by slide.
    pixel_size_um
        Overrides every file's pixel size.
    progress
        ``progress(done, total)`` per slide.

    Returns
    -------
    list of dict
        The manifest rows.
    """
    from training.runstate import write_atomic

    out = Path(out)
    _check_output(out, slides)
    names = [Path(s).stem for s in slides]
    splits = split_by_slide(names, val_fraction, seed)
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
            write_atomic(out / name, _png_bytes(crop))
            kind = "he"
            if pseudo:
                r, f = pseudo_confocal(crop, scale)
                rf = np.stack([r, f]) * 65535 + 0.5
                write_atomic(
                    out / name.replace(".png", "_rf.tif"), _tiff_bytes(rf.astype(np.uint16))
                )
                kind = "pseudo"
            rows.append(
                {
                    "file": name,
                    "slide": he.name,
                    "split": split,
                    "kind": kind,
                    "y": y,
                    "x": x,
                    "size": size,
                    "pixel_size_um": CM_PIXEL_SIZE_UM,
                }
            )
        if progress:
            progress(n + 1, len(slides))
    _write_manifest(out, rows)
    return rows


def _check_output(out: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse to write crops into (or above) an input's folder."""
    out = out.resolve()
    for p in inputs:
        folder = Path(p).resolve()
        folder = folder if folder.is_dir() else folder.parent
        if out == folder or folder in out.parents:
            raise MosaicError(out, f"refusing to write crops inside the input folder {folder}")


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
    import tifffile
    from skimage.io import imread

    folder = Path(folder)
    regions = []
    for row in read_manifest(folder / "manifest.csv"):
        if (split and row["split"] != split) or (kind and row["kind"] != kind):
            continue
        path = folder / row["file"]
        if not path.is_file():
            raise MosaicError(path, "listed in manifest.csv but missing")
        y, x, size = int(row["y"]), int(row["x"]), int(row["size"])
        box = (y, y + size, x, x + size)
        if row["kind"] == "cm":
            rf = tifffile.imread(path).astype(np.float32) / 65535
            modes = np.ascontiguousarray(rf.transpose(1, 2, 0))
            regions.append(
                TissueRegion(
                    None,
                    np.ones(modes.shape[:2], bool),
                    np.ones(2),
                    row["slide"],
                    box,
                    modes=modes,
                )
            )
        else:
            rgb = _to_unit_float(imread(path)[..., :3])
            regions.append(
                TissueRegion(rgb, np.ones(rgb.shape[:2], bool), hed_scale(rgb), row["slide"], box)
            )
    if not regions:
        raise MosaicError(folder, f"no crops with split={split!r} kind={kind!r} in manifest.csv")
    return regions


EXTRACT_DEFAULTS: dict[str, Any] = {
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


def run_extract_crops(config: Mapping[str, Any], progress: bool = True) -> dict[str, int]:
    """Extract confocal crops (into ``out/cm``) and H&E crops (into ``out/he``).

    Parameters
    ----------
    config
        See :data:`EXTRACT_DEFAULTS`.
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

    def report(kind: str) -> Callable[[int, int], None] | None:
        if not progress:
            return None
        return lambda done, total: print(f"{kind}: {done}/{total} slides", flush=True)

    common = {k: config[k] for k in ("min_tissue", "val_fraction", "seed")}
    if config.get("cm"):
        rows = extract_cm_crops(
            config["cm"],
            out / "cm",
            int(config["size"]),
            int(config["overlap"]),
            min_mean=config["min_mean"],
            progress=report("cm"),
            **common,
        )
        for r in rows:
            counts[f"cm/{r['split']}"] = counts.get(f"cm/{r['split']}", 0) + 1
    if config.get("he"):
        rows = extract_he_crops(
            config["he"],
            out / "he",
            int(config["size"]),
            int(config["overlap"]),
            pseudo=bool(config["pseudo"]),
            min_mean=float(config["min_mean"]),
            pixel_size_um=config.get("pixel_size_um"),
            progress=report("he"),
            **common,
        )
        for r in rows:
            counts[f"he/{r['split']}"] = counts.get(f"he/{r['split']}", 0) + 1
    return counts
