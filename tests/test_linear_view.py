"""LinearStainView: the viewer's fast linear stain equals the dask path bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from _tiff_factories import image, write_tiff_pyramid

from napari_confocal_stain.core.linear_stain import linear_stain, linear_stain_table, lookup_pairs
from napari_confocal_stain.engine.linear_view import LinearStainView
from napari_confocal_stain.engine.pipeline import to_uint8
from napari_confocal_stain.io.readers import open_mosaic


def _reference(mosaic, level, box, method="gareau", **coefficients):
    y0, y1, x0, x1 = box
    r = np.asarray(mosaic.r[level][y0:y1, x0:x1])
    f = np.asarray(mosaic.f[level][y0:y1, x0:x1])
    return to_uint8(linear_stain(r, f, method, **coefficients))


def _boxes(shape):
    h, w = shape
    yield (0, h, 0, w)
    yield (h // 3, h // 3 + max(1, h // 4), w // 5, w // 5 + max(1, w // 3))
    yield (h - 1, h, w - 7, w)  # a one-row sliver at the corner


@pytest.mark.parametrize(
    ("method", "coefficients"),
    [("gareau", {}), ("gareau", {"h": (0.4, 0.1, 0.9)}), ("beer-lambert", {"k_f": 5.0})],
)
def test_uint8_slide_every_level_equals_the_dask_stain(synthetic_slide, method, coefficients):
    mosaic = open_mosaic(synthetic_slide)
    view = LinearStainView(mosaic, method, coefficients)
    assert view.uses_table
    assert 0 < len(mosaic.r_raw) <= len(mosaic.r)
    for level, shape in enumerate(view.level_shapes):
        for box in _boxes(shape):
            got = view.read(level, box)
            assert got.dtype == np.uint8
            assert got.shape == (box[1] - box[0], box[3] - box[2], 3)
            np.testing.assert_array_equal(
                got, _reference(mosaic, level, box, method, **coefficients)
            )


def test_uint16_slide_and_built_levels_take_the_general_path(tmp_path):
    # uint16 R/F stored as one level; open_mosaic builds the coarser ones (2×2 means)
    r = image((2400, 1800), np.uint16, seed=1)
    f = image((2400, 1800), np.uint16, seed=2)
    levels_r, levels_f = [r], [f]
    write_tiff_pyramid(tmp_path / "slide" / "DET#1" / "highres_raw.tif", levels_r)
    write_tiff_pyramid(tmp_path / "slide" / "DET#2" / "highres_raw.tif", levels_f)
    mosaic = open_mosaic(tmp_path / "slide")
    view = LinearStainView(mosaic)
    assert not view.uses_table
    assert len(mosaic.r) > len(mosaic.r_raw) >= 1  # some levels stored, some built
    for level, shape in enumerate(view.level_shapes):
        for box in _boxes(shape):
            np.testing.assert_array_equal(view.read(level, box), _reference(mosaic, level, box))


def test_levels_are_napari_sliceable_views(synthetic_slide):
    mosaic = open_mosaic(synthetic_slide)
    levels = LinearStainView(mosaic).levels()
    assert [lv.shape for lv in levels] == [(*a.shape, 3) for a in mosaic.r]
    sub = levels[0][100:300:2, 50:450]
    np.testing.assert_array_equal(sub, _reference(mosaic, 0, (100, 300, 50, 450))[::2])
    np.testing.assert_array_equal(np.asarray(levels[-1]), _reference(mosaic, len(levels) - 1,
                                  (0, *levels[-1].shape[:1], 0, levels[-1].shape[1])))  # fmt: skip


def test_bad_box_level_and_coefficients_are_clear(synthetic_slide):
    mosaic = open_mosaic(synthetic_slide)
    view = LinearStainView(mosaic)
    with pytest.raises(IndexError, match="level 9"):
        view.read(9, (0, 1, 0, 1))
    with pytest.raises(IndexError, match="outside level 0"):
        view.read(0, (0, 10**6, 0, 1))
    with pytest.raises(ValueError, match="unknown coefficient"):
        LinearStainView(mosaic, "gareau", {"k_f": 2.0})


def test_table_lookup_matches_direct_stain_and_checks_inputs():
    codes = np.arange(256, dtype=np.uint8)
    values = codes.astype(np.float32) / 255
    table = to_uint8(linear_stain_table(values, values))
    rng = np.random.default_rng(0)
    r = rng.integers(0, 256, (37, 41), dtype=np.uint8)
    f = rng.integers(0, 256, (37, 41), dtype=np.uint8)
    direct = to_uint8(linear_stain(r.astype(np.float32) / 255, f.astype(np.float32) / 255))
    np.testing.assert_array_equal(lookup_pairs(r, f, table), direct)
    with pytest.raises(TypeError, match="uint8"):
        lookup_pairs(r.astype(np.uint16), f, table)
    with pytest.raises(ValueError, match="differ in shape"):
        lookup_pairs(r, f[:3], table)
    with pytest.raises(ValueError, match="65536 rows"):
        lookup_pairs(r, f, table[:10])


def test_read_normalized_equals_the_dask_levels(synthetic_slide, tmp_path):
    from napari_confocal_stain.engine.pipeline import read_array, read_normalized

    r16, f16 = image((2400, 1800), np.uint16, seed=4), image((2400, 1800), np.uint16, seed=5)
    write_tiff_pyramid(tmp_path / "s16" / "DET#1" / "highres_raw.tif", [r16])
    write_tiff_pyramid(tmp_path / "s16" / "DET#2" / "highres_raw.tif", [f16])
    for mosaic in (open_mosaic(synthetic_slide), open_mosaic(tmp_path / "s16")):
        for level, shape in enumerate(mosaic.level_shapes):
            for box in _boxes(shape):
                y0, y1, x0, x1 = box
                for mode, levels in (("r", mosaic.r), ("f", mosaic.f)):
                    got = read_normalized(mosaic, mode, level, box)
                    assert got.dtype == np.float32
                    np.testing.assert_array_equal(got, read_array(levels[level][y0:y1, x0:x1]))
