"""Calibrated hallucination flags: which grid cells of a GAN stain deserve a pathologist's look.

:func:`flag_hallucinations` compares a stained output with the confocal pair it was made
from, cell by cell, with several cheap signals (each "higher = more suspicious"), scales
each by its median ``m_k`` and threshold ``t_k`` calibrated for the model and the cell size,
and flags a tissue cell when any signal exceeds its threshold::

    ratio_k = max(0, s_k − m_k) / ((t_k − m_k) · c)
    score   = max_k ratio_k          flagged = tissue and score > 1
    reasons = the k with ratio_k > 1

The thresholds come from known-good held-out pairs stained by the same model
(``python -m training calibrate``): each signal's ``q``-quantile over known-good tissue
cells, one ``q`` for all signals chosen so that a target share of those cells is flagged by
any signal, and ``c ≥ 1`` (the combined threshold) chosen so that the same share holds
leave one image out — known-good levels differ more between tissues than within one, so
in-sample quantiles are optimistic on a slide the calibration never saw; stored in the
checkpoint's metadata under ``extra.flag_calibration`` (see
:class:`FlagCalibration`). Signals (exact definitions in ``docs/flags.md``):

``lbp_chi2``          χ² distance of the cell's 256-code LBP histograms, linear stain vs
                      output (thesis §3.5; :mod:`napari_confocal_stain.core.metrics`).
``ssim``              1 − SSIM of the cell (thesis §3.5).
``structure``         1 − the lowest local SSIM in the cell (SSIM map averaged over a
                      12 µm Gaussian window): a patch whose structure is not the input's.
``colour``            largest local improbability of the output's colour under the model's
                      calibrated palette (optical-density chromaticities), over the cell's
                      median: blotches.
``texture``           largest local output detail the input does not explain (three bands,
                      log units against the input's detail), over the cell's median.
``detail_loss``       largest local loss of the input's detail (three bands), over the
                      cell's median: smeared or flattened (mode-collapse) patches.
``periodic``          largest local power at the checkerboard frequencies of stride-2
                      upsampling (periods 2, 4, 8 px), output against input, over the
                      cell's median.
``erased_nuclei``     strongest F nucleus without hematoxylin at its place: F's LoG
                      response minus the output hematoxylin's through the model's gain.
``invented_nuclei``   strongest hematoxylin nucleus where F is flat (same units).

Tissue: a pixel is tissue where ``max(R, F)``, smoothed with a 2 µm Gaussian, exceeds
:data:`TISSUE_LEVEL` (glass and mounting medium return almost neither reflectance nor
fluorescence); a cell is a tissue cell when at least :data:`MIN_TISSUE_FRACTION` of it is
tissue. Local signals look at tissue half a window inside its border, nuclei only on
tissue; background cells are never flagged (score 0).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "CALIBRATION_KEY",
    "MAX_CELL",
    "MIN_CELL",
    "MIN_TISSUE_FRACTION",
    "SIGNALS",
    "TISSUE_LEVEL",
    "FlagCalibration",
    "flag_hallucinations",
    "flag_signals",
    "load_calibration",
    "reasons_text",
]

#: Every signal, in the order of the ``reasons`` text.
SIGNALS = (
    "lbp_chi2",
    "ssim",
    "structure",
    "colour",
    "texture",
    "detail_loss",
    "periodic",
    "erased_nuclei",
    "invented_nuclei",
)
#: Key of the calibration inside the checkpoint metadata's ``extra`` object.
CALIBRATION_KEY = "flag_calibration"
#: Version of the signal definitions; a calibration of another version is refused.
SIGNALS_VERSION = 1
#: Smallest and largest cell side (pixels) :func:`flag_hallucinations` accepts.
MIN_CELL, MAX_CELL = 64, 1024
#: Smoothed ``max(R, F)`` above this is tissue.
TISSUE_LEVEL = 0.1
#: A cell with at least this fraction of tissue pixels is a tissue cell.
MIN_TISSUE_FRACTION = 0.02

_WINDOW_UM = 12.0  # σ of the local window: about two nuclei across
_TISSUE_SMOOTH_UM = 2.0
_COLOUR_SMOOTH_UM = 2.0
_NUCLEUS_UM = (5.0, 14.0)  # nuclear diameters, as core.nuclei
_GATHER_UM = 2.5  # a nucleus "is there" in the other image within this distance
_ENERGY_FLOOR = 1e-4  # (0.01)²: below a 1 % luminance ripple, detail energies are equal
_PERIODS = (1, 2, 4)  # half-periods (px) of the checkerboards of 1, 2, 3 stride-2 ups
_TRUNCATE = 3.0
_PALETTE_BINS = 48
_COLOURED_OD = 0.3  # summed optical density below this is near-white: no chromaticity
_MIN_GAIN_NUCLEI = 5  # clear F nuclei a cell needs for its own gain
# F at a stain nucleus explains up to this many times its response (a model renders some
# nuclei darker than others; measured: the stain-unet's hematoxylin blobs where F is flat
# stay below 0.12 F units, painted ones reach 0.15-0.4).
_INVENTED_F_WEIGHT = 2.0


# --------------------------------------------------------------------------- helpers


def _gauss(a: np.ndarray, sigma: float | tuple) -> np.ndarray:
    return ndi.gaussian_filter(a, sigma, mode="reflect", truncate=_TRUNCATE)


def _grid(shape: tuple[int, ...], cell: int) -> tuple[int, int]:
    return -(-int(shape[0]) // cell), -(-int(shape[1]) // cell)


class _Cells:
    """Reductions of lattice samples into grid cells (max, median, mean over a mask)."""

    def __init__(self, ys: np.ndarray, xs: np.ndarray, cell: int, grid: tuple[int, int]):
        self.ys, self.xs, self.cell, self.grid = ys, xs, cell, grid
        self.ry = np.searchsorted(ys, np.arange(grid[0]) * cell)
        self.rx = np.searchsorted(xs, np.arange(grid[1]) * cell)

    def max(self, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        a = np.where(mask, v, -np.inf)
        a = np.maximum.reduceat(np.maximum.reduceat(a, self.ry, axis=0), self.rx, axis=1)
        return np.where(np.isfinite(a), a, np.nan)

    def covered(self) -> np.ndarray:
        """Cells holding at least one lattice sample (an edge sliver narrower than the
        lattice step holds none: it has no signals and counts as background)."""
        ny = np.diff(np.r_[self.ry, len(self.ys)]) > 0
        nx = np.diff(np.r_[self.rx, len(self.xs)]) > 0
        return ny[:, None] & nx[None, :]

    def mean(self, v: np.ndarray) -> np.ndarray:
        s = np.add.reduceat(np.add.reduceat(v.astype(np.float64), self.ry, 0), self.rx, 1)
        n = np.add.reduceat(np.add.reduceat(np.ones(v.shape), self.ry, 0), self.rx, 1)
        return s / n

    def blocks(self):
        ey = np.r_[self.ry[1:], len(self.ys)]
        ex = np.r_[self.rx[1:], len(self.xs)]
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                yield i, j, (slice(self.ry[i], ey[i]), slice(self.rx[j], ex[j]))

    def median(self, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.full(self.grid, np.nan)
        for i, j, sl in self.blocks():
            m = mask[sl]
            if m.any():
                out[i, j] = float(np.median(v[sl][m]))
        return out

    def expand(self, per_cell: np.ndarray) -> np.ndarray:
        """A per-cell map broadcast to the lattice."""
        iy = np.minimum(self.ys // self.cell, self.grid[0] - 1)
        ix = np.minimum(self.xs // self.cell, self.grid[1] - 1)
        return per_cell[np.ix_(iy, ix)]


def _log_response(image: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Max over scales of the scale-normalised LoG, as core.nuclei's detector uses."""
    r = np.array(_NUCLEUS_UM) / 2.0 / pixel_size_um
    sigmas = np.geomspace(r[0] / math.sqrt(2), r[1] / math.sqrt(2), 3)
    best = None
    for s in sigmas:
        resp = ndi.gaussian_laplace(image, float(s), mode="reflect", truncate=4.0)
        resp *= np.float32(-s * s)
        best = resp if best is None else np.maximum(best, resp, out=best)
    return best


def _gather_max(m: np.ndarray, pts: np.ndarray, radius: float) -> np.ndarray:
    """Largest value of ``m`` within ``radius`` px of each point."""
    if len(pts) == 0:
        return np.zeros(0)
    k = max(0, math.ceil(radius))
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    sel = oy**2 + ox**2 <= radius**2 + 1e-9
    oy, ox = oy[sel], ox[sel]
    y = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.intp)[:, None] + oy, 0, m.shape[0] - 1)
    x = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.intp)[:, None] + ox, 0, m.shape[1] - 1)
    return m[y, x].max(axis=1).astype(np.float64)


def _on(mask: np.ndarray, pts: np.ndarray) -> np.ndarray:
    if len(pts) == 0:
        return np.zeros(0, bool)
    y = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.intp), 0, mask.shape[0] - 1)
    x = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.intp), 0, mask.shape[1] - 1)
    return mask[y, x]


def _point_index(pts: np.ndarray, cell: int, grid: tuple[int, int]):
    iy = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.intp) // cell, 0, grid[0] - 1)
    ix = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.intp) // cell, 0, grid[1] - 1)
    return iy, ix


def _point_cells(pts: np.ndarray, values: np.ndarray, cell: int, grid: tuple[int, int]):
    out = np.zeros(grid)
    if len(pts) == 0:
        return out
    iy = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.intp) // cell, 0, grid[0] - 1)
    ix = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.intp) // cell, 0, grid[1] - 1)
    np.maximum.at(out, (iy, ix), np.maximum(values, 0.0))
    return out


def _ssim_pixels(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (Gaussian σ 1.5, K1 0.01, K2 0.03, data range 1)."""
    s = 1.5
    mx, my = _gauss(x, s), _gauss(y, s)
    sxx = _gauss(x * x, s) - mx * mx
    syy = _gauss(y * y, s) - my * my
    sxy = _gauss(x * y, s) - mx * my
    c1, c2 = np.float32(1e-4), np.float32(9e-4)
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb, 1.0 / 255.0, 1.0)).astype(np.float32)


def _chromaticity(od: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optical-density chromaticity: 2-D coordinates of ``od / sum(od)``, and ``sum(od)``."""
    total = od.sum(axis=-1)
    c = od / np.maximum(total, 1e-6)[..., None]
    a = c[..., 0] - c[..., 2]
    b = (2 * c[..., 1] - c[..., 0] - c[..., 2]) / np.float32(math.sqrt(3))
    return a, b, total


def _palette_bins(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = _PALETTE_BINS
    ia = np.clip(((a + 1) / 2 * n).astype(np.intp), 0, n - 1)
    ib = np.clip(((b + 1) / 2 * n).astype(np.intp), 0, n - 1)
    return ia, ib


def palette_histogram(stained: np.ndarray, pixel_size_um: float = 0.75) -> np.ndarray:
    """Counts of a stain's coloured pixels per chromaticity bin (summed for a palette).

    Parameters
    ----------
    stained
        ``(H, W, 3)`` stain in [0, 1].
    pixel_size_um
        µm per pixel (the colour smoothing is 2 µm).

    Returns
    -------
    numpy.ndarray
        ``(48, 48)`` float64 counts of pixels with summed optical density ≥ 0.3.
    """
    sc = _COLOUR_SMOOTH_UM / float(pixel_size_um)
    od = _gauss(_optical_density(np.asarray(stained, np.float32)), (sc, sc, 0))
    a, b, total = _chromaticity(od)
    m = total >= _COLOURED_OD
    ia, ib = _palette_bins(a[m], b[m])
    n = _PALETTE_BINS
    return np.bincount(ia * n + ib, minlength=n * n).reshape(n, n).astype(np.float64)


def palette_log_density(counts: np.ndarray) -> np.ndarray:
    """``−log`` probability per chromaticity bin of summed :func:`palette_histogram` counts.

    Smoothed by one bin and floored at 1e-6, so a colour the model never produced scores
    about 13.8 and its most common colours about 3-5.
    """
    p = ndi.gaussian_filter(np.asarray(counts, float), 1.0)
    p /= max(p.sum(), 1e-12)
    return -np.log(p + 1e-6)


def _palette_improbability(od: np.ndarray, palette: np.ndarray):
    a, b, total = _chromaticity(od)
    ia, ib = _palette_bins(a, b)
    weight = (total >= _COLOURED_OD).astype(np.float32)
    return palette[ia, ib].astype(np.float32), weight


# --------------------------------------------------------------------------- checks


def _check_inputs(r: Any, f: Any, stained: Any, cell: Any, pixel_size_um: Any):
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)):
        raise ValueError(f"cell must be an integer number of pixels, got {cell!r}")
    cell = int(cell)
    if not MIN_CELL <= cell <= MAX_CELL:
        raise ValueError(f"cell must be between {MIN_CELL} and {MAX_CELL} px, got {cell}")
    try:
        px = float(pixel_size_um)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_size_um must be a number > 0, got {pixel_size_um!r}") from None
    if not (math.isfinite(px) and px > 0):
        raise ValueError(f"pixel_size_um must be a number > 0, got {pixel_size_um!r}")
    arrays = []
    for name, a, ndim in (("r", r, 2), ("f", f, 2), ("stained", stained, 3)):
        a = np.asarray(a)
        if a.ndim != ndim or (ndim == 3 and a.shape[2] != 3):
            want = "(H, W)" if ndim == 2 else "(H, W, 3)"
            raise ValueError(f"{name} must be {want}, got shape {a.shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name} must be a float array in [0, 1], got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"{name} must be floats in [0, 1], got integer dtype {a.dtype}; "
                "divide by its maximum first"
            )
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN or infinite values")
        arrays.append(a)
    r, f, stained = arrays
    if r.shape != f.shape or stained.shape[:2] != r.shape:
        raise ValueError(
            f"r, f and stained differ in size: r {r.shape}, f {f.shape}, "
            f"stained {stained.shape[:2]}"
        )
    if min(r.shape) < cell:
        raise ValueError(f"the image {r.shape} is smaller than one {cell}-px cell")
    return np.clip(r, 0, 1), np.clip(f, 0, 1), np.clip(stained, 0, 1), cell, px


# --------------------------------------------------------------------------- signals


def pixel_maps(
    r: np.ndarray,
    f: np.ndarray,
    stained: np.ndarray,
    *,
    pixel_size_um: float = 0.75,
    nuclei_gain: float = 1.0,
    palette: Any = None,
) -> dict[str, Any]:
    """The cell-size independent part of :func:`flag_signals` (computed once per image).

    Local maps are sampled on a lattice every ``step`` pixels (``ys``, ``xs``: the
    smoothed maps vary on the 12 µm window's scale); nuclei are point lists.
    """
    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.core.metrics import luminance
    from napari_confocal_stain.core.nuclei import (
        detect_nuclei_fluorescence,
        detect_nuclei_he,
        hematoxylin,
    )

    px = float(pixel_size_um)
    gain = float(nuclei_gain)
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"nuclei_gain must be a number > 0, got {nuclei_gain!r}")
    height, width = r.shape
    sw = _WINDOW_UM / px
    step = max(1, min(8, round(sw / 4)))
    ys = np.arange(step // 2, height, step)
    xs = np.arange(step // 2, width, step)
    lat = np.ix_(ys, xs)
    workers = min(2, os.cpu_count() or 1)
    lin = linear_stain(r, f)
    maps: dict[str, Any] = {"ys": ys, "xs": xs, "step": step, "lin": lin, "shape": r.shape}

    tissue_px = _gauss(np.maximum(r, f), _TISSUE_SMOOTH_UM / px) > TISSUE_LEVEL
    maps["tissue"] = tissue_px[lat]
    # Local signals look at tissue at least half a window inside its border, where the
    # window sees tissue only (the border between tissue and glass is an edge the model
    # may draw in many ways).
    grow = max(1, round(sw / step))
    maps["look"] = ndi.minimum_filter(maps["tissue"], size=grow + 1, mode="nearest")

    y_in = luminance(lin).astype(np.float32)
    y_out = luminance(stained).astype(np.float32)
    maps["structure"] = 1.0 - _gauss(_ssim_pixels(y_in, y_out), sw)[lat]

    def bands(y: np.ndarray) -> list[np.ndarray]:
        g1 = _gauss(y, 1.0)
        g3 = _gauss(y, 3.0)
        g8 = _gauss(y, 8.0)
        return [y - g1, g1 - g3, g3 - g8]

    def log_ratio(o: np.ndarray, i: np.ndarray, floor: float = _ENERGY_FLOOR) -> np.ndarray:
        return 0.5 * np.log((o + floor) / (i + floor))

    up, down = [], []
    for b_out, b_in in zip(bands(y_out), bands(y_in), strict=True):
        e_out = _gauss(b_out * b_out, sw)[lat]
        e_in = _gauss(b_in * b_in, sw)[lat]
        cov = _gauss(b_out * b_in, sw)[lat]
        # Output detail the input does not explain (the part of the band uncorrelated
        # with the input's band), and input detail the output lost.
        unexplained = np.maximum(e_out - cov * cov / (e_in + _ENERGY_FLOOR), 0.0)
        up.append(log_ratio(unexplained, e_in))
        down.append(-log_ratio(e_out, e_in))
    maps["texture"] = up
    maps["detail_loss"] = down

    def periodic(y: np.ndarray) -> list[np.ndarray]:
        """Local power at the frequencies (π/p, π/p), phase-free (quadratures)."""
        out = []
        iy = np.arange(height, dtype=np.float32)[:, None]
        ix = np.arange(width, dtype=np.float32)[None, :]
        for p in _PERIODS:
            w = np.float32(math.pi / p)
            carriers_y = [np.cos(w * iy)] + ([np.sin(w * iy)] if p > 1 else [])
            carriers_x = [np.cos(w * ix)] + ([np.sin(w * ix)] if p > 1 else [])
            power = None
            for a in carriers_y:
                for b in carriers_x:
                    d = _gauss(y * a * b, sw)[lat] ** 2
                    power = d if power is None else power + d
            out.append(power)
        return out

    floor = _ENERGY_FLOOR / 16  # one frequency's share of a band
    maps["periodic"] = [
        log_ratio(o, i, floor) for o, i in zip(periodic(y_out), periodic(y_in), strict=True)
    ]

    # Colour: how unusual the output's colour is for this model (its calibrated palette
    # of optical-density chromaticities), averaged over a window of coloured pixels.
    if palette is None:
        maps["colour"] = None
    else:
        sc = _COLOUR_SMOOTH_UM / px
        od = _gauss(_optical_density(stained), (sc, sc, 0))
        improbable, weight = _palette_improbability(od, np.asarray(palette, float))
        num = _gauss(improbable * weight, sw)[lat]
        den = _gauss(weight, sw)[lat]
        maps["colour"] = np.where(den > 0.2, num / np.maximum(den, 1e-6), np.nan)

    # Nuclei on tissue (the stain of bare glass is the model's background response, noise
    # an engine may amplify, not a claim about a cell).
    bf = _log_response(f, px)
    bh = _log_response(hematoxylin(stained), px)
    pf = detect_nuclei_fluorescence(f, px, _NUCLEUS_UM, 0.1, workers=workers)
    ph = detect_nuclei_he(stained, px, _NUCLEUS_UM, 0.1, workers=workers)
    near = ndi.binary_dilation(tissue_px, iterations=max(1, round(_NUCLEUS_UM[0] / px)))
    pf, ph = pf[_on(near, pf)], ph[_on(near, ph)]
    g = _GATHER_UM / px
    maps["f_nuclei"] = np.column_stack(
        [pf[:, :2], _gather_max(bf, pf, 1.5), _gather_max(bh, pf, g)]
    ).reshape(-1, 4)
    maps["he_nuclei"] = np.column_stack(
        [ph[:, :2], _gather_max(bh, ph, 1.5), _gather_max(bf, ph, g)]
    ).reshape(-1, 4)
    maps["gain"] = gain
    maps["stained"] = stained
    return maps


def cell_signals(maps: Mapping[str, Any], cell: int, origin: tuple[int, int] = (0, 0)):
    """Reduce :func:`pixel_maps` to per-cell signals on a grid anchored at ``origin``.

    Returns the dict described in :func:`flag_signals`.
    """
    from napari_confocal_stain.core.metrics import hallucination_maps

    oy, ox = (int(v) for v in origin)
    height, width = maps["shape"]
    h, w = height - oy, width - ox
    grid = _grid((h, w), cell)
    ys, xs = maps["ys"] - oy, maps["xs"] - ox
    sy, sx = ys >= 0, xs >= 0
    ys, xs = ys[sy], xs[sx]
    sub = np.ix_(sy, sx)
    cells = _Cells(ys, xs, cell, grid)
    covered = cells.covered()
    tissue_lat = maps["tissue"][sub]
    fraction = np.where(covered, cells.mean(tissue_lat), 0.0)
    tissue = fraction >= MIN_TISSUE_FRACTION
    look = maps["look"][sub] & cells.expand(tissue)
    signals: dict[str, np.ndarray] = {}

    workers = min(2, os.cpu_count() or 1)
    thesis = hallucination_maps(
        maps["lin"][oy:, ox:], maps["stained"][oy:, ox:], cell, workers=workers
    )
    signals["lbp_chi2"] = thesis["lbp_chi2"]
    signals["ssim"] = 1.0 - thesis["ssim"]
    signals["structure"] = cells.max(maps["structure"][sub], look)

    def centred_max(layers: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
        # Against the cell's median: a model's overall sharpening, smoothing or palette
        # drift on a tissue is its normal behaviour; a patch that departs from the rest
        # of its cell is not.
        out = None
        for v in layers:
            m = mask & np.isfinite(v)
            rel = v - cells.expand(cells.median(v, m))
            c = cells.max(rel, m)
            out = c if out is None else np.fmax(out, c)
        return out

    for name in ("texture", "detail_loss", "periodic"):
        signals[name] = centred_max([layer[sub] for layer in maps[name]], look)
    if maps["colour"] is None:
        signals["colour"] = np.full(grid, np.nan)
    else:
        colour = maps["colour"][sub]
        seen = look & np.isfinite(colour)
        signals["colour"] = centred_max([np.where(seen, colour, 0.0)], seen)

    # Nuclei, graded. The model's gain (output hematoxylin response per unit of F
    # response on the same nucleus) varies with the tissue: each cell uses the median
    # over its clear F nuclei, or the calibrated gain where it has too few.
    gain = maps["gain"]
    fn = maps["f_nuclei"] - np.array([oy, ox, 0, 0])
    hn = maps["he_nuclei"] - np.array([oy, ox, 0, 0])
    fn = fn[(np.floor(fn[:, 0] + 0.5) >= 0) & (np.floor(fn[:, 1] + 0.5) >= 0)]
    hn = hn[(np.floor(hn[:, 0] + 0.5) >= 0) & (np.floor(hn[:, 1] + 0.5) >= 0)]
    gain_map = np.full(grid, gain)
    iy, ix = _point_index(fn, cell, grid)
    clear = fn[:, 2] >= 0.15
    for i, j in set(zip(iy[clear].tolist(), ix[clear].tolist(), strict=True)):
        sel = clear & (iy == i) & (ix == j)
        if sel.sum() >= _MIN_GAIN_NUCLEI:
            ratio = np.median(fn[sel, 3] / fn[sel, 2])
            gain_map[i, j] = float(np.clip(ratio, gain / 4, gain * 4))
    erased = fn[:, 2] - fn[:, 3] / gain_map[iy, ix]
    iy, ix = _point_index(hn, cell, grid)
    # Capped at 1: the LoG response of a saturated nucleus is about 0.6, so a larger one
    # is dark non-nuclear matter, no more of a nucleus for being darker.
    s_h = np.minimum(hn[:, 2] / gain_map[iy, ix], 1.0)
    invented = s_h - _INVENTED_F_WEIGHT * hn[:, 3]
    signals["erased_nuclei"] = np.where(tissue, _point_cells(fn, erased, cell, grid), np.nan)
    signals["invented_nuclei"] = np.where(tissue, _point_cells(hn, invented, cell, grid), np.nan)
    return {
        "signals": signals,
        "tissue": tissue,
        "tissue_fraction": fraction,
        "f_nuclei": np.column_stack([fn, erased]).reshape(-1, 5),
        "he_nuclei": np.column_stack([hn, invented]).reshape(-1, 5),
        "cell": cell,
    }


def flag_signals(
    r: np.ndarray,
    f: np.ndarray,
    stained: np.ndarray,
    *,
    cell: int = 512,
    pixel_size_um: float = 0.75,
    nuclei_gain: float = 1.0,
    palette: Any = None,
) -> dict[str, Any]:
    """Raw per-cell signals of :func:`flag_hallucinations`, before calibration.

    Parameters
    ----------
    r, f
        ``(H, W)`` reflectance and fluorescence, floats in [0, 1].
    stained
        ``(H, W, 3)`` stained output, floats in [0, 1].
    cell
        Grid cell side in pixels (64 to 1024).
    pixel_size_um
        µm per pixel (sets the window and nuclear sizes).
    nuclei_gain
        Output hematoxylin LoG response per unit of F LoG response on a preserved nucleus
        (the model's calibrated value, used in cells with fewer than 5 clear F nuclei), so
        erased and invented strengths are in F units.
    palette
        The model's colour palette (``−log`` probability per chromaticity bin,
        :func:`palette_log_density`); without it the ``colour`` signal is NaN.

    Returns
    -------
    dict
        ``signals`` (name -> ``(ny, nx)`` float, NaN where not measurable),
        ``tissue`` (``(ny, nx)`` bool), ``tissue_fraction``, and the nuclei on tissue:
        ``f_nuclei`` ``(N, 5)`` rows ``(y, x, F response, output hematoxylin response
        there, erased strength)`` and ``he_nuclei`` ``(M, 5)`` rows ``(y, x, hematoxylin
        response, F response there, invented strength)``.
    """
    r, f, stained, cell, px = _check_inputs(r, f, stained, cell, pixel_size_um)
    maps = pixel_maps(r, f, stained, pixel_size_um=px, nuclei_gain=nuclei_gain, palette=palette)
    return cell_signals(maps, cell)


# ----------------------------------------------------------------------- calibration


@dataclass
class FlagCalibration:
    """Per-model thresholds of :func:`flag_hallucinations` (JSON in checkpoint metadata).

    For every signal ``k`` and calibrated cell size ``c``, ``median[k][i]`` and
    ``tail[k][i]`` are the median and the ``quantile`` of the signal over known-good
    tissue cells of side ``cells[i]``; a cell's normalised signal is
    ``z_k = (s_k − median_k) / (tail_k − median_k)`` (0 at a typical cell, 1 at the tail),
    its combined statistic ``max_k z_k``, and ``combined[i]`` the value of that statistic
    that known-good cells exceed at the rate ``target_false_flag_rate`` on an image the
    calibration did not see (leave one image out; ≥ 1, see
    ``training.calibrate.transfer_factor``). Between
    calibrated sizes every number is interpolated linearly in ``log2(cell)``; outside
    them the nearest size's values are used.
    """

    cells: list[int]
    median: dict[str, list[float]]
    tail: dict[str, list[float]]
    combined: list[float]
    nuclei_gain: float
    palette: list[list[float]] = field(default_factory=list)
    quantile: float = 0.95
    target_false_flag_rate: float = 0.03
    model: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    version: int = SIGNALS_VERSION

    def at(self, cell: int) -> tuple[dict[str, float], dict[str, float], float]:
        """Medians, tails and combined threshold interpolated at ``cell``."""
        x = np.log2(np.asarray(self.cells, float))
        c = math.log2(float(cell))

        def interp(values: list[float]) -> float:
            return float(np.interp(c, x, np.asarray(values, float)))

        med = {k: interp(v) for k, v in self.median.items()}
        tail = {k: interp(v) for k, v in self.tail.items()}
        return med, tail, interp(self.combined)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what is stored under ``extra.flag_calibration``)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "calibration") -> FlagCalibration:
        """Rebuild from :meth:`to_dict` output, checking every field.

        Raises
        ------
        ValueError
            A missing or malformed field, or another signal version.
        """
        try:
            cal = cls(
                cells=[int(c) for c in d["cells"]],
                median={k: [float(x) for x in v] for k, v in d["median"].items()},
                tail={k: [float(x) for x in v] for k, v in d["tail"].items()},
                combined=[float(x) for x in d["combined"]],
                nuclei_gain=float(d["nuclei_gain"]),
                palette=[[float(x) for x in row] for row in d["palette"]],
                quantile=float(d.get("quantile", 0.95)),
                target_false_flag_rate=float(d.get("target_false_flag_rate", 0.03)),
                model=d.get("model"),
                measured=dict(d.get("measured") or {}),
                data=dict(d.get("data") or {}),
                version=int(d.get("version", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: malformed flag calibration ({exc!r})") from None
        n = len(cal.cells)
        if cal.version != SIGNALS_VERSION:
            raise ValueError(
                f"{where}: flag calibration is for signal version {cal.version}, this "
                f"package computes version {SIGNALS_VERSION}; re-run python -m training "
                "calibrate"
            )
        missing = [k for k in SIGNALS if k not in cal.median or k not in cal.tail]
        if n == 0 or missing or len(cal.combined) != n:
            raise ValueError(f"{where}: incomplete flag calibration (missing {missing})")
        for k in SIGNALS:
            if len(cal.median[k]) != n or len(cal.tail[k]) != n:
                raise ValueError(f"{where}: flag calibration of {k!r} has the wrong length")
        if np.asarray(cal.palette).shape != (_PALETTE_BINS, _PALETTE_BINS):
            raise ValueError(f"{where}: flag calibration palette must be 48 x 48")
        if sorted(cal.cells) != cal.cells or not (cal.nuclei_gain > 0):
            raise ValueError(f"{where}: flag calibration cells must increase and gain be > 0")
        return cal


_CACHE: dict[tuple, FlagCalibration] = {}


def load_calibration(model: Any = None) -> FlagCalibration:
    """The flag calibration of a stain model.

    Parameters
    ----------
    model
        ``None`` (the default stain model,
        :data:`~napari_confocal_stain.models.defaults.DEFAULT_STAIN_MODEL`), a bundled
        model name, a checkpoint path, a loaded model (its ``checkpoint_meta``), a
        :class:`FlagCalibration`, or its dict form.

    Returns
    -------
    FlagCalibration

    Raises
    ------
    CheckpointError
        The checkpoint cannot be found or read.
    ValueError
        It holds no (or a malformed) flag calibration.
    """
    if isinstance(model, FlagCalibration):
        return model
    if isinstance(model, Mapping):
        return FlagCalibration.from_dict(model)
    meta = getattr(model, "checkpoint_meta", None)
    if meta is not None:
        where = str(meta.get("path", type(model).__name__))
        extra = meta.get("extra") or {}
        if CALIBRATION_KEY not in extra:
            raise ValueError(f"{where}: {_NO_CALIBRATION.format(where=where)}")
        return FlagCalibration.from_dict(extra[CALIBRATION_KEY], where)
    if model is None:
        from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

        model = DEFAULT_STAIN_MODEL
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            "model must be None, a model name, a checkpoint path, a loaded model or a "
            f"FlagCalibration, got {type(model).__name__}"
        )
    from napari_confocal_stain.models.checkpoint import read_metadata

    meta = read_metadata(model)
    path = Path(meta["path"])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE[key] = _calibration_of(meta)
    return _CACHE[key]


_NO_CALIBRATION = (
    "the checkpoint holds no hallucination-flag calibration; run "
    "`python -m training calibrate --model {where}`"
)


def _calibration_of(meta: Mapping[str, Any]) -> FlagCalibration:
    path = meta["path"]
    extra = meta.get("extra") or {}
    if CALIBRATION_KEY not in extra:
        raise ValueError(f"{path}: {_NO_CALIBRATION.format(where=path)}")
    return FlagCalibration.from_dict(extra[CALIBRATION_KEY], str(path))


# ------------------------------------------------------------------------ flagging


def normalised_signals(
    signals: Mapping[str, np.ndarray], calibration: FlagCalibration, cell: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each signal as ``z_k`` (0 typical, 1 at the calibrated tail) and the score.

    Returns
    -------
    (dict, numpy.ndarray)
        ``z_k / combined threshold`` per signal (so a value above 1 alone flags the
        cell), and the score ``max_k`` of those (NaN signals count as 0).
    """
    med, tail, combined = calibration.at(cell)
    ratios = {}
    for k in SIGNALS:
        span = max(tail[k] - med[k], 1e-9)
        z = (np.asarray(signals[k], float) - med[k]) / span
        ratios[k] = np.nan_to_num(np.clip(z, 0.0, None), nan=0.0) / combined
    score = np.max(np.stack([ratios[k] for k in SIGNALS]), axis=0)
    return ratios, score


def reasons_text(reasons: np.ndarray) -> np.ndarray:
    """``reasons`` (object array of name tuples) as ``"a;b"`` strings, for a CSV column."""
    out = np.empty(reasons.shape, object)
    for idx, names in np.ndenumerate(reasons):
        out[idx] = ";".join(names)
    return out


def flag_hallucinations(
    r: np.ndarray,
    f: np.ndarray,
    stained: np.ndarray,
    *,
    cell: int = 512,
    model: Any = None,
    pixel_size_um: float = 0.75,
) -> dict[str, Any]:
    """Flag the grid cells of a stain that may hold hallucinated or erased structure.

    Parameters
    ----------
    r, f
        ``(H, W)`` reflectance and fluorescence the stain was made from, floats in [0, 1].
    stained
        ``(H, W, 3)`` stained output (e.g. the GAN stain), floats in [0, 1].
    cell
        Grid cell side in pixels, 64 to 1024; the image must be at least one cell big.
        Cell ``(i, j)`` covers rows ``[i·cell, (i+1)·cell)`` and columns
        ``[j·cell, (j+1)·cell)``; edge cells are the smaller crops they are.
    model
        Whose calibration to use: ``None`` for the default stain model, a bundled name, a
        checkpoint path, a loaded model, or a :class:`FlagCalibration`.
    pixel_size_um
        µm per pixel of the inputs.

    Returns
    -------
    dict
        With ``(ny, nx) = (ceil(H/cell), ceil(W/cell))``:

        ``flagged``           bool ``(ny, nx)``: a tissue cell with ``score > 1``.
        ``score``             float ``(ny, nx)``: ``max_k`` normalised signal / threshold
                              (0 for background cells); higher = more suspicious.
        ``reasons``           object ``(ny, nx)``: tuple of the signal names whose ratio
                              exceeds 1 (empty for unflagged cells).
        ``reasons_text``      the same as ``"a;b"`` strings (CSV-ready).
        ``ratios``            signal name -> float ``(ny, nx)``: that signal's share of the
                              threshold (``> 1`` alone flags the cell).
        ``signals``           signal name -> float ``(ny, nx)``: raw values (NaN where a
                              signal cannot be measured).
        ``tissue``, ``tissue_fraction``  tissue cells and their tissue fraction.
        ``erased_points``     ``(K, 2)`` ``(row, col)`` of F nuclei missing from the stain
                              strongly enough to flag a cell on their own;
                              ``erased_strength`` their strengths (F units).
        ``invented_points``   ``(L, 2)`` stain nuclei with no F nucleus at their place,
                              likewise; ``invented_strength`` (ratio to F).
        ``cell``, ``pixel_size_um``, ``model`` (calibrated model name), ``signal_names``.

    Raises
    ------
    ValueError
        Bad shapes or dtypes, non-finite values, a cell outside 64..1024 or larger than
        the image, a bad pixel size, or a model without a flag calibration.
    CheckpointError
        The model's checkpoint cannot be found or read.
    """
    r, f, stained, cell, px = _check_inputs(r, f, stained, cell, pixel_size_um)
    cal = load_calibration(model)
    maps = pixel_maps(
        r, f, stained, pixel_size_um=px, nuclei_gain=cal.nuclei_gain, palette=cal.palette
    )
    raw = cell_signals(maps, cell)
    tissue = raw["tissue"]
    ratios, score = normalised_signals(raw["signals"], cal, cell)
    score = np.where(tissue, score, 0.0)
    flagged = tissue & (score > 1.0)
    reasons = np.empty(score.shape, object)
    for idx in np.ndindex(score.shape):
        reasons[idx] = tuple(k for k in SIGNALS if flagged[idx] and ratios[k][idx] > 1.0)

    med, tail, combined = cal.at(cell)

    def strong(points: np.ndarray, name: str) -> np.ndarray:
        if len(points) == 0:
            return np.zeros(0, bool)
        z = (points[:, 4] - med[name]) / max(tail[name] - med[name], 1e-9) / combined
        iy, ix = _point_index(points, cell, score.shape)
        return (z > 1.0) & tissue[iy, ix]

    fn, hn = raw["f_nuclei"], raw["he_nuclei"]
    keep_e, keep_i = strong(fn, "erased_nuclei"), strong(hn, "invented_nuclei")
    return {
        "flagged": flagged,
        "score": score,
        "reasons": reasons,
        "reasons_text": reasons_text(reasons),
        "ratios": ratios,
        "signals": raw["signals"],
        "tissue": tissue,
        "tissue_fraction": raw["tissue_fraction"],
        "erased_points": fn[keep_e, :2],
        "erased_strength": fn[keep_e, 4],
        "invented_points": hn[keep_i, :2],
        "invented_strength": hn[keep_i, 4],
        "cell": cell,
        "pixel_size_um": px,
        "model": cal.model,
        "signal_names": SIGNALS,
    }
