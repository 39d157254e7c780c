"""Seam and fidelity measures for tiled inference (pure numpy).

Seam index (DESIGN.md)
    Let the strategy's output-tile boundaries lie on the grid ``origin + k·period`` (rows and
    columns; ``period`` from :func:`napari_confocal_stain.core.tiling.seam_period`). At every
    boundary that has ``strip`` pixels on both sides inside the image:

    1. take the ``strip``-pixel-wide strips on either side of the boundary line,
    2. cut them along the boundary into ``segment``-pixel pieces (whole pieces only) and average
       each piece, per channel, over its ``strip × segment`` pixels,
    3. take ``|left piece mean − right piece mean|`` and average over channels.

    The *boundary step* of an image is the mean of (3) over every piece of every horizontal
    and vertical boundary. The **seam index** is the boundary step of the tiled output divided
    by the boundary step, *at the same places*, of the output of the same strategy run with its
    grid shifted by half a period (where no boundary lies there). Image content contributes
    equally to both, so 1.0 means no seam; a seam (a colour/brightness step along tile edges)
    raises it. Averaging 8 × 32 pixels before differencing suppresses texture, so the measure
    is not fooled by content the way a raw gradient ratio is.

Reference difference
    Mean and max absolute difference and PSNR (data range 1) of an output against a reference,
    e.g. a single pass of the model over the whole region.
"""

from __future__ import annotations

import math

import numpy as np


def grid_lines(length: int, period: int, origin: int = 0, *, strip: int = 8) -> np.ndarray:
    """Boundary positions ``origin + k·period`` with ``strip`` pixels on both sides.

    A boundary at ``p`` lies between pixels ``p − 1`` and ``p``.
    """
    if period < 1:
        raise ValueError(f"grid_lines: period must be ≥ 1, got {period}")
    first = int(origin) % int(period)
    return np.array(
        [p for p in range(first, int(length), int(period)) if p >= strip and p + strip <= length],
        dtype=np.int64,
    )


def _as_hwc(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return arr


def _piece_steps(img: np.ndarray, lines: np.ndarray, strip: int, segment: int) -> np.ndarray:
    """Per-piece |left − right| strip means at vertical lines ``lines`` of ``img`` (H, W, C)."""
    h = img.shape[0]
    n = h // segment
    if n == 0 or len(lines) == 0:
        return np.empty(0)
    steps = []
    for x in lines:
        left = img[: n * segment, x - strip : x].reshape(n, segment, strip, -1).mean(axis=(1, 2))
        right = img[: n * segment, x : x + strip].reshape(n, segment, strip, -1).mean(axis=(1, 2))
        steps.append(np.abs(left - right).mean(axis=-1))
    return np.concatenate(steps)


def boundary_step(
    image: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    *,
    strip: int = 8,
    segment: int = 32,
) -> float:
    """Mean |difference| of ``strip``-px strip means across the given boundaries.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, C)``.
    ys, xs
        Horizontal boundary rows and vertical boundary columns (see :func:`grid_lines`).
    strip, segment
        Strip width across the boundary and piece length along it.

    Returns
    -------
    float
        The mean over all pieces (NaN if there are none).
    """
    img = _as_hwc(image)
    vertical = _piece_steps(img, np.asarray(xs, dtype=np.int64), strip, segment)
    horizontal = _piece_steps(
        img.transpose(1, 0, 2), np.asarray(ys, dtype=np.int64), strip, segment
    )
    both = np.concatenate([vertical, horizontal])
    return float(both.mean()) if both.size else math.nan


def seam_index(
    output: np.ndarray,
    shifted_output: np.ndarray,
    tile: int,
    *,
    strip: int = 8,
    segment: int = 32,
    origin: tuple[int, int] = (0, 0),
    boundaries: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """The seam index of a tiled output (see the module docstring).

    Parameters
    ----------
    output
        The strategy's output, with tile boundaries at ``origin + k·tile``.
    shifted_output
        The same strategy's output on the same image with the grid shifted by ``tile/2``.
    tile
        Boundary spacing (the strategy's seam period, ``N`` for ``independent``).
    strip, segment
        8 and 32 in DESIGN.md.
    origin
        Grid origin of ``output``.
    boundaries
        Explicit ``(rows, cols)`` boundary positions instead of the regular grid (e.g. for a
        sliding-window inferer whose windows do not tile regularly).

    Returns
    -------
    float
        ≈ 1.0 without seams; larger with them.
    """
    a, b = _as_hwc(output), _as_hwc(shifted_output)
    if a.shape != b.shape:
        raise ValueError(f"seam_index: outputs differ in shape: {a.shape} vs {b.shape}")
    if boundaries is None:
        ys = grid_lines(a.shape[0], tile, origin[0], strip=strip)
        xs = grid_lines(a.shape[1], tile, origin[1], strip=strip)
    else:
        ys = np.asarray([p for p in boundaries[0] if strip <= p <= a.shape[0] - strip])
        xs = np.asarray([p for p in boundaries[1] if strip <= p <= a.shape[1] - strip])
    if len(ys) + len(xs) == 0:
        raise ValueError(
            f"seam_index: no tile boundary with {strip} px on both sides in a "
            f"{a.shape[0]}×{a.shape[1]} image at tile {tile}"
        )
    num = boundary_step(a, ys, xs, strip=strip, segment=segment)
    den = boundary_step(b, ys, xs, strip=strip, segment=segment)
    if not den > 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def reference_difference(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far an output is from a reference, on a data range of 1.

    Returns
    -------
    dict
        ``mean_abs``, ``max_abs`` and ``psnr`` (dB; ``inf`` when identical).
    """
    a = np.asarray(output, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"reference_difference: shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    mse = float((d**2).mean())
    return {
        "mean_abs": float(d.mean()),
        "max_abs": float(d.max()),
        "psnr": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse),
    }
