"""Tile planner: where each model window goes, what part of its output is kept, how it is blended.

Pure numpy, no torch. :mod:`napari_confocal_stain.inference` runs the plans.

The thesis's whole-slide strategies (García 2019, §3.4 and Fig. 3.6), for a window of ``N × N``
model input pixels:

``independent``  windows at stride ``N``, every output pixel kept (1× the model's work).
``crop``         windows at stride ``N/2``, only the centre ``N/2 × N/2`` of each output kept;
                 the kept squares tile the image without overlap (4× the work).
``pyramid``      Bel et al. 2019: windows at stride ``N/4``, centre ``M × M`` kept (``M = N/2``),
                 crops blended with the separable triangular weight
                 ``W[m, n] = Λ(m/(M/2) − 1) · Λ(n/(M/2) − 1)``, ``Λ(t) = max(0, 1 − |t|)``
                 (16× the work). Along an axis the crops start every ``M/2`` pixels, so each
                 pixel lies in exactly two crops, at offsets ``m`` and ``m + M/2``, whose weights
                 ``m/(M/2)`` and ``1 − m/(M/2)`` sum to 1.
``pyramid-flat`` the same windows with the flat weight ``W = 0.25`` (each pixel lies in 2 × 2
                 crops, so the weights also sum to 1).

Edges: the image is reflect-padded so that every output pixel gets exactly the same treatment as
an interior pixel (a full set of crops with weights summing to 1, or the centre of a ``crop``
window); nothing is left with a degraded border. A region smaller than one tile is run as one
window of the region's size rounded up to the model's size multiple.

Grid origin: every plan takes ``origin = (oy, ox)``, the image coordinates of one line of the
grid of output-tile boundaries (they lie at ``origin + k · period``, ``period`` from
:func:`seam_period`). Running a strategy twice with origins half a period apart is what the seam
index (:mod:`napari_confocal_stain.core.seams`) compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("seamless", "independent", "crop", "pyramid", "pyramid-flat")
"""Every strategy :func:`napari_confocal_stain.inference.stain_region` accepts."""

TILED_STRATEGIES = ("independent", "crop", "pyramid", "pyramid-flat")
"""The strategies run as a batch of separate windows (planned by :func:`plan_tiles`)."""


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``≥ n``."""
    return -(-int(n) // int(multiple)) * int(multiple)


def seam_period(strategy: str, tile: int) -> int:
    """Spacing of the output-tile boundaries a strategy leaves in its output.

    Parameters
    ----------
    strategy
        One of :data:`STRATEGIES`.
    tile
        The window size ``N``.

    Returns
    -------
    int
        ``N`` for ``independent`` and ``seamless`` (the normalisation-statistics grid), ``N/2``
        for ``crop`` (the kept centres), ``N/4`` for the pyramids (crop starts).
    """
    if strategy in ("independent", "seamless"):
        return int(tile)
    if strategy == "crop":
        return int(tile) // 2
    if strategy in ("pyramid", "pyramid-flat"):
        return int(tile) // 4
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def triangular_weight(m: int) -> np.ndarray:
    """Bel et al.'s ``M × M`` blending weight ``Λ(i/(M/2) − 1) · Λ(j/(M/2) − 1)`` (thesis §3.4 b).

    Parameters
    ----------
    m
        Crop size ``M`` (even).

    Returns
    -------
    numpy.ndarray
        ``(M, M)`` float64; 0 on the first row/column, 1 at ``(M/2, M/2)``.
    """
    half = m / 2.0
    t = np.arange(m, dtype=np.float64) / half - 1.0
    lam = np.maximum(0.0, 1.0 - np.abs(t))
    return np.outer(lam, lam)


def flat_weight(m: int) -> np.ndarray:
    """The ``M × M`` "all 0.25" weight of thesis §3.4 a."""
    return np.full((m, m), 0.25)


@dataclass(frozen=True)
class TilePlan:
    """Where the windows of a tiled strategy go and how their outputs are combined.

    Coordinates are in the *padded* image: the input is reflect-padded by ``pad`` first, window
    ``k`` is ``padded[y:y+wh, x:x+ww]`` with ``(y, x) = starts[k]``, the kept part of its output
    is ``out[crop[0]:crop[1], crop[2]:crop[3]]``, placed at ``starts[k] + (crop[0], crop[2])``
    in the padded canvas (multiplied by ``weight`` and summed if ``weight`` is not ``None``,
    copied otherwise), and the result is the canvas cropped by ``pad``.

    Attributes
    ----------
    strategy
        The strategy name.
    shape
        Output ``(H, W)``.
    window
        Model input ``(wh, ww)``.
    pad
        ``((top, bottom), (left, right))`` reflect padding of the input.
    starts
        ``(n, 2)`` int array of window top-left corners.
    crop
        ``(y0, y1, x0, x1)`` kept part of each window's output.
    weight
        ``(y1 − y0, x1 − x0)`` blending weight, or ``None`` when kept parts do not overlap.
    """

    strategy: str
    shape: tuple[int, int]
    window: tuple[int, int]
    pad: tuple[tuple[int, int], tuple[int, int]]
    starts: np.ndarray
    crop: tuple[int, int, int, int]
    weight: np.ndarray | None

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the padded input."""
        (t, b), (left, r) = self.pad
        return (self.shape[0] + t + b, self.shape[1] + left + r)

    @property
    def model_pixels(self) -> int:
        """Pixels fed to the model: number of windows × window area."""
        return len(self.starts) * self.window[0] * self.window[1]


def _axis_independent(
    length: int, tile: int, multiple: int, min_size: int, origin: int
) -> tuple[int, int, int, list[int]]:
    """(window, pad_before, pad_after, starts) along one axis for ``independent``."""
    shift = (tile - origin % tile) % tile  # pixels of the first tile that lie before 0
    if shift == 0 and length <= tile:
        # One window covers the axis: shrink it to the region (no reflected filler to normalise).
        win = max(round_up(length, multiple), min_size)
        return win, 0, win - length, [0]
    n = -(-(length + shift) // tile)
    return tile, shift, n * tile - length - shift, [k * tile for k in range(n)]


def _axis_crop(length: int, tile: int, origin: int) -> tuple[int, int, list[int]]:
    """(pad_before, pad_after, window starts) along one axis for ``crop``."""
    keep = tile // 2
    shift = (keep - origin % keep) % keep
    n = -(-(length + shift) // keep)
    ctx = tile // 4  # context each side of the kept centre
    before = shift + ctx
    after = n * keep - length - shift + ctx
    return before, after, [k * keep for k in range(n)]


def _axis_pyramid(length: int, tile: int, origin: int) -> tuple[int, int, list[int]]:
    """(pad_before, pad_after, window starts) along one axis for the pyramids.

    Crops (length ``M = N/2``) start at ``c_k = c_0 + k·S``, ``S = N/4``, ``c_0 ≡ origin (mod S)``
    in ``(−2S, −S]``, so pixel 0 already lies in two crops; they continue until the last pixel
    does too. Windows extend each crop by ``S`` on both sides.
    """
    s = tile // 4
    c0 = -s - (s - origin % s) % s
    n = (length - 1 - c0) // s + 1
    before = s - c0  # window 0 starts at c0 − S
    after = c0 + (n - 1) * s + 3 * s - length
    return before, after, [k * s for k in range(n)]


def plan_tiles(
    strategy: str,
    shape: tuple[int, int],
    tile: int,
    *,
    multiple: int = 1,
    min_size: int = 1,
    origin: tuple[int, int] = (0, 0),
) -> TilePlan:
    """Plan one of the thesis's tiled strategies on an ``H × W`` image.

    Parameters
    ----------
    strategy
        ``"independent"``, ``"crop"``, ``"pyramid"`` or ``"pyramid-flat"``.
    shape
        Image ``(H, W)``; any size ≥ 1.
    tile
        Window size ``N``: a multiple of ``multiple``, and of 4 for the overlapping strategies.
    multiple
        The model's size multiple (``2**n_down``).
    min_size
        The model's smallest accepted height/width.
    origin
        A point of the output-tile boundary grid, in image pixels (see the module docstring).

    Returns
    -------
    TilePlan
    """
    h, w = (int(shape[0]), int(shape[1]))
    tile = int(tile)
    if h < 1 or w < 1:
        raise ValueError(f"plan_tiles: image must be at least 1×1, got {h}×{w}")
    if tile < max(min_size, 1) or tile % multiple:
        raise ValueError(
            f"plan_tiles: tile {tile} must be a multiple of the model's size multiple {multiple} "
            f"and at least {min_size}"
        )
    oy, ox = (int(origin[0]), int(origin[1]))
    if strategy == "independent":
        wy, ty, by, sy = _axis_independent(h, tile, multiple, min_size, oy)
        wx, tx, bx, sx = _axis_independent(w, tile, multiple, min_size, ox)
        starts = np.array([(y, x) for y in sy for x in sx], dtype=np.int64).reshape(-1, 2)
        return TilePlan(strategy, (h, w), (wy, wx), ((ty, by), (tx, bx)), starts,
                        (0, wy, 0, wx), None)  # fmt: skip
    if strategy not in TILED_STRATEGIES:
        raise ValueError(f"plan_tiles: unknown strategy {strategy!r}; expected {TILED_STRATEGIES}")
    if tile % 4 or (tile // 4) < 1:
        raise ValueError(f"plan_tiles: {strategy} needs a tile divisible by 4, got {tile}")
    if strategy == "crop":
        ty, by, sy = _axis_crop(h, tile, oy)
        tx, bx, sx = _axis_crop(w, tile, ox)
        weight = None
    else:
        ty, by, sy = _axis_pyramid(h, tile, oy)
        tx, bx, sx = _axis_pyramid(w, tile, ox)
        m = tile // 2
        weight = triangular_weight(m) if strategy == "pyramid" else flat_weight(m)
    q = tile // 4
    starts = np.array([(y, x) for y in sy for x in sx], dtype=np.int64).reshape(-1, 2)
    return TilePlan(strategy, (h, w), (tile, tile), ((ty, by), (tx, bx)), starts,
                    (q, 3 * q, q, 3 * q), weight)  # fmt: skip


def pad_reflect(image: np.ndarray, pad: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Reflect-pad the two leading axes of ``image`` (``symmetric`` when an axis is 1 px).

    numpy's ``reflect`` repeats the reflection for pads longer than the axis, so any pad works.
    """
    if not any(pad[0]) and not any(pad[1]):
        return image
    widths = [tuple(pad[0]), tuple(pad[1])] + [(0, 0)] * (image.ndim - 2)
    mode = "reflect" if min(image.shape[:2]) > 1 else "symmetric"
    return np.pad(image, widths, mode=mode)


def coverage(plan: TilePlan) -> np.ndarray:
    """Sum of blending weights (or of copy counts) landing on each output pixel.

    For a correct plan this is 1 everywhere; tests and :func:`plan_tiles` users can check it.
    """
    hp, wp = plan.padded_shape
    acc = np.zeros((hp, wp))
    y0, y1, x0, x1 = plan.crop
    wgt = np.ones((y1 - y0, x1 - x0)) if plan.weight is None else plan.weight
    for y, x in plan.starts:
        acc[y + y0 : y + y1, x + x0 : x + x1] += wgt
    (t, _), (left, _) = plan.pad
    return acc[t : t + plan.shape[0], left : left + plan.shape[1]]


# ----------------------------------------------------------------------------------------------
# The seamless strategy's grids (used by core/seamless.py)


def crossfade_blocks(
    length: int, core: int, margin: int, cut_origin: int, multiple: int
) -> list[tuple[int, int, np.ndarray]]:
    """Split an axis into overlapping blocks whose outputs cross-fade linearly.

    Blocks are cut at positions ``cut_origin + k·core`` (callers put them at statistics-tile
    centres, where a partial tile at a block edge still yields nearly its full statistics).
    Block ``i`` reads ``[cut_i − margin, cut_{i+1} + margin)`` (clipped to the axis, rounded out
    to ``multiple``) and its output weight ramps linearly from 1 to 0 over
    ``[cut − margin/2, cut + margin/2)``, so neighbouring weights sum to 1 and each block's own
    padding artefacts (within ``margin/2`` of its edge) get weight 0.

    Returns
    -------
    list of (start, stop, weight)
        Block input ranges and the ``(stop − start,)`` output weight of each.
    """
    length = int(length)
    if core >= length:
        return [(0, length, np.ones(length))]
    first = int(cut_origin) % core
    cuts = [c for c in range(first, length, core) if margin < c < length - margin]
    if not cuts:
        return [(0, length, np.ones(length))]
    bounds = [0, *cuts, length]
    half = margin / 2.0
    p = np.arange(length, dtype=np.float64)
    blocks = []
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        start = 0 if i == 0 else max(0, (lo - margin) // multiple * multiple)
        stop = length if i == len(bounds) - 2 else min(length, round_up(hi + margin, multiple))
        rise = np.ones(length) if i == 0 else np.clip((p - (lo - half)) / margin, 0.0, 1.0)
        last = i == len(bounds) - 2
        fall = np.ones(length) if last else np.clip(((hi + half) - p) / margin, 0.0, 1.0)
        blocks.append((start, stop, (rise * fall)[start:stop]))
    return blocks
