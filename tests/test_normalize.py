"""Normalisation modes against explicit numpy formulas (numpy and dask inputs)."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from napari_confocal_stain.core.normalize import (
    NORMALIZATION_MODES,
    apply_normalization,
    normalization_stats,
    normalize_pair,
)


def _expected(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((x.astype(np.float64) - low) / (high - low), 0.0, 1.0)


@pytest.fixture(params=["uint8", "uint16", "float32"])
def pair(request):
    dt = np.dtype(request.param)
    rng = np.random.default_rng(3)
    if dt.kind == "f":
        r = (rng.random((120, 90)) * 0.6 + 0.3).astype(dt)
        f = (rng.random((120, 90)) * 0.5 + 0.05).astype(dt)
    else:
        top = np.iinfo(dt).max
        r = (rng.random((120, 90)) * 0.6 * top + 0.3 * top).astype(dt)
        f = (rng.random((120, 90)) * 0.5 * top + 0.05 * top).astype(dt)
    return r, f


def test_independent_is_each_modes_min_max(pair):
    r, f = pair
    r01, f01, stats = normalize_pair(r, f, "independent")
    np.testing.assert_allclose(r01, _expected(r, r.min(), r.max()), atol=1e-6)
    np.testing.assert_allclose(f01, _expected(f, f.min(), f.max()), atol=1e-6)
    assert stats["r"] == {"low": float(r.min()), "high": float(r.max())}
    assert r01.min() == 0.0 and r01.max() == 1.0


def test_global_uses_smaller_minimum_and_larger_maximum(pair):
    r, f = pair
    low = min(r.min(), f.min())
    high = max(r.max(), f.max())
    r01, f01, stats = normalize_pair(r, f, "global")
    np.testing.assert_allclose(r01, _expected(r, low, high), atol=1e-6)
    np.testing.assert_allclose(f01, _expected(f, low, high), atol=1e-6)
    # F is the darker mode here: the thesis listing's "larger minimum" would be R's and
    # clip part of F to 0; the global minimum keeps all of F's range.
    thesis_low = max(r.min(), f.min())
    assert stats["r"]["low"] == stats["f"]["low"] == float(low) < float(thesis_low)
    assert (f01 > 0).sum() == (f > low).sum()


def test_average_uses_min_max_of_mean(pair):
    r, f = pair
    avg = (r.astype(np.float64) + f.astype(np.float64)) / 2
    r01, f01, stats = normalize_pair(r, f, "average")
    np.testing.assert_allclose(r01, _expected(r, avg.min(), avg.max()), atol=1e-6)
    np.testing.assert_allclose(f01, _expected(f, avg.min(), avg.max()), atol=1e-6)
    assert stats["r"] == stats["f"] == {"low": avg.min(), "high": avg.max()}


def test_percentile_default_matches_numpy_percentile(pair):
    r, f = pair
    r01, f01, stats = normalize_pair(r, f)
    assert stats["mode"] == "percentile" and stats["percentiles"] == [0.5, 99.8]
    rlo, rhi = np.percentile(r, [0.5, 99.8])
    flo, fhi = np.percentile(f, [0.5, 99.8])
    np.testing.assert_allclose(r01, _expected(r, rlo, rhi), atol=1e-6)
    np.testing.assert_allclose(f01, _expected(f, flo, fhi), atol=1e-6)
    # Robust: the extreme 0.5 % are clipped, not stretched.
    assert 0 < (r01 == 1.0).mean() < 0.01


def test_percentile_custom_values():
    x = np.arange(1000, dtype=np.float32)
    stats = normalization_stats(x, x, "percentile", percentiles=(10, 90))
    assert stats["r"]["low"] == pytest.approx(np.percentile(x, 10))
    assert stats["r"]["high"] == pytest.approx(np.percentile(x, 90))


def test_dtype_mode_divides_by_dtype_max():
    r8 = np.array([[0, 51, 255]], np.uint8)
    r16 = np.array([[0, 13107, 65535]], np.uint16)
    a, b, stats = normalize_pair(r8, r16, "dtype", f_dtype=np.uint16)
    np.testing.assert_allclose(a, [[0, 0.2, 1.0]], atol=1e-7)
    np.testing.assert_allclose(b, [[0, 0.2, 1.0]], atol=1e-7)
    assert stats["r"]["high"] == 255 and stats["f"]["high"] == 65535
    fl = np.array([[-0.5, 0.25, 1.5]], np.float32)
    c, _, _ = normalize_pair(fl, fl, "dtype")
    np.testing.assert_array_equal(c, np.array([[0, 0.25, 1.0]], np.float32))


def test_dask_in_lazy_dask_out_same_values(pair):
    r, f = pair
    rd, fd = da.from_array(r, chunks=(50, 40)), da.from_array(f, chunks=(50, 40))
    for mode in NORMALIZATION_MODES:
        stats = normalization_stats(r, f, mode)
        a, b, _ = normalize_pair(rd, fd, stats=stats)
        assert isinstance(a, da.Array) and a.chunks == rd.chunks and a.dtype == np.float32
        na, nb, _ = normalize_pair(r, f, stats=stats)
        assert isinstance(na, np.ndarray)
        np.testing.assert_array_equal(a.compute(), na)
        np.testing.assert_array_equal(b.compute(), nb)


def test_stats_from_dask_equal_stats_from_numpy(pair):
    r, f = pair
    for mode in NORMALIZATION_MODES:
        s1 = normalization_stats(r, f, mode)
        s2 = normalization_stats(da.from_array(r, chunks=30), da.from_array(f, chunks=30), mode)
        assert s1 == s2


def test_output_float32_in_unit_range_and_json_stats(pair):
    r, f = pair
    for mode in NORMALIZATION_MODES:
        a, b, stats = normalize_pair(r, f, mode)
        assert a.dtype == b.dtype == np.float32
        assert 0.0 <= a.min() and a.max() <= 1.0 and 0.0 <= b.min() and b.max() <= 1.0
        json.dumps(stats)


def test_nan_and_inf_never_reach_the_output():
    x = np.array([[np.nan, np.inf, -np.inf, 0.25, 0.5, 0.75]], np.float32)
    stats = normalization_stats(x, x, "independent")
    # NaN/inf are ignored by the statistics ...
    assert stats["r"] == {"low": 0.25, "high": 0.75}
    # ... and mapped to 0 / 1 / 0 by the map, for numpy and dask alike.
    expected = np.array([[0, 1, 0, 0, 0.5, 1]], np.float32)
    np.testing.assert_array_equal(apply_normalization(x, 0.25, 0.75), expected)
    lazy = apply_normalization(da.from_array(x, chunks=(1, 2)), 0.25, 0.75)
    np.testing.assert_array_equal(lazy.compute(), expected)


def test_constant_image_does_not_divide_by_zero():
    const = np.full((10, 10), 7, np.uint16)
    other = np.arange(100, dtype=np.uint16).reshape(10, 10)
    with np.errstate(all="raise"):
        for mode in NORMALIZATION_MODES:
            a, b, stats = normalize_pair(const, other, mode)
            assert np.isfinite(a).all() and np.isfinite(b).all()
    stats = normalization_stats(const, other, "independent")
    assert stats["constant"] == {"r": True, "f": False}
    # A constant mode falls back to the dtype map: 7 / 65535.
    a, _, _ = normalize_pair(const, other, "independent")
    np.testing.assert_allclose(a, 7 / 65535, rtol=1e-6)
    zeros = np.zeros((4, 4), np.float32)
    a, b, stats = normalize_pair(zeros, zeros, "global")
    assert stats["constant"] == {"r": True, "f": True}
    assert (a == 0).all() and (b == 0).all()


def test_percentile_falls_back_to_min_max_for_sparse_signal():
    f = np.zeros((100, 100), np.uint8)
    f[0, :10] = 200  # 0.1 % of the pixels: both percentiles are 0
    stats = normalization_stats(f, f, "percentile")
    assert stats["f"] == {"low": 0.0, "high": 200.0}
    assert stats["constant"]["f"] is False


def test_degenerate_span_is_a_step_not_a_division_by_zero():
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    with np.errstate(all="raise"):
        out = apply_normalization(x, 2.0, 2.0)
    np.testing.assert_array_equal(out, [[0.0, 0.0, 1.0]])


def test_bad_arguments():
    x = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="unknown normalization"):
        normalization_stats(x, x, "minmax")
    with pytest.raises(ValueError, match="percentiles"):
        normalization_stats(x, x, "percentile", percentiles=(99, 1))
    with pytest.raises(ValueError, match="one shape"):
        normalization_stats(x, np.zeros((3, 3), np.uint8), "average")
