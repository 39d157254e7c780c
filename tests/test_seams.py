"""Seam index and reference difference (pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_confocal_stain.core.seams import (
    boundary_step,
    grid_lines,
    reference_difference,
    seam_index,
)


def _field(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([gaussian_filter(rng.random(shape), 3) for _ in range(3)], axis=-1)


def _tiled(base: np.ndarray, tile: int, origin: int, strength: float, seed: int) -> np.ndarray:
    """``base`` plus a constant offset per tile of a grid at ``origin`` (a synthetic seam)."""
    rng = np.random.default_rng(seed)
    h, w = base.shape[:2]
    iy = (np.arange(h) - origin) // tile
    ix = (np.arange(w) - origin) // tile
    offsets = rng.normal(0, strength, size=(iy.max() - iy.min() + 1, ix.max() - ix.min() + 1))
    return base + offsets[np.ix_(iy - iy.min(), ix - ix.min())][..., None]


def test_boundary_step_matches_explicit_definition() -> None:
    img = _field((96, 64), 1)
    ys, xs = np.array([32, 64]), np.array([32])
    strip, segment = 8, 32
    values = []
    for x in xs:  # vertical boundaries: pieces along the rows
        for r in range(0, 96 - segment + 1, segment):
            left = img[r : r + segment, x - strip : x].mean(axis=(0, 1))
            right = img[r : r + segment, x : x + strip].mean(axis=(0, 1))
            values.append(np.abs(left - right).mean())
    for y in ys:  # horizontal boundaries: pieces along the columns
        for c in range(0, 64 - segment + 1, segment):
            up = img[y - strip : y, c : c + segment].mean(axis=(0, 1))
            down = img[y : y + strip, c : c + segment].mean(axis=(0, 1))
            values.append(np.abs(up - down).mean())
    assert boundary_step(img, ys, xs) == pytest.approx(np.mean(values), rel=1e-12)


def test_grid_lines_need_a_full_strip_on_both_sides() -> None:
    assert grid_lines(100, 32).tolist() == [32, 64]  # 0 and 96 lack a full strip
    assert grid_lines(100, 32, 16).tolist() == [16, 48, 80]
    assert grid_lines(100, 32, 4).tolist() == [36, 68]
    with pytest.raises(ValueError):
        grid_lines(100, 0)


def test_seam_index_detects_tile_offsets_and_not_content() -> None:
    base = _field((256, 256), 2)
    seamy = _tiled(base, 64, 0, 0.02, 3)
    shifted = _tiled(base, 64, 32, 0.02, 4)
    assert seam_index(seamy, shifted, 64) > 1.5
    # The same kind of image at its own (shifted) grid is seamy too...
    assert seam_index(shifted, seamy, 64, origin=(32, 32)) > 1.5
    # ...and smooth content against itself scores exactly 1.
    assert seam_index(base, base, 64) == pytest.approx(1.0)
    # Independent smooth outputs score about 1.
    assert 0.8 < seam_index(base, _field((256, 256), 2) * 1.0, 64) < 1.25


def test_seam_index_grayscale_and_explicit_boundaries() -> None:
    base = _field((128, 128), 5)[..., 0]
    seamy = _tiled(base[..., None], 32, 0, 0.05, 6)[..., 0]
    assert seam_index(seamy, base, 32) > 2.0
    val = seam_index(seamy, base, 32, boundaries=(np.array([32, 64, 96]), np.array([32, 64, 96])))
    assert val == pytest.approx(seam_index(seamy, base, 32))


def test_seam_index_errors() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        seam_index(np.zeros((64, 64)), np.zeros((64, 32)), 32)
    with pytest.raises(ValueError, match="no tile boundary"):
        seam_index(np.zeros((20, 20)), np.zeros((20, 20)), 32)


def test_reference_difference() -> None:
    a = np.zeros((10, 10, 3))
    b = a.copy()
    d = reference_difference(a, b)
    assert d["mean_abs"] == 0 and d["max_abs"] == 0 and math.isinf(d["psnr"])
    b[0, 0, 0] = 0.3
    d = reference_difference(a, b)
    assert d["max_abs"] == pytest.approx(0.3)
    assert d["mean_abs"] == pytest.approx(0.3 / 300)
    assert d["psnr"] == pytest.approx(10 * math.log10(1 / (0.09 / 300)))
    with pytest.raises(ValueError):
        reference_difference(a, b[:5])
