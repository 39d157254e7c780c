"""Nuclei preservation: are the nuclei of the fluorescence still nuclei in the stain?

A clinician's main complaint about the thesis model (García 2019, §4.5) was erased
nuclei. This module makes that measurable:

1. detect nuclei in the fluorescence mode F (:func:`detect_nuclei_fluorescence`) and in
   the hematoxylin channel of the stained output (:func:`detect_nuclei_he`), both with
   the same scale-normalised Laplacian-of-Gaussian (LoG) blob detector;
2. match the two point sets one to one within a distance (:func:`match_nuclei`);
3. count per grid cell how many F nuclei were kept, erased, and how many output nuclei
   have no F counterpart (invented) (:func:`nuclei_preservation_map`).

Detector
    For nuclear diameters ``diameter_um = (d_min, d_max)`` at ``pixel_size_um``, the
    blob radii are ``r = d / 2 / pixel_size`` px and the LoG scales ``σ = r / √2``
    (the scale at which ``-σ² ∇²G_σ`` peaks on a disc of radius r), ``n_scales``
    geometrically spaced from ``σ(d_min)`` to ``σ(d_max)``. The response is the
    maximum over scales of ``-σ² ∇²(G_σ * image)``; nuclei are its local maxima over a
    ``(2⌊r_min⌋ + 1)²`` window that exceed ``threshold``. Two centres closer than the
    smallest diameter cannot be two nuclei (they would overlap), so of such peaks only
    the strongest is kept (greedy non-maximum suppression; this also merges the two
    peaks an elongated nucleus gives at the small scales). The radius reported is
    ``√2 σ`` of the winning scale (coarse: one of the ``n_scales`` values). The response
    is in image units: a bright disc of contrast ``c`` on a flat background gives about
    ``0.6 c``.

Hematoxylin
    ``skimage.color.rgb2hed(rgb)[..., 0]`` (Ruifrok & Johnston colour deconvolution)
    divided by the hematoxylin value of Gareau's nuclear colour ``H = [0.30, 0.20,
    1.0]`` (0.156), so a fully stained nucleus of the linear stain is 1.0, like a
    saturated nucleus in F, and one ``threshold`` serves both modes.

Large images are processed in tiles with a halo wider than the filters' support, so
the result is identical to a single pass over the whole image and memory stays bounded;
numpy, dask and zarr arrays (anything that slices to numpy) are accepted.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "HEMATOXYLIN_REF",
    "NucleiMatch",
    "NucleiPreservation",
    "detect_nuclei_fluorescence",
    "detect_nuclei_he",
    "hematoxylin",
    "match_nuclei",
    "nuclei_preservation_map",
]

#: rgb2hed hematoxylin of Gareau's nuclear colour [0.30, 0.20, 1.0], the unit of
#: :func:`hematoxylin`.
HEMATOXYLIN_REF = 0.15598158
_TRUNCATE = 4.0  # scipy's default Gaussian truncation, used for the halo width too
_TILE = 1024


# ------------------------------------------------------------------------- detection


def _scales(pixel_size_um: float, diameter_um: tuple[float, float], n_scales: int) -> np.ndarray:
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a number > 0, got {pixel_size_um!r}")
    try:
        d_min, d_max = (float(d) for d in diameter_um)
    except (TypeError, ValueError):
        raise ValueError(
            f"diameter_um must be (min, max) in micrometres, got {diameter_um!r}"
        ) from None
    if not (0 < d_min <= d_max and math.isfinite(d_max)):
        raise ValueError(f"diameter_um must satisfy 0 < min <= max, got {diameter_um!r}")
    if int(n_scales) < 1:
        raise ValueError(f"n_scales must be >= 1, got {n_scales!r}")
    r = np.array([d_min, d_max]) / 2.0 / pixel_size_um
    return np.geomspace(r[0] / math.sqrt(2), r[1] / math.sqrt(2), int(n_scales))


def _log_peaks(
    image: np.ndarray, sigmas: np.ndarray, threshold: float, footprint: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of the max-over-scales normalised LoG: rows, columns, scale index, response."""
    image = np.asarray(image, np.float32)
    best = np.full(image.shape, -np.inf, np.float32)
    which = np.zeros(image.shape, np.uint8)
    for i, s in enumerate(sigmas):
        response = ndi.gaussian_laplace(image, float(s), mode="reflect", truncate=_TRUNCATE)
        response *= np.float32(-s * s)
        better = response > best
        best[better] = response[better]
        which[better] = i
    peaks = (best == ndi.maximum_filter(best, size=footprint, mode="reflect")) & (best > threshold)
    labels, n = ndi.label(peaks, structure=np.ones((3, 3)))
    if n == 0:
        empty = np.empty(0, np.float64)
        return empty, empty, np.empty(0, np.intp), empty
    if n == int(peaks.sum()):  # the usual case: isolated single-pixel maxima
        ys, xs = np.nonzero(peaks)
        return (
            ys.astype(np.float64),
            xs.astype(np.float64),
            which[ys, xs].astype(np.intp),
            best[ys, xs].astype(np.float64),
        )
    # A plateau of equal maxima is one nucleus: its centroid, its first pixel's scale.
    idx = np.arange(1, n + 1)
    centres = np.array(ndi.center_of_mass(peaks, labels, idx), np.float64).reshape(-1, 2)
    first = ndi.minimum_position(np.arange(peaks.size).reshape(peaks.shape), labels, idx)
    scale = np.array([which[p] for p in first], np.intp)
    value = np.array([best[p] for p in first], np.float64)
    return centres[:, 0], centres[:, 1], scale, value


def _suppress(points: np.ndarray, response: np.ndarray, distance: float) -> np.ndarray:
    """Greedy non-maximum suppression: keep the strongest of peaks closer than ``distance``."""
    if len(points) < 2:
        return np.ones(len(points), bool)
    from scipy.spatial import cKDTree

    pairs = cKDTree(points[:, :2]).query_pairs(distance, output_type="ndarray")
    keep = np.ones(len(points), bool)
    if len(pairs) == 0:
        return keep
    # Strongest first; ties broken by position so the result does not depend on tiling.
    rank = np.empty(len(points), np.intp)
    rank[np.lexsort((points[:, 1], points[:, 0], -response))] = np.arange(len(points))
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs.tolist():
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    for i in sorted(neighbours, key=rank.__getitem__):
        if keep[i]:
            for j in neighbours[i]:
                if rank[j] > rank[i]:
                    keep[j] = False
    return keep


def _detect(
    image: Any,
    prepare: Any,
    pixel_size_um: float,
    diameter_um: tuple[float, float],
    threshold: float,
    n_scales: int,
    workers: int | None,
) -> np.ndarray:
    """Tiled LoG detection; ``prepare`` maps a numpy tile to the 2-D signal."""
    sigmas = _scales(float(pixel_size_um), diameter_um, n_scales)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    r_min = math.sqrt(2) * sigmas[0]
    footprint = 2 * math.floor(r_min) + 1
    # Every filter tap and the peak window of a tile's pixels lie inside its halo, so
    # tiles reproduce the whole-image result exactly.
    halo = int(_TRUNCATE * sigmas[-1] + 0.5) + footprint // 2 + 2
    height, width = int(image.shape[0]), int(image.shape[1])
    tiles = [(y, x) for y in range(0, height, _TILE) for x in range(0, width, _TILE)]

    def run(tile: tuple[int, int]) -> np.ndarray:
        y0, x0 = tile
        y1, x1 = min(height, y0 + _TILE), min(width, x0 + _TILE)
        hy0, hx0 = max(0, y0 - halo), max(0, x0 - halo)
        hy1, hx1 = min(height, y1 + halo), min(width, x1 + halo)
        signal = prepare(np.asarray(image[hy0:hy1, hx0:hx1]))
        ys, xs, scale, value = _log_peaks(signal, sigmas, threshold, footprint)
        ys += hy0
        xs += hx0
        own = (ys >= y0 - 0.5) & (ys < y1 - 0.5) & (xs >= x0 - 0.5) & (xs < x1 - 0.5)
        return np.column_stack([ys[own], xs[own], math.sqrt(2) * sigmas[scale[own]], value[own]])

    workers = max(1, min(len(tiles), workers or os.cpu_count() or 1))
    if workers == 1:
        parts = [run(t) for t in tiles]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="nuclei") as pool:
            parts = list(pool.map(run, tiles))
    out = np.concatenate(parts) if parts else np.empty((0, 4))
    out = out[_suppress(out, out[:, 3], 2 * r_min)]
    return out[np.lexsort((out[:, 1], out[:, 0])), :3]


def _check_image(image: Any, name: str, rgb: bool) -> None:
    shape = tuple(getattr(image, "shape", ()))
    ok = len(shape) == 3 and shape[2] == 3 if rgb else len(shape) == 2
    if not ok:
        want = "(H, W, 3) RGB" if rgb else "(H, W) grayscale"
        raise ValueError(f"{name} must be {want}, got shape {shape or type(image).__name__}")


def _as_float(tile: np.ndarray) -> np.ndarray:
    if np.issubdtype(tile.dtype, np.integer):
        from skimage.util import img_as_float32

        return img_as_float32(tile)
    return tile.astype(np.float32, copy=False)


def detect_nuclei_fluorescence(
    f: Any,
    pixel_size_um: float = 0.75,
    diameter_um: tuple[float, float] = (5.0, 14.0),
    threshold: float = 0.1,
    *,
    n_scales: int = 3,
    workers: int | None = None,
) -> np.ndarray:
    """Detect nuclei (bright blobs) in the fluorescence mode.

    Parameters
    ----------
    f
        ``(H, W)`` fluorescence, floats in [0, 1] (integers are scaled to [0, 1]);
        numpy, dask or zarr.
    pixel_size_um
        Pixel size in µm (Vivascope mosaics: 0.75).
    diameter_um
        Smallest and largest nuclear diameter in µm.
    threshold
        Minimum scale-normalised LoG response (about 0.6 × the nucleus's contrast).
    n_scales
        Number of LoG scales between the two diameters.
    workers
        Threads over 1024-px tiles (default one per CPU).

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` float64 rows ``(y, x, radius_px)``, sorted by ``(y, x)``.

    Raises
    ------
    ValueError
        Bad shape, pixel size, diameters, threshold or number of scales.
    """
    _check_image(f, "f", rgb=False)
    return _detect(f, _as_float, pixel_size_um, diameter_um, threshold, n_scales, workers)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin amount of an H&E-like RGB image, 1.0 = Gareau's nuclear colour.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` RGB in [0, 1] (integers are scaled to [0, 1]).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32: ``skimage.color.rgb2hed(rgb)[..., 0] / HEMATOXYLIN_REF``.
    """
    from skimage.color import rgb2hed

    hed = rgb2hed(_as_float(np.asarray(rgb)))
    return (hed[..., 0] / HEMATOXYLIN_REF).astype(np.float32)


def detect_nuclei_he(
    rgb: Any,
    pixel_size_um: float = 0.75,
    diameter_um: tuple[float, float] = (5.0, 14.0),
    threshold: float = 0.1,
    *,
    n_scales: int = 3,
    workers: int | None = None,
) -> np.ndarray:
    """Detect nuclei in the hematoxylin channel of an H&E-like stain.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` RGB in [0, 1] (e.g. the GAN stain); numpy, dask or zarr.
    pixel_size_um, diameter_um, threshold, n_scales, workers
        As for :func:`detect_nuclei_fluorescence`; ``threshold`` is in units of
        :func:`hematoxylin` (1.0 = a fully stained linear-stain nucleus).

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` float64 rows ``(y, x, radius_px)``, sorted by ``(y, x)``.

    Raises
    ------
    ValueError
        Bad shape or parameters.
    """
    _check_image(rgb, "rgb", rgb=True)
    return _detect(rgb, hematoxylin, pixel_size_um, diameter_um, threshold, n_scales, workers)


# -------------------------------------------------------------------------- matching


class NucleiMatch(NamedTuple):
    """One-to-one matching of two point sets (indices into the inputs)."""

    #: ``(M, 2)`` int: rows ``(index in a, index in b)``, closest pairs first.
    pairs: np.ndarray
    #: ``(M,)`` float: distance of each pair in pixels.
    distances: np.ndarray
    #: Indices of ``a`` without a partner (erased nuclei when ``a`` is the source).
    unmatched_a: np.ndarray
    #: Indices of ``b`` without a partner (invented nuclei when ``b`` is the output).
    unmatched_b: np.ndarray


def _points(p: Any, name: str) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.size == 0:
        return np.empty((0, 2))
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(
            f"{name} must be an (N, 2) or (N, 3) array of (y, x[, r]), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr[:, :2])):
        raise ValueError(f"{name} has non-finite coordinates")
    return arr[:, :2]


def match_nuclei(a: Any, b: Any, radius_px: float) -> NucleiMatch:
    """Match two sets of nuclei one to one, closest pairs first, within a radius.

    Greedy by distance: all pairs closer than ``radius_px`` are sorted by distance
    (ties by index in ``a``, then ``b``) and accepted while both ends are free. Each
    point is used at most once, so duplicates in one set cannot share a partner.

    Parameters
    ----------
    a, b
        ``(N, 2)`` or ``(N, 3)`` arrays of ``(y, x[, radius])`` in pixels (may be empty).
    radius_px
        Largest centre distance of a match (inclusive).

    Returns
    -------
    NucleiMatch
        Pairs, their distances, and the unmatched indices of each set.

    Raises
    ------
    ValueError
        Malformed points or a negative radius.
    """
    pa, pb = _points(a, "a"), _points(b, "b")
    radius = float(radius_px)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius_px must be a number >= 0, got {radius_px!r}")
    empty = np.empty(0, np.intp)
    if len(pa) == 0 or len(pb) == 0:
        return NucleiMatch(
            np.empty((0, 2), np.intp), np.empty(0), np.arange(len(pa)), np.arange(len(pb))
        )
    from scipy.spatial import cKDTree

    candidates = cKDTree(pa).sparse_distance_matrix(cKDTree(pb), radius, output_type="ndarray")
    ia, ib, dist = candidates["i"], candidates["j"], candidates["v"]
    order = np.lexsort((ib, ia, dist))
    used_a = np.zeros(len(pa), bool)
    used_b = np.zeros(len(pb), bool)
    keep = []
    for k, i, j in zip(order.tolist(), ia[order].tolist(), ib[order].tolist(), strict=True):
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            keep.append(k)
    keep_arr = np.asarray(keep, np.intp) if keep else empty
    pairs = np.column_stack([ia[keep_arr], ib[keep_arr]]).astype(np.intp).reshape(-1, 2)
    return NucleiMatch(pairs, dist[keep_arr], np.flatnonzero(~used_a), np.flatnonzero(~used_b))


# ---------------------------------------------------------------------- per-cell map


@dataclass
class NucleiPreservation:
    """Per-cell and slide-wide nuclei preservation between F and a stained output.

    All maps are ``(ceil(H/cell), ceil(W/cell))``; a nucleus belongs to the cell holding
    its centre (matched pairs and erased nuclei: the F centre; invented: the output's).
    """

    cell: int
    #: F nuclei with an output partner / F nuclei, per cell (NaN where F has none).
    preserved_fraction: np.ndarray
    #: F nuclei per cell.
    source_count: np.ndarray
    #: F nuclei with a partner, per cell.
    matched_count: np.ndarray
    #: F nuclei without a partner, per cell.
    erased_count: np.ndarray
    #: Output nuclei without an F partner, per cell.
    invented_count: np.ndarray
    #: ``(N, 3)`` F detections ``(y, x, radius_px)``.
    source_nuclei: np.ndarray
    #: ``(M, 3)`` output detections.
    output_nuclei: np.ndarray
    #: The matching (indices into ``source_nuclei`` / ``output_nuclei``).
    match: NucleiMatch
    #: Slide totals: ``source``, ``output``, ``matched``, ``erased``, ``invented`` and
    #: ``preserved_fraction``.
    totals: dict[str, float] = field(default_factory=dict)

    @property
    def erased_points(self) -> np.ndarray:
        """``(K, 2)`` ``(y, x)`` of erased nuclei, for a napari Points layer."""
        return self.source_nuclei[self.match.unmatched_a, :2]

    @property
    def invented_points(self) -> np.ndarray:
        """``(L, 2)`` ``(y, x)`` of invented nuclei, for a napari Points layer."""
        return self.output_nuclei[self.match.unmatched_b, :2]

    @property
    def preserved_points(self) -> np.ndarray:
        """``(M, 2)`` ``(y, x)`` of F nuclei that were kept."""
        return self.source_nuclei[self.match.pairs[:, 0], :2]


def _cell_counts(points: np.ndarray, cell: int, grid: tuple[int, int]) -> np.ndarray:
    if len(points) == 0:
        return np.zeros(grid, np.int64)
    # Centres are pixel coordinates; a centre at y belongs to the cell of pixel round(y).
    iy = np.clip(np.floor(points[:, 0] + 0.5).astype(np.intp) // cell, 0, grid[0] - 1)
    ix = np.clip(np.floor(points[:, 1] + 0.5).astype(np.intp) // cell, 0, grid[1] - 1)
    return np.bincount(iy * grid[1] + ix, minlength=grid[0] * grid[1]).reshape(grid)


def nuclei_preservation_map(
    f: Any,
    output_rgb: Any,
    cell: int = 512,
    pixel_size_um: float = 0.75,
    *,
    diameter_um: tuple[float, float] = (5.0, 14.0),
    threshold_f: float = 0.1,
    threshold_he: float = 0.1,
    match_um: float | None = None,
    workers: int | None = None,
) -> NucleiPreservation:
    """Which F nuclei survive in the stained output, per grid cell and per slide.

    Parameters
    ----------
    f
        ``(H, W)`` fluorescence in [0, 1] (the source of the nuclear signal).
    output_rgb
        ``(H, W, 3)`` stained output (e.g. the GAN stain) in [0, 1].
    cell
        Grid cell side in pixels.
    pixel_size_um, diameter_um
        As for :func:`detect_nuclei_fluorescence`.
    threshold_f, threshold_he
        Detection thresholds in F and in the output's hematoxylin.
    match_um
        Largest distance between an F nucleus and its output partner, in µm
        (default: the smallest nuclear diameter).
    workers
        Threads for detection.

    Returns
    -------
    NucleiPreservation
        Per-cell maps, slide totals, detections, matching and point lists.

    Raises
    ------
    ValueError
        Mismatched shapes or bad parameters.
    """
    _check_image(f, "f", rgb=False)
    _check_image(output_rgb, "output_rgb", rgb=True)
    if tuple(f.shape[:2]) != tuple(output_rgb.shape[:2]):
        raise ValueError(
            f"f and output_rgb differ in size: {tuple(f.shape[:2])} vs "
            f"{tuple(output_rgb.shape[:2])}"
        )
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 1:
        raise ValueError(f"cell must be a positive integer number of pixels, got {cell!r}")
    cell = int(cell)
    source = detect_nuclei_fluorescence(
        f, pixel_size_um, diameter_um, threshold_f, workers=workers
    )
    output = detect_nuclei_he(
        output_rgb, pixel_size_um, diameter_um, threshold_he, workers=workers
    )
    match_px = (float(diameter_um[0]) if match_um is None else float(match_um)) / float(
        pixel_size_um
    )
    match = match_nuclei(source, output, match_px)
    grid = (-(-int(f.shape[0]) // cell), -(-int(f.shape[1]) // cell))
    n_source = _cell_counts(source, cell, grid)
    matched = _cell_counts(source[match.pairs[:, 0]], cell, grid)
    erased = _cell_counts(source[match.unmatched_a], cell, grid)
    invented = _cell_counts(output[match.unmatched_b], cell, grid)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n_source > 0, matched / np.maximum(n_source, 1), np.nan)
    totals = {
        "source": float(len(source)),
        "output": float(len(output)),
        "matched": float(len(match.pairs)),
        "erased": float(len(match.unmatched_a)),
        "invented": float(len(match.unmatched_b)),
        "preserved_fraction": len(match.pairs) / len(source) if len(source) else math.nan,
    }
    return NucleiPreservation(
        cell, fraction, n_source, matched, erased, invented, source, output, match, totals
    )
