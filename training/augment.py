"""Augmentation of supervised stain pairs: stain colour, magnification and confocal optics.

A stain model trained on one lab's H&E at one magnification learns that lab's colours and that
scale. The pairs :mod:`training.supervised` trains on are made from real H&E (the answer) and
its pseudo-confocal R/F (the input, :func:`training.data.pseudo_confocal`), so each source of
variation can be applied where it arises:

* **Stain colour and strength** (:func:`hed_jitter`): the H&E is perturbed in HED
  optical-density space (Tellez et al., 2018: each density scaled and shifted) *before* the
  pseudo-confocal pair is made. The pair is then normalised by the slide's densities times
  the same scale factors, as a real slide's pair is normalised by its own percentiles: the
  input hardly changes while the answer becomes a paler or a darker slide. Stain strength
  varies about 3× between labs and even between regions of one slide (hematoxylin 99.5th
  percentiles 0.05–0.30 on our images) and cannot be read from a normalised confocal pair,
  so the model must learn what is common to all of them instead of one lab's contrast. The
  range of the log factors may be asymmetric (``hed_log_scale: [lo, hi]``): our training
  slides are among the darkest, and a model that learned their darkness stains paler tissue
  too dark (the shipped recipe's last step uses ``[-0.8, 0.4]``).
* **Magnification** (:func:`zoom_crop`): a crop is read from a window ``1/zoom`` its size and
  resampled, so the model sees tissue between ``0.75/zoom_max`` and ``0.75/zoom_min`` µm per
  pixel (default 0.25–1 µm/px).
* **Detector** (:func:`degrade_pair`): the normalisation of each channel (a scanner's gain),
  optical blur and additive noise of both channels, and multiplicative speckle on R.

Every draw comes from the ``numpy.random.Generator`` passed in: a sample is a pure function of
its seed (resumable runs, see :mod:`training.runstate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import resize

from training.noise import add_speckle

__all__ = [
    "AUGMENT_DEFAULTS",
    "degrade_pair",
    "hed_jitter",
    "log_range",
    "zoom_crop",
    "zoom_factor",
]

AUGMENT_DEFAULTS: dict[str, Any] = {
    "hed_log_scale": 0.6,
    "hed_renormalise": True,
    "hed_bias": 0.03,
    "zoom_range": [0.75, 3.0],
    "zoom_probability": 0.5,
    "gain_range": [0.8, 1.25],
    "blur_sigma": [0.0, 1.2],
    "noise_sigma": [0.0, 0.03],
    "speckle_probability": 0.7,
    "speckle_sigma": [0.05, 0.3],
}
"""Defaults of the ``augment`` section of a supervised config (ranges are uniform)."""


def hed_jitter(
    rgb: np.ndarray,
    rng: np.random.Generator,
    log_scale: float | Sequence[float] = 0.6,
    bias: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
    """H&E with each HED optical density scaled by ``exp(U(lo, hi))`` and shifted by ``U(−b, b)``.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` H&E in [0, 1].
    rng
        Random generator.
    log_scale
        Range ``(lo, hi)`` of the log scale factors, or a number ``s`` for ``(−s, s)``
        (0.6: × 0.55 … 1.8). A range below 0 on average makes the answers paler on average.
    bias
        Half-range of the shifts (where the density is above 0.02: a shift on glass would
        tint the background).

    Returns
    -------
    (rgb, alpha)
        ``(H, W, 3)`` float32 in [0, 1], and the three scale factors (H, E, D).
    """
    lo, hi = log_range(log_scale)
    if lo == hi == 0 and bias <= 0:
        return np.asarray(rgb, np.float32), np.ones(3)
    hed = rgb2hed(np.asarray(rgb, np.float64))
    alpha = np.exp(rng.uniform(lo, hi, 3))
    beta = rng.uniform(-bias, bias, 3)
    hed = hed * alpha + beta * (hed > 0.02)
    return np.clip(hed2rgb(hed), 0.0, 1.0).astype(np.float32), alpha


def log_range(log_scale: float | Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` of a ``hed_log_scale`` setting: a number ``s`` is ``(−s, s)``."""
    if np.ndim(log_scale) == 0:
        s = abs(float(log_scale))  # type: ignore[arg-type]
        return -s, s
    lo, hi = (float(v) for v in log_scale)  # type: ignore[union-attr]
    if not lo <= hi:
        raise ValueError(f"hed_log_scale range {log_scale!r}: need lo ≤ hi")
    return lo, hi


def zoom_factor(rng: np.random.Generator, zoom_range: Any, probability: float) -> float:
    """1 with probability ``1 − probability``, else log-uniform in ``zoom_range``."""
    if rng.random() >= probability:
        return 1.0
    lo, hi = (float(v) for v in zoom_range)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def zoom_crop(image: np.ndarray, y: int, x: int, size: int, zoom: float) -> np.ndarray:
    """The ``size``² output of a window of ``size / zoom`` px at ``(y, x)``, resampled.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, C)``.
    y, x
        Top-left of the window; the window must fit (see the caller's origins).
    size
        Output side.
    zoom
        > 1 magnifies (a smaller window upsampled), < 1 shrinks (anti-aliased).

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size[, C])``.
    """
    win = max(1, round(size / zoom))
    crop = np.asarray(image[y : y + win, x : x + win], np.float32)
    if win == size:
        return crop
    out_shape = (size, size, *crop.shape[2:])
    return resize(crop, out_shape, order=1, anti_aliasing=win > size, preserve_range=True).astype(
        np.float32
    )


def degrade_pair(
    r: np.ndarray, f: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """R and F through a random detector: gain, blur, additive noise, speckle on R.

    Parameters
    ----------
    r, f
        ``(H, W)`` in [0, 1].
    rng
        Random generator.
    cfg
        The ``augment`` section (:data:`AUGMENT_DEFAULTS` keys).

    Returns
    -------
    (r, f)
        float32 in [0, 1].
    """
    out = []
    for a in (r, f):
        a = np.asarray(a, np.float32) * rng.uniform(*cfg["gain_range"])
        sigma = rng.uniform(*cfg["blur_sigma"])
        if sigma > 0.05:
            a = ndi.gaussian_filter(a, sigma, mode="reflect")
        noise = rng.uniform(*cfg["noise_sigma"])
        if noise > 0:
            a = a + rng.normal(0.0, noise, a.shape).astype(np.float32)
        out.append(np.clip(a, 0.0, 1.0).astype(np.float32))
    r, f = out
    if rng.random() < float(cfg["speckle_probability"]):
        r = add_speckle(r, "gaussian", rng, sigma=float(rng.uniform(*cfg["speckle_sigma"])))
    return r, f
