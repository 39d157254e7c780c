"""Hallucination heatmaps: per-cell LBP χ² distance and SSIM between two stains.

The thesis (García 2019, §3.5 and §4.4) compares the linear stain (DSCM, the GAN's
input) with the GAN's H&E output on a grid of 512 × 512 cells, on the luminance of
both images, with two metrics:

* **LBP χ²** — texture: the χ² distance between the cells' normalised histograms of
  local binary patterns (8 neighbours, radius 1; Ojala, Pietikäinen & Mäenpää 2002).
* **SSIM** — structure: the structural similarity of Wang et al. 2004.

Exact definitions (what the tests check against scikit-image, cell by cell):

Luminance
    ``Y = (0.2125 R + 0.7154 G) + 0.0721 B``, elementwise in the input's float dtype
    (the ITU-R BT.709 / sRGB luma weights of :func:`skimage.color.rgb2gray`, not
    BT.601's 0.299/0.587/0.114). skimage evaluates ``rgb @ coeffs``, whose rounding
    depends on the BLAS kernel, hence on the CPU, the array's layout and its chunking;
    the fixed elementwise order gives every pixel the same bits on any CPU and for any
    chunking, within 2 ulp of skimage's value. Integer images are first scaled to
    [0, 1] (``skimage.util.img_as_float``). A 2-D input is taken as already grayscale.

Cells
    Cell ``(i, j)`` covers rows ``[i·cell, min((i+1)·cell, H))`` and columns
    ``[j·cell, min((j+1)·cell, W))``; the map has ``ceil(H/cell) × ceil(W/cell)``
    values. Partial cells on the bottom/right edges are measured as they are (a smaller
    crop), never padded or dropped. Every cell is measured **alone**, as if cropped out
    of the slide: neither metric looks across a cell border, so a value depends only on
    the pixels of its cell. Every per-cell computation is the same arithmetic whatever
    cells share its batch, so LBP χ² is bit-identical for numpy and every dask chunking
    or thread count; SSIM goes through BLAS matrix products, whose kernels may round
    differently with the batch's layout (agreement to ~1e-6, far below any threshold).

LBP codes
    scikit-image's ``local_binary_pattern(Y, P=8, R=1, method="default")`` of the cell
    crop, reproduced bit for bit: neighbour ``p`` (bit ``2**p``) sits at
    ``(-sin(2πp/8), cos(2πp/8))`` rounded to 5 decimals from the centre, i.e.
    right, up-right, up, up-left, left, down-left, down, down-right; diagonal
    neighbours are bilinearly interpolated in float64 with scikit-image's exact
    operation order and cell-local coordinates; pixels outside the cell count as 0;
    a bit is set when ``neighbour - centre >= 0``. We keep all 256 codes
    ("default") rather than the rotation-invariant "ror" or the 10-bin "uniform"
    variants: the thesis describes exactly this operator (every pattern of the 8
    neighbours, ``>=`` threshold) and a hallucinated structure is precisely a change of
    orientation/shape of edges that rotation-invariant codes would fold together.

χ² distance
    With ``p`` and ``q`` the cell's 256-bin code histograms of source and output, each
    normalised to sum 1::

        χ²(p, q) = ½ Σ_k (p_k − q_k)² / (p_k + q_k),   bins with p_k + q_k = 0 skipped

    (the symmetric χ² histogram distance, e.g. Pele & Werman, ECCV 2010, eq. 1;
    bounded to [0, 1]: 0 for equal histograms, 1 for disjoint ones).

SSIM
    Wang et al. 2004 with a Gaussian window σ = 1.5 truncated at 3.5σ (11 taps),
    ``K1 = 0.01``, ``K2 = 0.03``, ``C1 = (K1·data_range)²``, ``C2 = (K2·data_range)²``,
    population (not sample) covariances, each cell filtered alone with scipy's
    ``reflect`` border, and the SSIM map averaged over the cell after dropping a
    5-pixel border — i.e. ``skimage.metrics.structural_similarity(src_cell, out_cell,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range)``. A cell narrower than the 11-pixel window (possible only
    on the slide's edges) has no SSIM and gets NaN.

Speed (no Python loop over cells): a work unit is a row of up to 16 cells (of 512²)
side by side, viewed as ``(rows, n_cells, cell)``. LBP runs over the unit in steps of
2**17 samples with every neighbour a contiguous slice of a flat, zero-framed buffer,
and the histograms of all its cells come from one ``np.bincount`` over
``cell_index·256 + code`` per step. SSIM filters the moments of a batch of cells
(about 2**18 pixels: one 512² cell, or many small ones) with banded matrix products
(BLAS), one per 16 output rows or columns, each cell with its own reflected border.
Units run in threads (numpy and BLAS release the GIL). Dask inputs are rechunked to
multiples of ``cell`` and mapped chunk by chunk, so a whole slide streams through
memory and the result is a lazy dask array.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "LUMA_COEFFS",
    "METRICS",
    "N_LBP_CODES",
    "cell_grid_shape",
    "chi2_distance",
    "hallucination_maps",
    "lbp_chi2_map",
    "lbp_codes",
    "luminance",
    "ssim_map",
]

#: skimage.color.rgb2gray weights (BT.709 luma).
LUMA_COEFFS = (0.2125, 0.7154, 0.0721)
#: Number of LBP codes of the 8-neighbour "default" operator.
N_LBP_CODES = 256
#: Names of the per-cell metrics, in the order :func:`hallucination_maps` returns them.
METRICS = ("lbp_chi2", "ssim")

# scikit-image's diagonal offset: sin(π/4) rounded to 5 decimals (0.70711, not 1/√2).
_DIAG = float(np.round(np.sin(np.pi / 4), 5))
_SSIM_TRUNCATE = 3.5  # skimage: 11 taps at σ = 1.5, "to match Wang et al. 2004"
_LBP_STEP = 1 << 17  # samples per LBP step: 1 MB per float64 temporary, cache sized
_GEMM_BLOCK = 16  # output rows/columns per banded-matrix block of the Gaussian filter
_DASK_TARGET = 2048  # preferred chunk side (pixels) when rechunking dask inputs


# --------------------------------------------------------------------------- inputs


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.")


def _luminance_np(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        from skimage.util import img_as_float

        image = img_as_float(image)
    if image.ndim == 2:
        return image
    # Three elementwise products summed left to right, each operation rounded once
    # (IEEE), so every pixel gets the same bits whatever the array's shape, strides,
    # chunking or CPU. skimage's ``image @ coeffs`` goes through BLAS/SIMD kernels whose
    # summation order (and FMA use) varies with all of these: 1 ulp apart on some pixels,
    # and one ulp flips LBP codes at ties, so χ² would depend on how a slide was chunked.
    c0, c1, c2 = (image.dtype.type(c) for c in LUMA_COEFFS)
    y = image[..., 0] * c0
    y += image[..., 1] * c1
    y += image[..., 2] * c2
    return y


def luminance(image: Any, name: str = "image") -> Any:
    """Luminance of an RGB image (or a grayscale image unchanged).

    Parameters
    ----------
    image
        ``(H, W, 3)`` RGB or ``(H, W)`` grayscale, numpy or dask. Floats are used as
        they are (expected in [0, 1]); integers are scaled to [0, 1].
    name
        What to call the image in error messages.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(H, W)`` float luminance ``(0.2125 R + 0.7154 G) + 0.0721 B`` in the input's
        float dtype: :func:`skimage.color.rgb2gray`'s weights, within 2 ulp of its result,
        and the same bits for numpy and every dask chunking on any CPU. Lazy for dask
        input.

    Raises
    ------
    ValueError
        If the image is neither ``(H, W)`` nor ``(H, W, 3)``.
    """
    shape = tuple(image.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        raise ValueError(f"{name} must be (H, W) grayscale or (H, W, 3) RGB, got shape {shape}")
    if _is_dask(image):
        import dask.array as da

        image = da.asarray(image)
        if image.ndim == 2:
            return image.map_blocks(_luminance_np, dtype=_float_dtype(image.dtype))
        image = image.rechunk({2: 3})
        return image.map_blocks(_luminance_np, drop_axis=2, dtype=_float_dtype(image.dtype))
    return _luminance_np(image)


def _float_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def cell_grid_shape(shape: tuple[int, ...], cell: int) -> tuple[int, int]:
    """Number of grid cells ``(ceil(H/cell), ceil(W/cell))`` of an image.

    Parameters
    ----------
    shape
        Image shape; only the first two entries (H, W) are used.
    cell
        Cell side in pixels.

    Returns
    -------
    tuple of int
        Rows and columns of the cell grid.
    """
    return -(-int(shape[0]) // cell), -(-int(shape[1]) // cell)


def _check_cell(cell: Any) -> int:
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 1:
        raise ValueError(f"cell must be a positive integer number of pixels, got {cell!r}")
    return int(cell)


def _check_pair(source: Any, output: Any) -> None:
    for name, img in (("source", source), ("output", output)):
        shape = tuple(img.shape)
        if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
            raise ValueError(
                f"{name} must be (H, W) grayscale or (H, W, 3) RGB, got shape {shape}"
            )
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {shape})")
    if tuple(source.shape[:2]) != tuple(output.shape[:2]):
        raise ValueError(
            f"source and output differ in size: source {tuple(source.shape[:2])} "
            f"vs output {tuple(output.shape[:2])}"
        )


def _check_range(data_range: Any) -> float:
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return value


# ------------------------------------------------------------------------------ LBP


@lru_cache(maxsize=32)
def _lbp_weights(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear weights of the diagonal neighbours at cell-local coordinates 0..n-1.

    skimage computes, per pixel, ``coord = i + offset``, ``d = coord - floor(coord)``
    and uses ``(1 - d)`` and ``d``; both depend (in the last bits) on ``i``, so they are
    evaluated exactly that way per coordinate rather than taken as constants.
    """
    i = np.arange(n, dtype=np.float64)
    plus = i + _DIAG
    d_plus = plus - np.floor(plus)  # neighbour at i + 0.70711: between i and i + 1
    minus = i - _DIAG
    d_minus = minus - np.floor(minus)  # neighbour at i - 0.70711: between i - 1 and i
    return 1.0 - d_plus, d_plus, 1.0 - d_minus, d_minus


@lru_cache(maxsize=32)
def _row_runs(h: int) -> tuple[int, ...]:
    """Starts of the runs of rows 0..h-1 whose four row weights are all equal.

    The weights only change where ``i ± 0.70711`` enters a new binary exponent, so
    there are about ``2·log2(h)`` runs; within one, a scalar multiply is exact.
    """
    weights = np.stack(_lbp_weights(h))
    change = np.any(weights[:, 1:] != weights[:, :-1], axis=0)
    return (0, *(np.flatnonzero(change) + 1).tolist(), h)


class _LbpWorkspace:
    """Preallocated buffers for :func:`_lbp_batch` (one per thread and batch shape).

    The ``n`` cells of a batch are laid out side by side, each row of each cell framed
    by a zero column on both sides (skimage's constant 0 outside the image), and every
    array is kept flat: a neighbour is then a contiguous slice at a fixed offset (±1,
    ±row length), and numpy runs every operation as one long contiguous loop. (Strided
    or broadcast operands with rows shorter than numpy's 8192-element buffer are
    buffered and run at half speed.) Results at the zero columns are junk, never read.
    """

    def __init__(self, rows: int, n: int, w: int) -> None:
        self.shape = (rows, n, w)
        self.length = length = n * (w + 2)  # one padded row of the batch
        size = (rows + 2) * length
        # z holds rows r0 - 1 .. r1 of the step at flat offset 1 (+ a spare 0 each end).
        self.z = np.zeros(size + 2, np.float64)
        self.hp = np.empty(size, np.float64)
        self.hm = np.empty(size, np.float64)
        self.tmp = np.empty(size, np.float64)
        self.t = np.empty(rows * length, np.float64)
        self.u = np.empty(rows * length, np.float64)
        self.ge = np.empty(rows * length, np.bool_)
        self.bit = np.empty(rows * length, np.uint8)
        self.code = np.empty(rows * length, np.uint8)
        # Column weights at every flat position (0 at the frame columns), whole arrays
        # rather than a broadcast row, for the same reason as above.
        self.cols = tuple(np.tile(np.pad(a, 1), (rows + 2) * n) for a in _lbp_weights(w))
        # Histogram bin offset of every position: cell * 256; frame columns -> bin n * 256.
        bins = np.full((n, w + 2), n, np.intp)
        bins[:, 1:-1] = np.arange(n)[:, None]
        self.bins = np.tile(bins.reshape(-1) * N_LBP_CODES, rows)
        self.index = np.empty(rows * length, np.intp)


def _lbp_batch(
    x: np.ndarray,
    out: np.ndarray | None = None,
    hist: np.ndarray | None = None,
    ws: _LbpWorkspace | None = None,
) -> None:
    """LBP codes of ``n`` equally sized cells laid side by side.

    Parameters
    ----------
    x
        ``(h, n, w)`` luminance; ``x[:, j, :]`` is cell ``j`` (any real dtype and strides).
    out
        Optional ``(h, n, w)`` uint8 array that receives the codes.
    hist
        Optional ``(n, 256)`` int64 array; the code histogram of every cell is added to it.
    ws
        Reusable buffers (made if missing or mismatched).
    """
    h, n, w = x.shape
    rows = min(h, max(8, _LBP_STEP // (n * (w + 2))))
    if ws is None or ws.shape != (rows, n, w):
        ws = _LbpWorkspace(rows, n, w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        code = _lbp_step(x, r0, r1, ws)
        if out is not None:
            out[r0:r1] = code.reshape(r1 - r0, n, w + 2)[:, :, 1:-1]
        if hist is not None:
            # One bincount for all cells of the step: index = cell * 256 + code.
            index = np.add(code, ws.bins[: code.size], out=ws.index[: code.size])
            counts = np.bincount(index, minlength=(n + 1) * N_LBP_CODES)
            hist += counts[: n * N_LBP_CODES].reshape(n, N_LBP_CODES)


def _lbp_step(x: np.ndarray, r0: int, r1: int, ws: _LbpWorkspace) -> np.ndarray:
    """Codes of rows ``r0 .. r1 - 1`` of every cell, flat in the workspace's frame layout."""
    h, n, w = x.shape
    big, k = ws.length, r1 - r0
    size = (k + 2) * big
    z = ws.z[: size + 2]
    cells = z[1 : size + 1].reshape(k + 2, n, w + 2)  # row j: cell row r0 - 1 + j
    lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
    if r0 == 0:
        cells[0] = 0.0
    if r1 == h:
        cells[k + 1] = 0.0
    cells[lo - r0 + 1 : hi - r0 + 1, :, 1:-1] = x[lo:hi]

    def zs(offset: int, first: int = 1, count: int = k) -> np.ndarray:
        """z rows first .. first + count - 1, shifted by ``offset`` samples."""
        start = 1 + first * big + offset
        return z[start : start + count * big]

    # Horizontal halves of skimage's bilinear interpolation,
    # top = (1 - dc) * left + dc * right, shared by the two diagonals on each
    # side: hp samples column c + 0.70711, hm column c - 0.70711 (all z rows).
    omc_p, c_p, omc_m, c_m = ws.cols
    hp, hm, tmp = ws.hp[:size], ws.hm[:size], ws.tmp[:size]
    np.multiply(zs(0, 0, k + 2), omc_p[:size], out=hp)
    np.multiply(zs(1, 0, k + 2), c_p[:size], out=tmp)
    hp += tmp
    np.multiply(zs(-1, 0, k + 2), omc_m[:size], out=hm)
    np.multiply(zs(0, 0, k + 2), c_m[:size], out=tmp)
    hm += tmp
    n_out = k * big
    t, u, ge, bit = ws.t[:n_out], ws.u[:n_out], ws.ge[:n_out], ws.bit[:n_out]
    code = ws.code[:n_out]
    centre = zs(0)
    # (neighbour - centre >= 0) == (neighbour >= centre) for finite IEEE doubles.
    np.greater_equal(zs(1), centre, out=code.view(np.bool_))  # bit 0: right
    omr_p, r_p, omr_m, r_m = _lbp_weights(h)
    # Runs of rows of this step with equal row weights (usually just one).
    cuts = [r0, *(c for c in _row_runs(h) if r0 < c < r1), r1]
    for shift, half, top, up in (
        (1, hp, 0, True),  # up-right: hp of rows r - 1 and r
        (2, None, -big, None),  # up
        (3, hm, 0, True),  # up-left
        (4, None, -1, None),  # left
        (5, hm, 1, False),  # down-left: hm of rows r and r + 1
        (6, None, big, None),  # down
        (7, hp, 1, False),  # down-right
    ):
        if half is None:
            np.greater_equal(zs(top), centre, out=ge)
        else:
            # neighbour = (1 - dr) * top + dr * bottom, in skimage's order; the row
            # weights are scalars over each run of rows.
            for a, b in itertools.pairwise(cuts):
                i0, i1 = (a - r0) * big, (b - r0) * big
                first = top + a - r0  # hp/hm row of the upper sample
                upper = half[first * big : (first + b - a) * big]
                lower = half[(first + 1) * big : (first + 1 + b - a) * big]
                w_top = (omr_m if up else omr_p)[a]
                w_bottom = (r_m if up else r_p)[a]
                np.multiply(upper, w_top, out=t[i0:i1])
                np.multiply(lower, w_bottom, out=u[i0:i1])
            t += u
            np.greater_equal(t, centre, out=ge)
        # A uint8 multiply is vectorised where numpy's uint8 left_shift is not.
        np.multiply(ge.view(np.uint8), np.uint8(1 << shift), out=bit)
        code |= bit
    return code


def lbp_codes(gray: np.ndarray) -> np.ndarray:
    """8-neighbour, radius-1 local binary pattern codes of one image.

    Bit-identical to ``skimage.feature.local_binary_pattern(gray, P=8, R=1,
    method="default")`` (see the module notes), but vectorised.

    Parameters
    ----------
    gray
        ``(H, W)`` real-valued image (the whole image is one patch: pixels outside it
        count as 0).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 codes in [0, 255].

    Raises
    ------
    ValueError
        If ``gray`` is not 2-D.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"lbp_codes needs a 2-D grayscale image, got shape {gray.shape}")
    out = np.empty(gray.shape, np.uint8)
    if gray.size:
        _lbp_batch(gray[:, None, :], out=out[:, None, :])
    return out


def chi2_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Symmetric χ² distance ``½ Σ (p − q)² / (p + q)`` of histograms along the last axis.

    Parameters
    ----------
    p, q
        Histograms (counts or frequencies), same shape; each is normalised to sum 1
        along the last axis first. Bins where both are 0 contribute nothing.

    Returns
    -------
    numpy.ndarray
        Distances in [0, 1], shape ``p.shape[:-1]`` (float64). NaN where a histogram is
        empty.
    """
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(axis=-1, keepdims=True)
        q = q / q.sum(axis=-1, keepdims=True)
        s = p + q
        d = np.where(s > 0, (p - q) ** 2 / np.where(s > 0, s, 1.0), 0.0)
    return 0.5 * d.sum(axis=-1)


def _lbp_chi2_batch(xs: np.ndarray, xo: np.ndarray, ws: _LbpWorkspace | None = None) -> np.ndarray:
    """χ² of the LBP histograms of ``n`` side-by-side cells of source and output."""
    n = xs.shape[1]
    hists = np.zeros((2, n, N_LBP_CODES), np.int64)
    _lbp_batch(xs, hist=hists[0], ws=ws)
    _lbp_batch(xo, hist=hists[1], ws=ws)
    return chi2_distance(hists[0], hists[1])


# ----------------------------------------------------------------------------- SSIM


@lru_cache(maxsize=8)
def _gaussian_band(sigma: float, block: int) -> tuple[np.ndarray, int]:
    """Banded matrix ``(block, block + 2r)`` applying scipy's Gaussian kernel.

    Row ``i`` holds the 2r + 1 taps of ``scipy.ndimage.gaussian_filter1d(sigma,
    truncate=3.5)`` (same weights, same radius) starting at column ``i``, so
    ``band @ window`` filters ``block`` outputs from ``block + 2r`` padded inputs.
    """
    radius = int(_SSIM_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 / (sigma * sigma) * x**2)
    taps /= taps.sum()
    band = np.zeros((block, block + 2 * radius), np.float64)
    for i in range(block):
        band[i, i : i + 2 * radius + 1] = taps
    return band.astype(np.float32), radius


class _SsimWorkspace:
    """Preallocated float32 buffers for :func:`_ssim_batch` (one per thread and shape).

    Reusing them matters: fresh multi-megabyte arrays cost a page fault per 4 kB on
    first touch, as much as the filtering itself.
    """

    def __init__(self, h: int, n: int, w: int, sigma: float) -> None:
        self.key = (h, n, w, sigma)
        band, p = _gaussian_band(sigma, _GEMM_BLOCK)
        b = band.shape[0]
        self.band, self.p = band, p
        self.nbv, self.nbh = -(-h // b), -(-w // b)
        hb, wb = self.nbv * b, self.nbh * b
        # Rows/columns past the padded cells stay 0 so the filtered junk stays finite.
        self.m = np.zeros((3, hb + 2 * p, n, wb + 2 * p), np.float32)  # s, d, s² or d²
        self.v = np.empty((n, hb, wb + 2 * p), np.float32)
        self.f = np.empty((4, n, self.nbh, hb, b), np.float32)
        shape = (n, self.nbh, max(h - 2 * p, 0), b)
        self.t1, self.t2, self.t3 = (np.empty(shape, np.float32) for _ in range(3))


def _reflect_pad(a: np.ndarray, h: int, w: int, p: int) -> None:
    """Fill the ``p``-wide frame of ``a[:h + 2p, :, :w + 2p]`` by scipy "reflect" in place."""
    for i in range(p):  # rows: d c b a | a b c d
        a[p - 1 - i] = a[p + i]
        a[p + h + i] = a[p + h - 1 - i]
    rows = a[: h + 2 * p]
    for i in range(p):
        rows[:, :, p - 1 - i] = rows[:, :, p + i]
        rows[:, :, p + w + i] = rows[:, :, p + w - 1 - i]


def _ssim_batch(
    xs: np.ndarray,
    xo: np.ndarray,
    data_range: float,
    sigma: float = 1.5,
    ws: _SsimWorkspace | None = None,
) -> np.ndarray:
    """Mean SSIM of ``n`` equally sized side-by-side cells, each filtered alone.

    Parameters
    ----------
    xs, xo
        ``(h, n, w)`` source and output luminance (cell ``j`` is ``[:, j, :]``).
    data_range, sigma
        As for :func:`ssim_map`.
    ws
        Reusable buffers (made if missing or mismatched).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64; NaN if a cell side is shorter than the Gaussian window.
    """
    h, n, w = xs.shape
    sigma = float(sigma)
    p = _gaussian_band(sigma, _GEMM_BLOCK)[1]
    if h < 2 * p + 1 or w < 2 * p + 1:
        return np.full(n, np.nan)
    if ws is None or ws.key != (h, n, w, sigma):
        ws = _SsimWorkspace(h, n, w, sigma)
    # Moments of s = x + y and d = x - y: E[s], E[d], E[s²], E[d²] give every SSIM
    # term (4 filtered maps instead of 5). s is taken about a per-cell constant (twice
    # the mean luminance of both cells): variances are shift invariant, and float32
    # E[s²] - E[s]² cancels far less near 0 than near 2. A coarse mean is enough: any
    # per-cell constant is exact, this one is just small. Per cell, so the reduction
    # order cannot depend on which cells share the batch.
    shift = np.array(
        [
            xs[::8, j, ::8].mean(dtype=np.float64) + xo[::8, j, ::8].mean(dtype=np.float64)
            for j in range(n)
        ],
        np.float32,
    )
    _filter_moments(xs, xo, shift, ws)
    return _mean_ssim(ws, h, w, shift, data_range)


def _filter_moments(xs: np.ndarray, xo: np.ndarray, shift: np.ndarray, ws: _SsimWorkspace) -> None:
    """Gaussian-filter E[s], E[d], E[s²], E[d²] of every cell into ``ws.f[0..3]``."""
    h, n, w = xs.shape
    band, p, b, k = ws.band, ws.p, ws.band.shape[0], ws.band.shape[1]
    hb, wb = ws.nbv * b, ws.nbh * b
    m, v, f = ws.m, ws.v, ws.f
    inner = (slice(p, p + h), slice(None), slice(p, p + w))
    np.add(xs, xo, out=m[0][inner], dtype=np.float32)
    m[0][inner] -= shift[None, :, None]
    np.subtract(xs, xo, out=m[1][inner], dtype=np.float32)
    _reflect_pad(m[0], h, w, p)  # each cell padded by its own reflection
    _reflect_pad(m[1], h, w, p)
    # One map at a time through both passes keeps a cell's intermediate (about 1 MB for
    # a 512-pixel cell) in L2 cache between them.
    st = m.strides
    st_v = v.strides
    v_blocks = v.reshape(n, ws.nbv, b, wb + 2 * p).transpose(1, 0, 2, 3)
    h_windows = as_strided(
        v, shape=(n, ws.nbh, hb, k), strides=(st_v[0], b * st_v[2], st_v[1], st_v[2])
    )
    for i, src in enumerate((0, 1, 0, 1)):
        if i < 2:
            moment = m[src]
        else:
            moment = np.multiply(m[src], m[src], out=m[2])
        # Vertical pass: one (b, k) @ (k, wb + 2p) product per row block and cell —
        # small enough that OpenBLAS keeps each on one thread (our threads do the rest).
        windows = as_strided(
            moment, shape=(ws.nbv, n, k, wb + 2 * p), strides=(b * st[1], st[2], st[1], st[3])
        )
        np.matmul(band, windows, out=v_blocks)
        # Horizontal pass: (hb, k) @ (k, b) per cell and column block. The result's
        # layout (cell, column block, row, column in block) is fine: SSIM is pointwise,
        # then averaged.
        np.matmul(h_windows, band.T, out=f[i])


def _mean_ssim(
    ws: _SsimWorkspace, h: int, w: int, shift: np.ndarray, data_range: float
) -> np.ndarray:
    """Per-cell mean of the SSIM map from the filtered moments, minus a ``p``-px border."""
    p, f = ws.p, ws.f
    n, wb = f.shape[1], ws.nbh * ws.band.shape[0]
    # SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)). With
    # S = E[s], D = E[d], u = E[s²] - S², v = E[d²] - D² every factor is half of
    # (Su² ∓ D² + 2 C1) or (u ∓ v + 2 C2) (Su = S + shift), and the halves cancel.
    mean_s, mean_d, ss, dd = (f[i][:, :, p : h - p] for i in range(4))  # drop p rows
    two_c1 = np.float32(2 * (0.01 * data_range) ** 2)
    two_c2 = np.float32(2 * (0.03 * data_range) ** 2)
    t1, t2, t3 = ws.t1, ws.t2, ws.t3
    np.multiply(mean_s, mean_s, out=t1)
    np.subtract(ss, t1, out=t1)  # u
    np.multiply(mean_d, mean_d, out=t2)
    np.subtract(dd, t2, out=t3)  # v (t2 keeps D²)
    np.subtract(t1, t3, out=ss)
    ss += two_c2  # numerator 2
    t1 += t3
    t1 += two_c2  # denominator 2
    mean_s += shift[:, None, None, None]
    np.multiply(mean_s, mean_s, out=t3)  # Su²
    np.subtract(t3, t2, out=dd)
    dd += two_c1  # numerator 1
    t3 += t2
    t3 += two_c1  # denominator 1
    ss *= dd
    t1 *= t3
    np.divide(ss, t1, out=t1)
    # Mean over columns p .. w - p - 1 (column = block * b + i): everything minus the
    # left border and the right border plus block padding.
    total = t1.sum(axis=(1, 2, 3), dtype=np.float64)
    flat = t1.transpose(0, 2, 1, 3).reshape(n, h - 2 * p, wb)
    total -= flat[:, :, :p].sum(axis=(1, 2), dtype=np.float64)
    total -= flat[:, :, w - p :].sum(axis=(1, 2), dtype=np.float64)
    return total / ((h - 2 * p) * (w - 2 * p))


# --------------------------------------------------------------------------- driver

_SSIM_BATCH = 1 << 18  # pixels per SSIM batch: a 512² cell's intermediates stay in L2
_UNIT = 1 << 22  # pixels per thread work unit: a few cells side by side (long rows)


class _Workspaces:
    """Per-thread cache of LBP/SSIM buffers, keyed by batch shape."""

    def __init__(self) -> None:
        import threading

        self._local = threading.local()

    def get(self, kind: type, key: tuple, *args: Any) -> Any:
        cache = self._local.__dict__.setdefault("cache", {})
        ws = cache.get((kind, key))
        if ws is None:
            if len(cache) >= 4:  # a slide has at most a few distinct cell shapes
                cache.clear()
            ws = cache[(kind, key)] = kind(*args)
        return ws


_WORKSPACES = _Workspaces()


def _unit_values(
    lum_s: np.ndarray,
    lum_o: np.ndarray,
    cell: int,
    names: tuple[str, ...],
    data_range: float,
    sigma: float,
) -> dict[str, np.ndarray]:
    """Metrics of ``n`` side-by-side equal cells: ``lum_*`` is ``(h, n * w)``."""
    h, width = lum_s.shape
    w = min(cell, width)
    n = width // w
    xs = lum_s.reshape(h, n, w)
    xo = lum_o.reshape(h, n, w)
    values = {}
    if "lbp_chi2" in names:
        rows = min(h, max(8, _LBP_STEP // (n * (w + 2))))
        ws = _WORKSPACES.get(_LbpWorkspace, (rows, n, w), rows, n, w)
        values["lbp_chi2"] = _lbp_chi2_batch(xs, xo, ws)
    if "ssim" in names:
        ssim = np.empty(n)
        xs32 = xs.astype(np.float32, copy=False)
        xo32 = xo.astype(np.float32, copy=False)
        step = max(1, _SSIM_BATCH // (h * w))
        for j0 in range(0, n, step):  # a batch is several cells, or one cell of ≥ 2**18 px
            j1 = min(n, j0 + step)
            ws = _WORKSPACES.get(_SsimWorkspace, (h, j1 - j0, w, sigma), h, j1 - j0, w, sigma)
            ssim[j0:j1] = _ssim_batch(xs32[:, j0:j1], xo32[:, j0:j1], data_range, sigma, ws)
        values["ssim"] = ssim
    return values


def _maps_numpy(
    source: np.ndarray,
    output: np.ndarray,
    cell: int,
    names: tuple[str, ...],
    data_range: float,
    sigma: float,
    workers: int | None,
) -> dict[str, np.ndarray]:
    """Per-cell metrics of in-memory images (RGB or gray), threaded over work units."""
    height, width = source.shape[:2]
    ny, nx = cell_grid_shape((height, width), cell)
    maps = {name: np.full((ny, nx), np.nan) for name in names}
    full_x = width // cell
    group = max(1, min(full_x, _UNIT // (cell * cell))) if full_x else 1
    if workers is None:
        workers = os.cpu_count() or 1
    if ny < 2 * workers:  # few cell rows: split them so every thread has work
        group = max(1, min(group, -(-full_x // (2 * workers))))
    units = []  # (cell row, first cell column, number of cells)
    for i in range(ny):
        units += [(i, j, min(group, full_x - j)) for j in range(0, full_x, group)]
        if full_x < nx:
            units.append((i, full_x, 1))  # the partial cell on the right edge

    def run(unit: tuple[int, int, int]) -> None:
        i, j, count = unit
        y0, y1 = i * cell, min(height, (i + 1) * cell)
        x0, x1 = j * cell, min(width, (j + count) * cell)
        # Luminance per unit (bit-identical to the whole image's), so a worker's
        # memory stays a few cells, not a slide.
        lum_s = luminance(source[y0:y1, x0:x1], "source")
        lum_o = luminance(output[y0:y1, x0:x1], "output")
        for name, vals in _unit_values(lum_s, lum_o, cell, names, data_range, sigma).items():
            maps[name][i, j : j + count] = vals

    workers = max(1, min(int(workers), len(units)))
    if workers == 1:
        for unit in units:
            run(unit)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="metrics") as pool:
            for done in pool.map(run, units):
                del done  # re-raises a worker's exception here
    return maps


def _maps_dask(
    source: Any,
    output: Any,
    cell: int,
    names: tuple[str, ...],
    data_range: float,
    sigma: float,
) -> dict[str, Any]:
    """Lazy per-cell metrics: luminance chunks aligned to the cell grid, mapped block-wise."""
    import dask.array as da

    lum_s = luminance(da.asarray(source), "source")
    lum_o = luminance(da.asarray(output), "output")
    # Chunks that are whole multiples of the cell (bigger than the cell when it is
    # small, so a block is enough work), the same for both images.
    side = []
    for axis in (0, 1):
        current = max(lum_s.chunks[axis][0], lum_o.chunks[axis][0], _DASK_TARGET)
        side.append(cell * max(1, round(current / cell)))
    lum_s = lum_s.rechunk(tuple(side))
    lum_o = lum_o.rechunk(tuple(side))

    def block(s: np.ndarray, o: np.ndarray) -> np.ndarray:
        maps = _maps_numpy(s, o, cell, names, data_range, sigma, workers=1)
        return np.stack([maps[name] for name in names])

    grid_chunks = [tuple(-(-c // cell) for c in lum_s.chunks[axis]) for axis in (0, 1)]
    chunks = ((len(names),), *grid_chunks)
    stacked = da.map_blocks(
        block,
        lum_s,
        lum_o,
        new_axis=0,
        chunks=chunks,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
    )
    return {name: stacked[k] for k, name in enumerate(names)}


def hallucination_maps(
    source: Any,
    output: Any,
    cell: int = 512,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    metrics: tuple[str, ...] = METRICS,
    workers: int | None = None,
) -> dict[str, Any]:
    """LBP χ² and SSIM per grid cell between a source stain and an output stain.

    Parameters
    ----------
    source, output
        Same-size images, ``(H, W, 3)`` RGB or ``(H, W)`` grayscale, floats in [0, 1]
        (integers are scaled to [0, 1]); numpy or dask. ``source`` is the linear stain
        (DSCM), ``output`` the GAN stain.
    cell
        Grid cell side in pixels (thesis: 512). Cell ``(0, 0)`` starts at the arrays'
        first pixel: to measure a region on a slide's grid, start it at a multiple of
        ``cell``.
    data_range
        Dynamic range of the luminance, for SSIM's ``C1``, ``C2`` (1.0 for [0, 1]).
        LBP codes only depend on the order of gray levels, so it does not change χ².
    sigma
        Standard deviation of SSIM's Gaussian window.
    metrics
        Which of ``("lbp_chi2", "ssim")`` to compute.
    workers
        Threads for numpy input (default: one per CPU). Dask input uses dask's
        scheduler instead.

    Returns
    -------
    dict
        ``{name: (ceil(H/cell), ceil(W/cell)) float64 array}`` — numpy for numpy input;
        for dask input, lazy dask arrays sharing one graph (compute them together with
        ``dask.compute(*maps.values())`` so each slide chunk is read once).

    Raises
    ------
    ValueError
        Mismatched or malformed images, a bad ``cell``, ``data_range``, ``sigma`` or
        metric name.

    Notes
    -----
    The exact definitions (luminance, LBP variant, χ² formula, SSIM constants, cell
    borders) are in this module's docstring.
    """
    cell = _check_cell(cell)
    _check_pair(source, output)
    data_range = _check_range(data_range)
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    names = tuple(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    if _is_dask(source) or _is_dask(output):
        return _maps_dask(source, output, cell, names, data_range, sigma)
    return _maps_numpy(
        np.asarray(source), np.asarray(output), cell, names, data_range, sigma, workers
    )


def lbp_chi2_map(
    source: Any,
    output: Any,
    cell: int = 512,
    *,
    data_range: float = 1.0,
    workers: int | None = None,
) -> Any:
    """χ² distance between the LBP histograms of source and output, per grid cell.

    Parameters
    ----------
    source, output, cell, data_range, workers
        As for :func:`hallucination_maps` (``data_range`` is validated but cannot
        change the result: LBP codes are invariant to gray-level scaling).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(ceil(H/cell), ceil(W/cell))`` float64 in [0, 1]; 0 = same texture.
    """
    return hallucination_maps(
        source, output, cell, data_range=data_range, metrics=("lbp_chi2",), workers=workers
    )["lbp_chi2"]


def ssim_map(
    source: Any,
    output: Any,
    cell: int = 512,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    workers: int | None = None,
) -> Any:
    """Mean SSIM (Wang et al. 2004) of source and output, per grid cell.

    Parameters
    ----------
    source, output, cell, data_range, sigma, workers
        As for :func:`hallucination_maps`.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(ceil(H/cell), ceil(W/cell))`` float64 in [-1, 1]; 1 = same structure; NaN for
        an edge cell narrower than the 11-pixel window.
    """
    return hallucination_maps(
        source,
        output,
        cell,
        data_range=data_range,
        sigma=sigma,
        metrics=("ssim",),
        workers=workers,
    )["ssim"]
