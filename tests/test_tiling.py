"""Tile planner: windows, weights and blocks (pure numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_confocal_stain.core.tiling import (
    TILED_STRATEGIES,
    coverage,
    crossfade_blocks,
    flat_weight,
    pad_reflect,
    plan_tiles,
    seam_period,
    triangular_weight,
)
from napari_confocal_stain.inference.dense_norm import lattice_axis
from napari_confocal_stain.inference.seamless import plan_blocks


def test_triangular_weight_is_bel_formula() -> None:
    m = 16
    w = triangular_weight(m)
    lam = [max(0.0, 1.0 - abs(i / (m / 2) - 1.0)) for i in range(m)]
    np.testing.assert_allclose(w, np.outer(lam, lam))
    assert w[0, 0] == 0.0 and w[m // 2, m // 2] == 1.0
    # Crops at stride M/2 along an axis: the two weights covering a pixel sum to 1.
    line = w[m // 2]
    np.testing.assert_allclose(line[: m // 2] + line[m // 2 :], 1.0)


def test_flat_weight() -> None:
    np.testing.assert_array_equal(flat_weight(8), np.full((8, 8), 0.25))


@pytest.mark.parametrize("strategy", TILED_STRATEGIES)
@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (5, 3), (1, 1), (100, 31)])
@pytest.mark.parametrize("origin", [(0, 0), (4, 12), (17, 3)])
def test_weights_sum_to_one_everywhere(strategy, shape, origin) -> None:
    plan = plan_tiles(strategy, shape, 32, multiple=4, min_size=8, origin=origin)
    np.testing.assert_allclose(coverage(plan), 1.0, atol=1e-12)
    hp, wp = plan.padded_shape
    for y, x in plan.starts:
        assert 0 <= y and y + plan.window[0] <= hp
        assert 0 <= x and x + plan.window[1] <= wp


def test_work_factors() -> None:
    shape = (256, 256)
    per_px = {s: plan_tiles(s, shape, 64).model_pixels / (256 * 256) for s in TILED_STRATEGIES}
    assert per_px["independent"] == 1.0
    # Interior stride N/2 → 4×, N/4 → 16×; the edge padding adds a little on a small image.
    assert 4.0 <= per_px["crop"] <= 4.0 * (1 + 64 / 256) ** 2
    assert 16.0 <= per_px["pyramid"] <= 16.0 * (1 + 64 / 256) ** 2
    assert per_px["pyramid"] == per_px["pyramid-flat"]


def test_independent_small_region_is_one_window_of_the_region() -> None:
    plan = plan_tiles("independent", (19, 45), 64, multiple=8, min_size=16)
    assert len(plan.starts) == 1
    assert plan.window == (24, 48)  # rounded up to the multiple, not padded to a full tile
    plan = plan_tiles("independent", (5, 3), 64, multiple=8, min_size=16)
    assert plan.window == (16, 16)  # at least the model's minimum


def test_independent_origin_moves_the_boundaries() -> None:
    plan = plan_tiles("independent", (100, 100), 32, origin=(8, 0))
    (top, _), (left, _) = plan.pad
    boundaries = sorted({int(y) - top for y, _ in plan.starts})
    assert top == 24 and left == 0
    assert boundaries[1:] == [8, 40, 72]


def test_crop_and_pyramid_grid_periods() -> None:
    assert seam_period("independent", 512) == 512
    assert seam_period("seamless", 512) == 512
    assert seam_period("crop", 512) == 256
    assert seam_period("pyramid", 512) == 128
    with pytest.raises(ValueError, match="unknown strategy"):
        seam_period("nope", 512)
    plan = plan_tiles("crop", (128, 128), 32, origin=(0, 0))
    (top, _), _ = plan.pad
    kept = sorted({int(y) + plan.crop[0] - top for y, _ in plan.starts})
    assert kept == list(range(0, 128, 16))


def test_bad_tiles_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple"):
        plan_tiles("independent", (64, 64), 30, multiple=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        plan_tiles("crop", (64, 64), 6, multiple=2)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_tiles("mosaic", (64, 64), 32)
    with pytest.raises(ValueError, match="at least 1"):
        plan_tiles("independent", (0, 64), 32)


def test_pad_reflect_handles_long_pads_and_single_pixels() -> None:
    a = np.arange(5.0)[:, None, None] * np.ones((5, 2, 3))
    p = pad_reflect(a, ((12, 3), (0, 0)))
    assert p.shape == (20, 2, 3)
    np.testing.assert_array_equal(p[12:17], a)
    one = pad_reflect(np.ones((1, 1, 3)), ((2, 2), (3, 3)))
    assert one.shape == (5, 7, 3) and (one == 1).all()


@pytest.mark.parametrize("length,core,margin", [(1000, 256, 32), (4096, 1024, 128), (300, 64, 16)])
def test_crossfade_blocks_partition_of_unity(length, core, margin) -> None:
    blocks = crossfade_blocks(length, core, margin, cut_origin=0, multiple=8)
    total = np.zeros(length)
    for start, stop, w in blocks:
        assert start % 8 == 0 and (stop % 8 == 0 or stop == length)
        assert len(w) == stop - start
        # Zero weight within margin/2 of a block's own inner edges (its padding artefacts).
        if start > 0:
            assert (w[: margin // 2] == 0).all()
        if stop < length:
            assert (w[-(margin // 2) :] == 0).all()
        total[start:stop] += w
    np.testing.assert_allclose(total, 1.0)
    assert len(blocks) > 1


def test_plan_blocks_single_and_banded() -> None:
    one = plan_blocks((512, 512), 128, (0, 0), max_pixels=1e9, margin=32, multiple=8)
    assert len(one) == 1 and one[0].pixels == 512 * 512
    bands = plan_blocks((1024, 512), 128, (0, 0), max_pixels=400 * 512, margin=32, multiple=8)
    assert len(bands) > 1 and all(b.x0 == 0 and b.x1 == 512 for b in bands)
    assert all(b.pixels <= 400 * 512 for b in bands)
    squares = plan_blocks((512, 4096), 128, (0, 0), max_pixels=300**2, margin=32, multiple=8)
    assert any(b.x1 < 4096 for b in squares)
    for blocks, shape in ((bands, (1024, 512)), (squares, (512, 4096))):
        acc = np.zeros(shape)
        for b in blocks:
            acc[b.y0 : b.y1, b.x0 : b.x1] += np.outer(b.wy, b.wx)
        np.testing.assert_allclose(acc, 1.0)


def test_lattice_axis_windows_are_tiles_centred_on_points() -> None:
    edges, windows, centres = lattice_axis(256, 8, 0, 8)
    assert list(edges[:3]) == [0, 8, 16] and edges[-1] == 256
    assert windows.shape == (33, 32)
    np.testing.assert_array_equal(windows.sum(axis=1), 8)  # every window is one full tile
    # A point in the middle: cells 12..19, i.e. pixels 96..160, centred on the corner at 128.
    assert np.flatnonzero(windows[16]).tolist() == list(range(12, 20))
    # Near the edge the window is shifted inward, not truncated.
    assert np.flatnonzero(windows[0]).tolist() == list(range(8))
    assert centres[16] == 127.5
    # A region smaller than a tile: every window is the whole region.
    _, small, _ = lattice_axis(40, 8, 0, 8)
    assert (small == 1).all()
