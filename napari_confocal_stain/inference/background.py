"""Tissue-free windows: detect them, and fill them with the model's background response.

A window whose DSCM is nearly white (:func:`is_background`) is not run; it is filled with
the model's response to a uniform white window, computed once per model and window size, so
skipped and computed background look the same. The ``seamless`` strategy skips a block only
if all of its tiles are background, and fills it with the constant the model gives deep
inside a uniform white region.
"""

from __future__ import annotations

import itertools
import weakref

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.inference.executor import Executor
from napari_confocal_stain.inference.geometry import (
    in_channels,
    model_device,
    parameters_version,
)

__all__ = [
    "BACKGROUND_DARKNESS",
    "BACKGROUND_TISSUE_FRACTION",
    "all_tiles_background",
    "background_response",
    "fill_background_cells",
    "is_background",
]

BACKGROUND_DARKNESS = 0.05
"""A pixel is tissue if some DSCM channel is below ``1 − BACKGROUND_DARKNESS``."""


BACKGROUND_TISSUE_FRACTION = 0.002
"""A window is background if at most this fraction of its pixels is tissue."""


def is_background(dscm: np.ndarray) -> bool:
    """Whether a DSCM window is tissue-free ("nearly white").

    The test: a pixel counts as tissue if its darkest channel is below
    ``1 − BACKGROUND_DARKNESS`` (0.95); the window is background if at most
    ``BACKGROUND_TISSUE_FRACTION`` (0.2 %) of its pixels are tissue. In the Gareau stain white is
    exactly "no fluorescence and no reflectance", and both stains darken at least one channel
    (nuclei red/green, eosin green), so the darkest channel is the right test.

    Parameters
    ----------
    dscm
        ``(h, w, 3)`` in [0, 1].
    """
    level = np.asarray(1.0 - BACKGROUND_DARKNESS, dtype=dscm.dtype)
    # "darkest channel below the level" = "some channel below it": three contiguous-plane
    # comparisons instead of a strided min over the channel axis (several times faster on
    # a viewport, where this runs for every statistics cell).
    tissue = dscm[..., 0] < level
    for c in range(1, dscm.shape[-1]):
        tissue |= dscm[..., c] < level
    return np.count_nonzero(tissue) <= BACKGROUND_TISSUE_FRACTION * tissue.size


_FILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def background_response(
    model: nn.Module,
    window: tuple[int, int],
    *,
    kind: str = "tile",
    execu: Executor | None = None,
) -> np.ndarray:
    """The model's output (in [0, 1], ``(h, w, C')``) for a uniform white window (cached).

    ``kind="tile"`` is the full window output (what ``independent``/``crop``/pyramids would
    compute for it); ``kind="constant"`` is the per-channel median of its central half, the
    value deep inside a uniform background that the ``seamless`` strategy fills with.
    """
    execu = execu or Executor(model, model_device(model), "fp32", None)
    key = (tuple(window), kind, execu.device.type, execu.precision, parameters_version(model))
    cache = _FILLS.setdefault(model, {})
    if key not in cache:
        x = torch.ones((1, in_channels(model), *window))
        y = execu.forward(execu.model("engine"), x)[0]
        y = ((y + 1.0) / 2.0).clamp_(0.0, 1.0).permute(1, 2, 0).numpy()
        if kind == "constant":
            h, w = window
            y = np.median(y[h // 4 : h - h // 4, w // 4 : w - w // 4], axis=(0, 1))
        cache[key] = y.astype(np.float32)
    return cache[key]


def fill_background_cells(
    padded: np.ndarray,
    out: np.ndarray,
    model: nn.Module,
    execu: Executor,
    tile: int,
    origin: tuple[int, int],
) -> None:
    """Give tissue-free statistics cells of computed blocks the background fill.

    Instance norm divides by the standard deviation of its window; on a tissue-free window
    that is the faint noise of the background, which the generator then amplifies into
    coloured texture. ``independent`` never runs such windows (it fills them), and the
    viewer's tiles skip them too; a large block with some tissue would otherwise run them.
    Filling them here makes every strategy and every block size show the same background.
    """
    h, w = padded.shape[:2]
    ys = sorted({0, h, *range(origin[0] % tile, h, tile)})
    xs = sorted({0, w, *range(origin[1] % tile, w, tile)})
    fill = None
    for a, b in itertools.pairwise(ys):
        for c, d in itertools.pairwise(xs):
            if b > a and d > c and is_background(padded[a:b, c:d]):
                if fill is None:
                    fill = background_response(model, (tile, tile), kind="constant", execu=execu)
                out[a:b, c:d] = fill


def all_tiles_background(
    part: np.ndarray, tile: int, origin: tuple[int, int], offset: tuple[int, int]
) -> bool:
    """Whether every statistics tile (grid cell) overlapping ``part`` is background."""
    h, w = part.shape[:2]
    fy = (origin[0] - offset[0]) % tile
    fx = (origin[1] - offset[1]) % tile
    ys = sorted({0, h, *range(fy, h, tile)})
    xs = sorted({0, w, *range(fx, w, tile)})
    return all(
        is_background(part[a:b, c:d])
        for a, b in itertools.pairwise(ys)
        for c, d in itertools.pairwise(xs)
        if b > a and d > c
    )
