"""Linear (physics-inspired) false-colour H&E stains of a reflectance/fluorescence pair.

Two published mappings:

* **Gareau** (Gareau 2009; thesis eq. 3.1, Combalia eq. 1)::

      DSCM = 1 - F * (1 - H) - R * (1 - E)        clipped to [0, 1]

  with the hematoxylin colour ``H = [0.30, 0.20, 1.0]`` and the eosin colour
  ``E = [1.0, 0.55, 0.88]``. Where both modes are bright the affine map goes below 0
  (a bug of the thesis's ``VirtualStainer``), hence the clip.

* **Beer–Lambert** (Giacomelli et al., PLoS ONE 2016)::

      RGB = exp(-beta_nuclear * k_f * F) * exp(-beta_cyto * k_r * R)

  with the published H&E attenuation coefficients ``beta_nuclear = [0.17, 0.27, 0.105]``
  and ``beta_cyto = [0.05, 1.0, 0.54]``. Giacomelli's ``k`` scales the *measured*
  intensities to optical density; our inputs are normalised to [0, 1], so the defaults
  ``k_f = 8`` and ``k_r = 2.5`` are chosen so that a saturated nuclear signal reaches the
  density of strongly stained nuclei (RGB ≈ [0.26, 0.12, 0.43]) and a saturated
  reflectance the density of dense collagen (RGB ≈ [0.88, 0.08, 0.26]).

Both accept numpy arrays (returning numpy) or dask arrays (returning a lazy dask array
with the same chunking in Y/X and one chunk of 3 colours), so every pyramid level of a
100k-pixel mosaic is stained on demand, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "BEER_LAMBERT_DEFAULTS",
    "GAREAU_DEFAULTS",
    "METHODS",
    "beer_lambert_stain",
    "gareau_stain",
    "linear_stain",
    "linear_stain_levels",
    "linear_stain_table",
    "lookup_pairs",
]

#: Gareau's hematoxylin and eosin colours (thesis eq. 3.1).
GAREAU_DEFAULTS: dict[str, tuple[float, ...]] = {
    "h": (0.30, 0.20, 1.0),
    "e": (1.0, 0.55, 0.88),
}

#: Giacomelli et al. 2016 H&E attenuation coefficients and our intensity scales.
BEER_LAMBERT_DEFAULTS: dict[str, Any] = {
    "beta_nuclear": (0.17, 0.27, 0.105),
    "beta_cyto": (0.05, 1.0, 0.54),
    "k_f": 8.0,
    "k_r": 2.5,
}

METHODS = ("gareau", "beer-lambert")

Method = Literal["gareau", "beer-lambert"]


def _colour(value: Sequence[float], name: str) -> np.ndarray:
    vec = np.asarray(value, dtype=np.float32)
    if vec.shape != (3,) or not np.all(np.isfinite(vec)):
        raise ValueError(f"{name} must be three finite numbers (R, G, B), got {value!r}")
    return vec


def gareau_stain(
    r: np.ndarray,
    f: np.ndarray,
    h: Sequence[float] = GAREAU_DEFAULTS["h"],
    e: Sequence[float] = GAREAU_DEFAULTS["e"],
) -> np.ndarray:
    """Gareau's affine digital stain of numpy arrays.

    Parameters
    ----------
    r, f
        Reflectance and fluorescence, same shape, values in [0, 1].
    h, e
        Hematoxylin and eosin RGB colours in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``r.shape + (3,)`` float32 RGB in [0, 1].
    """
    h_ = 1.0 - _colour(h, "h")
    e_ = 1.0 - _colour(e, "e")
    r = np.asarray(r, dtype=np.float32)
    f = np.asarray(f, dtype=np.float32)
    out = np.empty((*r.shape, 3), dtype=np.float32)
    # One channel at a time keeps the temporaries 2-D (a third of the memory of
    # broadcasting to (..., 3) twice) on the large tiles napari asks for.
    for c in range(3):
        np.multiply(f, -h_[c], out=out[..., c])
        out[..., c] -= r * e_[c]
        out[..., c] += 1.0
    return np.clip(out, 0.0, 1.0, out=out)


def beer_lambert_stain(
    r: np.ndarray,
    f: np.ndarray,
    beta_nuclear: Sequence[float] = BEER_LAMBERT_DEFAULTS["beta_nuclear"],
    beta_cyto: Sequence[float] = BEER_LAMBERT_DEFAULTS["beta_cyto"],
    k_f: float = BEER_LAMBERT_DEFAULTS["k_f"],
    k_r: float = BEER_LAMBERT_DEFAULTS["k_r"],
) -> np.ndarray:
    """Giacomelli's Beer–Lambert false colouring of numpy arrays.

    Parameters
    ----------
    r, f
        Reflectance (eosin-like, cytoplasm and collagen) and fluorescence
        (hematoxylin-like, nuclei), same shape, values in [0, 1].
    beta_nuclear, beta_cyto
        Per-channel attenuation of the nuclear and cytoplasmic stains.
    k_f, k_r
        Scale from normalised intensity to optical density for F and R.

    Returns
    -------
    numpy.ndarray
        ``r.shape + (3,)`` float32 RGB in [0, 1].
    """
    if not (np.isfinite(k_f) and np.isfinite(k_r) and k_f >= 0 and k_r >= 0):
        raise ValueError(f"k_f and k_r must be finite and >= 0, got {k_f!r}, {k_r!r}")
    bn = _colour(beta_nuclear, "beta_nuclear") * np.float32(k_f)
    bc = _colour(beta_cyto, "beta_cyto") * np.float32(k_r)
    r = np.asarray(r, dtype=np.float32)
    f = np.asarray(f, dtype=np.float32)
    out = np.empty((*r.shape, 3), dtype=np.float32)
    for c in range(3):
        # exp(a) * exp(b) == exp(a + b): one exp per pixel and channel.
        np.multiply(f, -bn[c], out=out[..., c])
        out[..., c] -= r * bc[c]
    np.exp(out, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


_FUNCS = {"gareau": gareau_stain, "beer-lambert": beer_lambert_stain}
_PARAMS = {"gareau": set(GAREAU_DEFAULTS), "beer-lambert": set(BEER_LAMBERT_DEFAULTS)}


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.")


def linear_stain(r: Any, f: Any, method: Method = "gareau", **coefficients: Any) -> Any:
    """Stain a reflectance/fluorescence pair into an H&E-like RGB image.

    Parameters
    ----------
    r, f
        Reflectance and fluorescence of the same shape, float values in [0, 1]
        (numpy or dask arrays; other dtypes are converted to float32).
    method
        ``"gareau"`` (affine, the GAN's input) or ``"beer-lambert"`` (Giacomelli).
    **coefficients
        Overrides of the method's constants: ``h``, ``e`` for Gareau;
        ``beta_nuclear``, ``beta_cyto``, ``k_f``, ``k_r`` for Beer–Lambert.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``r.shape + (3,)`` float32 RGB in [0, 1]; lazy if the inputs are dask arrays.

    Raises
    ------
    ValueError
        Unknown method or coefficient, shape mismatch, bad coefficient values.

    Examples
    --------
    >>> import numpy as np
    >>> linear_stain(np.zeros((2, 2)), np.ones((2, 2)))[0, 0]
    array([0.3, 0.2, 1. ], dtype=float32)
    """
    if method not in _FUNCS:
        raise ValueError(f"unknown linear stain method {method!r}; choose one of {METHODS}")
    unknown = set(coefficients) - _PARAMS[method]
    if unknown:
        raise ValueError(
            f"unknown coefficient(s) {sorted(unknown)} for method {method!r}; "
            f"valid: {sorted(_PARAMS[method])}"
        )
    if tuple(r.shape) != tuple(f.shape):
        raise ValueError(f"R and F differ in shape: R {tuple(r.shape)} vs F {tuple(f.shape)}")
    func = _FUNCS[method]
    if _is_dask(r) or _is_dask(f):
        import dask.array as da

        index = "abcdefghij"[: r.ndim]
        # Align the two modes' chunking (they may come from differently tiled files).
        _, (r_d, f_d) = da.core.unify_chunks(da.asarray(r), index, da.asarray(f), index)
        # Validate the coefficients now (on one pixel) rather than inside a dask
        # task, where the error would surface in napari's slicing thread.
        func(np.zeros(1, np.float32), np.zeros(1, np.float32), **coefficients)
        return da.map_blocks(
            func,
            r_d,
            f_d,
            **coefficients,
            dtype=np.float32,
            new_axis=r_d.ndim,
            chunks=(*r_d.chunks, (3,)),
            meta=np.empty((0,) * (r_d.ndim + 1), np.float32),
        )
    return func(r, f, **coefficients)


def linear_stain_levels(
    r_levels: Sequence[Any],
    f_levels: Sequence[Any],
    method: Method = "gareau",
    **coefficients: Any,
) -> list[Any]:
    """Stain every pyramid level of a mosaic (lazily for dask levels).

    Parameters
    ----------
    r_levels, f_levels
        Pyramid levels of R and F, level 0 first (e.g. ``mosaic.r``, ``mosaic.f``).
    method, **coefficients
        As for :func:`linear_stain`.

    Returns
    -------
    list
        One ``(..., 3)`` RGB array per level.
    """
    if len(r_levels) != len(f_levels):
        raise ValueError(f"R has {len(r_levels)} levels but F has {len(f_levels)}")
    return [
        linear_stain(r, f, method, **coefficients) for r, f in zip(r_levels, f_levels, strict=True)
    ]


def linear_stain_table(
    r_values: np.ndarray, f_values: np.ndarray, method: Method = "gareau", **coefficients: Any
) -> np.ndarray:
    """The linear stain of every pair of the given R and F values, as a lookup table.

    When R and F are stored as 8-bit integers, each normalised mode takes at most 256
    values, so the stain of a whole image is a table lookup (:func:`lookup_pairs`) into
    the stain of the 256 × 256 possible pairs: exactly :func:`linear_stain` of the
    normalised image, at a fraction of the cost.

    Parameters
    ----------
    r_values, f_values
        1-D arrays: the normalised value (in [0, 1]) of each stored R and F code.
    method, **coefficients
        As for :func:`linear_stain`.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(r_values) * len(f_values), 3)``; row ``i * len(f_values) + j`` is the
        stain of ``(r_values[i], f_values[j])``.
    """
    r = np.asarray(r_values, dtype=np.float32).reshape(-1, 1)
    f = np.asarray(f_values, dtype=np.float32).reshape(1, -1)
    rr, ff = np.broadcast_arrays(r, f)
    return linear_stain(
        np.ascontiguousarray(rr), np.ascontiguousarray(ff), method, **coefficients
    ).reshape(-1, 3)


def lookup_pairs(r_codes: np.ndarray, f_codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Look up a per-pixel value of 8-bit R and F codes in a 65536-row table.

    Parameters
    ----------
    r_codes, f_codes
        uint8 arrays of the same shape.
    table
        ``(65536, C)`` array, row ``r * 256 + f`` (e.g. :func:`linear_stain_table` of the 256
        normalised values of each mode, quantised).

    Returns
    -------
    numpy.ndarray
        ``r_codes.shape + (C,)``, of ``table``'s dtype.
    """
    r_codes, f_codes = np.asarray(r_codes), np.asarray(f_codes)
    if r_codes.dtype != np.uint8 or f_codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {r_codes.dtype} and {f_codes.dtype}")
    if r_codes.shape != f_codes.shape:
        raise ValueError(f"R and F differ in shape: {r_codes.shape} vs {f_codes.shape}")
    if table.shape[0] != 65536:
        raise ValueError(f"the table needs 65536 rows (256 R × 256 F), got {table.shape[0]}")
    index = r_codes.astype(np.uint16)
    index <<= 8
    index |= f_codes
    return np.take(table, index, axis=0)
