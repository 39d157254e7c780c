"""Normalisation of reflectance (R) and fluorescence (F) intensities to [0, 1].

Every mode is an affine map ``y = clip((x - low) * scale, 0, 1)`` per mode, so it can
be computed once from a coarse pyramid level and applied, unchanged and lazily, to
every level of a whole slide. Statistics are plain numbers (JSON-serialisable) so they
can be stored with the mosaic and reused.

Modes
-----
``percentile`` (default)
    Robust: ``low``/``high`` are the 0.5th and 99.8th percentiles of each mode, so a
    few saturated or dead pixels do not squash the contrast.
``independent``
    Each mode's own min and max (thesis ``CMMinMaxNormalizer('independent')``).
``global``
    Both modes share ``low = min(min R, min F)`` and ``high = max(max R, max F)``. The
    thesis listing takes the *larger* of the two minima, which clips the darker mode;
    the global minimum is the smaller one, which is what is used here.
``average``
    Both modes share the min and max of ``(R + F) / 2`` (thesis). Pixels brighter
    than that average's maximum are clipped to 1.
``dtype``
    Divide by the data type's maximum (255 for uint8, 65535 for uint16); float data
    is taken to be in [0, 1] already and only clipped.

A mode whose ``low == high`` (a constant image) falls back to the ``dtype`` map for
that mode instead of dividing by zero; the stats record it under ``"constant"``.
NaN maps to 0 and +/-inf to 1/0 in every output, so one bad value can never poison a
display or a network input. (Slides opened with ``open_mosaic`` never get that far: their
reads refuse NaN/inf, see :mod:`napari_confocal_stain.io.values`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

NORMALIZATION_MODES: tuple[str, ...] = ("percentile", "independent", "global", "average", "dtype")
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.8)

__all__ = [
    "DEFAULT_PERCENTILES",
    "NORMALIZATION_MODES",
    "apply_normalization",
    "display_limits",
    "dtype_range",
    "normalization_stats",
    "normalize_pair",
]


def dtype_range(dtype: np.dtype | str | type) -> tuple[float, float]:
    """Return the ``(low, high)`` that the ``dtype`` mode maps to ``(0, 1)``.

    Parameters
    ----------
    dtype
        The data type as stored on disk.

    Returns
    -------
    tuple of float
        ``(0, iinfo.max)`` for integer types, ``(0, 1)`` for floating point and bool.
    """
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return 0.0, float(np.iinfo(dt).max)
    return 0.0, 1.0


def _dtype_of(x: Any) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def _finite_values(x: Any) -> np.ndarray:
    """Flatten ``x`` to a numpy array without NaN/inf (dask arrays are computed)."""
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr)]
    return arr.ravel()


def _min_max(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 0.0
    return float(values.min()), float(values.max())


def _percentiles(values: np.ndarray, q: tuple[float, float]) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(values, q)
    return float(lo), float(hi)


def normalization_stats(
    r: Any,
    f: Any,
    mode: str = "percentile",
    *,
    dtype: np.dtype | str | None = None,
    f_dtype: np.dtype | str | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """Compute the affine normalisation of an R/F pair from (a coarse level of) the data.

    Parameters
    ----------
    r, f
        Reflectance and fluorescence samples (numpy or dask arrays of any shape; dask
        arrays are computed, so pass a coarse level, not level 0 of a whole slide).
        NaN and inf values are ignored.
    mode
        One of :data:`NORMALIZATION_MODES`.
    dtype, f_dtype
        On-disk data types of R and F (used by the ``dtype`` mode and by the constant
        image fallback). Default: the arrays' own dtypes; ``f_dtype`` defaults to ``dtype``.
    percentiles
        Lower and upper percentiles (0-100) of the ``percentile`` mode.

    Returns
    -------
    dict
        JSON-serialisable: ``{"mode", "r": {"low", "high"}, "f": {"low", "high"},
        "constant": {"r": bool, "f": bool}}`` plus ``"percentiles"`` for that mode.
        ``(x - low) / (high - low)`` clipped to [0, 1] is the normalised value.

    Raises
    ------
    ValueError
        If ``mode`` or ``percentiles`` are not valid.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(
            f"unknown normalization {mode!r}; expected one of {', '.join(NORMALIZATION_MODES)}"
        )
    p_lo, p_hi = (float(p) for p in percentiles)
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    r_dtype = np.dtype(dtype) if dtype is not None else _dtype_of(r)
    if f_dtype is not None:
        f_dt = np.dtype(f_dtype)
    elif dtype is not None:
        f_dt = np.dtype(dtype)
    else:
        f_dt = _dtype_of(f)

    stats: dict[str, Any] = {"mode": mode}
    if mode == "dtype":
        (r_lo, r_hi), (f_lo, f_hi) = dtype_range(r_dtype), dtype_range(f_dt)
    else:
        (r_lo, r_hi), (f_lo, f_hi) = _data_ranges(r, f, mode, (p_lo, p_hi))
        if mode == "percentile":
            stats["percentiles"] = [p_lo, p_hi]

    constant = {"r": not r_hi > r_lo, "f": not f_hi > f_lo}
    if constant["r"]:
        r_lo, r_hi = dtype_range(r_dtype)
    if constant["f"]:
        f_lo, f_hi = dtype_range(f_dt)
    stats["r"] = {"low": r_lo, "high": r_hi}
    stats["f"] = {"low": f_lo, "high": f_hi}
    stats["constant"] = constant
    return stats


def _data_ranges(
    r: Any, f: Any, mode: str, percentiles: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(low, high)`` of R and of F from the data, for every mode but ``dtype``."""
    rv, fv = _finite_values(r), _finite_values(f)
    if mode == "percentile":
        r_lo, r_hi = _percentiles(rv, percentiles)
        f_lo, f_hi = _percentiles(fv, percentiles)
        # Sparse signal (e.g. few nuclei on a dark field) can put both percentiles on
        # the background value; min/max still carries the contrast then.
        if r_hi <= r_lo:
            r_lo, r_hi = _min_max(rv)
        if f_hi <= f_lo:
            f_lo, f_hi = _min_max(fv)
        return (r_lo, r_hi), (f_lo, f_hi)
    if mode == "independent":
        return _min_max(rv), _min_max(fv)
    if mode == "global":
        (r_min, r_max), (f_min, f_max) = _min_max(rv), _min_max(fv)
        # The smaller minimum: the thesis code takes the larger one (a known bug).
        both = (min(r_min, f_min), max(r_max, f_max))
        return both, both
    ra, fa = np.asarray(r), np.asarray(f)  # average
    if ra.shape != fa.shape:
        raise ValueError(
            f"average normalization needs R and F of one shape, got {ra.shape} and {fa.shape}"
        )
    avg = _min_max(_finite_values((ra.astype(np.float64) + fa.astype(np.float64)) / 2.0))
    return avg, avg


def _affine_clip_block(block: np.ndarray, low: float, scale: float) -> np.ndarray:
    """``clip((block - low) * scale, 0, 1)`` as float32, NaN -> 0, +inf -> 1, -inf -> 0."""
    out = np.asarray(block).astype(np.float32, copy=True)
    out -= np.float32(low)
    out *= np.float32(scale)
    np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_normalization(x: Any, low: float, high: float) -> Any:
    """Map ``x`` affinely so that ``low -> 0`` and ``high -> 1``, clipped to [0, 1].

    Parameters
    ----------
    x
        A numpy array (computed now) or a dask array (mapped lazily, block by block).
    low, high
        The statistics of one mode (``stats["r"]["low"]`` etc.). ``high <= low`` is
        treated as a constant image: values ``<= low`` map to 0, others to 1.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        float32 in [0, 1], same shape and chunks as ``x``; NaN -> 0, +inf -> 1, -inf -> 0.
    """
    low = float(low)
    span = float(high) - low
    # A zero span would divide by zero: an (almost) infinite slope gives a step at low.
    scale = 1.0 / span if span > 0 else float(np.finfo(np.float32).max)
    if hasattr(x, "map_blocks") and hasattr(x, "dask"):
        return x.map_blocks(
            _affine_clip_block,
            low=low,
            scale=scale,
            dtype=np.float32,
            meta=np.empty((0,) * x.ndim, np.float32),
        )
    return _affine_clip_block(x, low, scale)


def display_limits(
    values: Any, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float]:
    """Display contrast limits from robust percentiles of a sample of an image.

    Percentiles rather than min/max keep a few hot pixels of speckle from washing the
    image out.

    Parameters
    ----------
    values
        A sample of the image (numpy, any shape); NaN and inf are ignored.
    percentiles
        Lower and upper percentiles (0-100).

    Returns
    -------
    tuple of float
        ``(low, high)`` with ``high > low``: min and max if the percentiles coincide,
        ``(low, low + 1)`` for a constant sample and ``(0, 1)`` for an empty one.
    """
    finite = _finite_values(values).astype(np.float64, copy=False)
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def normalize_pair(
    r: Any,
    f: Any,
    mode: str = "percentile",
    *,
    stats: dict[str, Any] | None = None,
    dtype: np.dtype | str | None = None,
    f_dtype: np.dtype | str | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> tuple[Any, Any, dict[str, Any]]:
    """Normalise an R/F pair to float32 in [0, 1].

    Parameters
    ----------
    r, f
        Reflectance and fluorescence (numpy or dask). Dask in -> lazy dask out.
    mode
        One of :data:`NORMALIZATION_MODES`; ignored if ``stats`` is given.
    stats
        Statistics from :func:`normalization_stats` (e.g. of a coarse level); computed
        from ``r`` and ``f`` if omitted.
    dtype, f_dtype, percentiles
        Passed to :func:`normalization_stats`.

    Returns
    -------
    tuple
        ``(r01, f01, stats)``.
    """
    if stats is None:
        stats = normalization_stats(
            r, f, mode, dtype=dtype, f_dtype=f_dtype, percentiles=percentiles
        )
    r01 = apply_normalization(r, stats["r"]["low"], stats["r"]["high"])
    f01 = apply_normalization(f, stats["f"]["low"], stats["f"]["high"])
    return r01, f01, stats
