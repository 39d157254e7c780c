"""Unit-mean multiplicative speckle models: ``Y = X ⊙ S`` with ``E[S] = 1``.

The four models of thesis §3.2.1 and Combalia §3.1, with their means and variances:

=============  ==================================  =========================  ===============
name           distribution                        variance                   source
=============  ==================================  =========================  ===============
``gamma``      Γ(k = L, θ = 1/L)                   1/L                        SAR (thesis 3.1)
``uniform``    U(0.6535, 1.3464)                   (1.3464−0.6535)²/12 ≈ 0.04 MATLAB imnoise
``rayleigh``   Rayleigh(σ = √(2/π))                (4 − π)/π ≈ 0.2732         ultrasound
``gaussian``   N(1, σ²), σ = 0.2 by default        σ² = 0.04                  Combalia et al.
=============  ==================================  =========================  ===============

The uniform bounds are MATLAB's (mean 0.99995, not exactly 1; we keep the published numbers).
Everything draws from an explicit ``numpy.random.Generator`` so a training run is reproducible
and resumable from its iteration number alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "NOISE_MODELS",
    "UNIFORM_BOUNDS",
    "add_speckle",
    "noise_mean",
    "noise_variance",
    "speckle",
    "speckle_kwargs",
]

NOISE_MODELS = ("gamma", "uniform", "rayleigh", "gaussian")
"""The supported speckle distributions."""
UNIFORM_BOUNDS = (0.6535, 1.3464)
"""MATLAB ``imnoise(..., 'speckle')`` bounds: mean 1, variance 0.04 (thesis eq. 3.2)."""
RAYLEIGH_SIGMA = math.sqrt(2.0 / math.pi)
"""The Rayleigh scale whose mean ``σ·√(π/2)`` is exactly 1 (thesis eq. 3.3)."""


def _check(model: str, looks: float, sigma: float) -> None:
    if model not in NOISE_MODELS:
        raise ValueError(f"unknown speckle model {model!r}; choose one of {NOISE_MODELS}")
    if model == "gamma" and not (np.isfinite(looks) and looks > 0):
        raise ValueError(f"gamma speckle needs looks L > 0, got {looks!r}")
    if model == "gaussian" and not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"gaussian speckle needs sigma >= 0, got {sigma!r}")


def noise_mean(model: str, looks: float = 1.0, sigma: float = 0.2) -> float:
    """Theoretical mean of the speckle ``S`` (1, or 0.99995 for the MATLAB uniform).

    Parameters
    ----------
    model
        One of :data:`NOISE_MODELS`.
    looks
        ``L`` of the gamma model.
    sigma
        Standard deviation of the Gaussian model.

    Returns
    -------
    float
    """
    _check(model, looks, sigma)
    if model == "uniform":
        return sum(UNIFORM_BOUNDS) / 2
    return 1.0


def noise_variance(model: str, looks: float = 1.0, sigma: float = 0.2) -> float:
    """Theoretical variance of the speckle ``S`` (see the module table).

    Parameters
    ----------
    model, looks, sigma
        As :func:`noise_mean`.

    Returns
    -------
    float
    """
    _check(model, looks, sigma)
    if model == "gamma":
        return 1.0 / looks
    if model == "uniform":
        lo, hi = UNIFORM_BOUNDS
        return (hi - lo) ** 2 / 12.0
    if model == "rayleigh":
        return (4.0 - math.pi) / 2.0 * RAYLEIGH_SIGMA**2
    return sigma**2


def speckle(
    shape: tuple[int, ...],
    model: str = "gamma",
    rng: np.random.Generator | None = None,
    *,
    looks: float = 1.0,
    sigma: float = 0.2,
) -> np.ndarray:
    """Draw a unit-mean multiplicative speckle field.

    Parameters
    ----------
    shape
        Output shape.
    model
        One of :data:`NOISE_MODELS`.
    rng
        Random generator (default: a fresh unseeded one).
    looks
        ``L`` of the gamma model (1 = fully developed speckle; the thesis uses 1 and 5).
    sigma
        Standard deviation of the Gaussian model (Combalia: 0.2).

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``. Gaussian samples may be (very rarely, P ≈ 3e-7 at
        σ = 0.2) negative; :func:`add_speckle` clips the product.
    """
    _check(model, looks, sigma)
    rng = np.random.default_rng() if rng is None else rng
    if model == "gamma":
        s = rng.gamma(shape=looks, scale=1.0 / looks, size=shape)
    elif model == "uniform":
        s = rng.uniform(*UNIFORM_BOUNDS, size=shape)
    elif model == "rayleigh":
        s = rng.rayleigh(scale=RAYLEIGH_SIGMA, size=shape)
    else:
        s = rng.normal(1.0, sigma, size=shape)
    return s.astype(np.float32)


def add_speckle(
    clean: np.ndarray,
    model: str = "gamma",
    rng: np.random.Generator | None = None,
    *,
    looks: float = 1.0,
    sigma: float = 0.2,
    clip: bool = True,
) -> np.ndarray:
    """Contaminate a clean image: ``noisy = clean ⊙ S`` (thesis eq. 4.3b).

    Parameters
    ----------
    clean
        Image in [0, 1], any shape.
    model, rng, looks, sigma
        As :func:`speckle`.
    clip
        Clip the product to [0, 1], as a detector's normalised output is (default). Clipping
        makes the noise slightly biased on pixels brighter than ``1 / max(S)``.

    Returns
    -------
    numpy.ndarray
        float32 noisy image, same shape as ``clean``.
    """
    clean = np.asarray(clean, dtype=np.float32)
    noisy = clean * speckle(clean.shape, model, rng, looks=looks, sigma=sigma)
    return np.clip(noisy, 0.0, 1.0, out=noisy) if clip else noisy


def speckle_kwargs(noise: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`add_speckle` from a config's noise entry.

    ``{"model": "gamma", "looks": 5}`` → ``{"model": "gamma", "looks": 5.0}``; the model
    defaults to ``gamma``, and ``looks`` / ``sigma`` are passed only when the entry has them.
    """
    kw: dict[str, Any] = {"model": noise.get("model", "gamma")}
    if "looks" in noise:
        kw["looks"] = float(noise["looks"])
    if "sigma" in noise:
        kw["sigma"] = float(noise["sigma"])
    return kw
