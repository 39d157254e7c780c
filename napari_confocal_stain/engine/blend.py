"""Cross-fading separately computed boxes into one seam-free image (pure numpy).

A box of the GAN stain is computed on itself grown by a ``margin`` of context (see
:meth:`~napari_confocal_stain.engine.pipeline.StainPipeline.gan`). Two neighbours then both
cover a ``2·margin`` band around their shared border, and each is least trustworthy at its
own outer edge (it saw no context beyond it). Weights that ramp linearly from 0 at a grown
box's edge to 1 at ``2·margin`` inside it form a partition of unity over the band, so the
composite changes continuously from one box to the next instead of jumping at the border.
At the slide's own edges there is no neighbour and no ramp.

Where a neighbour has not been computed yet, the weights of what is there are renormalised:
a box's own weight is at least 1/2 everywhere in its core, so the composite of a lone box is
exactly that box.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from napari_confocal_stain.core.box import Box

__all__ = ["compose", "compose_uint8", "ramp"]


def ramp(start: int, stop: int, size: int, margin: int) -> np.ndarray:
    """1-D cross-fade weights of a grown interval ``[start, stop)`` of an axis of ``size``.

    Parameters
    ----------
    start, stop
        The grown interval (already clipped to ``[0, size)``).
    size
        Length of the axis (no ramp at 0 or at ``size``: nothing lies beyond).
    margin
        Context each side; the ramps are ``2·margin`` long.

    Returns
    -------
    numpy.ndarray
        float32 weights of length ``stop − start`` in (0, 1].
    """
    n = stop - start
    w = np.ones(n, dtype=np.float32)
    if margin <= 0 or n <= 0:
        return w
    band = 2 * margin
    pos = np.arange(n, dtype=np.float32) + 0.5  # pixel centres
    if start > 0:
        w = np.minimum(w, pos / band)
    if stop < size:
        w = np.minimum(w, (n - pos) / band)
    return w


def compose(
    core: Box,
    pieces: Iterable[tuple[Box, np.ndarray]],
    level_shape: tuple[int, int],
    margin: int,
) -> np.ndarray:
    """The cross-faded composite of ``pieces`` over ``core``.

    Parameters
    ----------
    core
        ``(y0, y1, x0, x1)`` to produce.
    pieces
        ``(grown_box, image)`` pairs; ``image`` is ``(gh, gw)`` or ``(gh, gw, C)`` covering
        ``grown_box``. Pieces not overlapping ``core`` are ignored. Every pixel of ``core``
        must be covered by at least one piece.
    level_shape
        ``(H, W)`` of the pyramid level (where ramps stop).
    margin
        The context the pieces were grown by.

    Returns
    -------
    numpy.ndarray
        float32 ``(h, w[, C])``.
    """
    y0, y1, x0, x1 = core
    h, w = level_shape
    acc: np.ndarray | None = None
    wsum = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for (gy0, gy1, gx0, gx1), image in pieces:
        a0, a1 = max(y0, gy0), min(y1, gy1)
        b0, b1 = max(x0, gx0), min(x1, gx1)
        if a0 >= a1 or b0 >= b1:
            continue
        wy = ramp(gy0, gy1, h, margin)[a0 - gy0 : a1 - gy0]
        wx = ramp(gx0, gx1, w, margin)[b0 - gx0 : b1 - gx0]
        wgt = wy[:, None] * wx[None, :]
        part = np.asarray(image[a0 - gy0 : a1 - gy0, b0 - gx0 : b1 - gx0], dtype=np.float32)
        if acc is None:
            acc = np.zeros((y1 - y0, x1 - x0, *part.shape[2:]), dtype=np.float32)
        dst = acc[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        dst += part * (wgt if part.ndim == 2 else wgt[..., None])
        wsum[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += wgt
    if acc is None or not np.all(wsum > 0):
        raise ValueError(f"pieces do not cover the core box {core}")
    return acc / (wsum if acc.ndim == 2 else wsum[..., None])


def compose_uint8(
    core: Box,
    own: tuple[Box, np.ndarray],
    pieces: Iterable[tuple[Box, np.ndarray]],
    level_shape: tuple[int, int],
    margin: int,
) -> np.ndarray:
    """:func:`compose` of uint8 pieces, rounded to uint8, computed only where pieces overlap.

    ``own`` is the piece grown from ``core`` itself. More than ``margin`` pixels inside
    ``core`` no other piece reaches and ``own``'s weight is exactly 1 (its ramp ends
    ``2·margin`` inside its grown box), so there the composite *is* ``own``: those pixels are
    copied, and only the four border bands are cross-faded. The result equals
    ``(compose(...) + 0.5).astype(uint8)`` bit for bit, at about a fifth of the cost for a
    512-px tile (the viewer composes a tile and its done neighbours whenever one lands).

    Parameters
    ----------
    core
        ``(y0, y1, x0, x1)`` to produce.
    own
        ``(grown_box, image)`` of the piece grown from ``core``.
    pieces
        Every piece to cross-fade, ``own`` included.
    level_shape, margin
        As for :func:`compose`.

    Returns
    -------
    numpy.ndarray
        uint8 ``(h, w[, C])``.
    """
    y0, y1, x0, x1 = core
    pieces = list(pieces)
    if margin <= 0 or y1 - y0 <= 2 * margin or x1 - x0 <= 2 * margin:
        return (compose(core, pieces, level_shape, margin) + 0.5).astype(np.uint8)
    (gy0, _, gx0, _), image = own
    out = np.empty((y1 - y0, x1 - x0, *image.shape[2:]), dtype=np.uint8)
    m = margin
    out[m:-m, m:-m] = image[y0 + m - gy0 : y1 - m - gy0, x0 + m - gx0 : x1 - m - gx0]
    bands = [
        (y0, y0 + m, x0, x1),
        (y1 - m, y1, x0, x1),
        (y0 + m, y1 - m, x0, x0 + m),
        (y0 + m, y1 - m, x1 - m, x1),
    ]
    for by0, by1, bx0, bx1 in bands:
        part = compose((by0, by1, bx0, bx1), pieces, level_shape, margin)
        out[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = (part + 0.5).astype(np.uint8)
    return out
