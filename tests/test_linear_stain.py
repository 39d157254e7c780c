"""Formula tests of the Gareau and Beer–Lambert linear stains."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_confocal_stain.core.linear_stain import (
    BEER_LAMBERT_DEFAULTS,
    GAREAU_DEFAULTS,
    linear_stain,
    linear_stain_levels,
)

H = np.array([0.30, 0.20, 1.0])
E = np.array([1.0, 0.55, 0.88])


@pytest.fixture
def rf():
    rng = np.random.default_rng(0)
    return rng.random((37, 53), dtype=np.float32), rng.random((37, 53), dtype=np.float32)


def test_published_constants():
    assert GAREAU_DEFAULTS["h"] == (0.30, 0.20, 1.0)
    assert GAREAU_DEFAULTS["e"] == (1.0, 0.55, 0.88)
    assert BEER_LAMBERT_DEFAULTS["beta_nuclear"] == (0.17, 0.27, 0.105)
    assert BEER_LAMBERT_DEFAULTS["beta_cyto"] == (0.05, 1.0, 0.54)


def test_gareau_matches_formula_pixel_by_pixel(rf):
    r, f = rf
    out = linear_stain(r, f)
    assert out.shape == (37, 53, 3) and out.dtype == np.float32
    for y, x in [(0, 0), (5, 7), (36, 52), (20, 30)]:
        expected = np.clip(1 - f[y, x] * (1 - H) - r[y, x] * (1 - E), 0, 1)
        np.testing.assert_allclose(out[y, x], expected, atol=1e-6)


def test_gareau_pure_modes_give_stain_colours():
    zeros, ones = np.zeros((4, 4)), np.ones((4, 4))
    np.testing.assert_allclose(linear_stain(zeros, ones)[0, 0], H, atol=1e-6)  # nuclei -> H
    np.testing.assert_allclose(linear_stain(ones, zeros)[0, 0], E, atol=1e-6)  # collagen -> E
    np.testing.assert_allclose(linear_stain(zeros, zeros)[0, 0], [1, 1, 1])  # empty -> white


def test_gareau_clips_where_both_modes_are_bright():
    # The thesis's VirtualStainer goes negative here: 1 - 0.7 - 0 = 0.3 (R), G: 1-0.8-0.45 < 0.
    out = linear_stain(np.ones((2, 2)), np.ones((2, 2)))
    assert out.min() >= 0.0 and out.max() <= 1.0
    raw = 1 - (1 - H) - (1 - E)
    assert (raw < 0).any()
    np.testing.assert_allclose(out[0, 0], np.clip(raw, 0, 1), atol=1e-6)


def test_gareau_custom_vectors(rf):
    r, f = rf
    h, e = (0.5, 0.1, 0.9), (0.9, 0.4, 0.7)
    out = linear_stain(r, f, h=h, e=e)
    expected = np.clip(
        1 - f[..., None] * (1 - np.array(h)) - r[..., None] * (1 - np.array(e)), 0, 1
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_beer_lambert_matches_formula(rf):
    r, f = rf
    out = linear_stain(r, f, "beer-lambert")
    bn = np.array(BEER_LAMBERT_DEFAULTS["beta_nuclear"])
    bc = np.array(BEER_LAMBERT_DEFAULTS["beta_cyto"])
    kf, kr = BEER_LAMBERT_DEFAULTS["k_f"], BEER_LAMBERT_DEFAULTS["k_r"]
    expected = np.exp(-bn * kf * f[..., None]) * np.exp(-bc * kr * r[..., None])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Nuclei (F) absorb green most -> purple; collagen (R) absorbs green -> pink.
    nuc = linear_stain(np.zeros((1, 1)), np.ones((1, 1)), "beer-lambert")[0, 0]
    col = linear_stain(np.ones((1, 1)), np.zeros((1, 1)), "beer-lambert")[0, 0]
    assert nuc[1] < nuc[0] < nuc[2]
    assert col[1] < col[2] < col[0]


def test_beer_lambert_custom_k(rf):
    r, f = rf
    out = linear_stain(r, f, "beer-lambert", k_f=1.0, k_r=0.0)
    bn = np.array(BEER_LAMBERT_DEFAULTS["beta_nuclear"])
    np.testing.assert_allclose(out, np.exp(-bn * f[..., None]), rtol=1e-5)


@pytest.mark.parametrize("method", ["gareau", "beer-lambert"])
def test_dask_is_lazy_and_equal(rf, method):
    r, f = rf
    calls = []

    def counted(block):
        if block.size:  # dask probes with empty blocks to infer metadata
            calls.append(block.shape)
        return block

    rd = da.from_array(r, chunks=(16, 20)).map_blocks(counted, dtype=np.float32)
    fd = da.from_array(f, chunks=(10, 25))  # different chunking on purpose
    out = linear_stain(rd, fd, method)
    assert isinstance(out, da.Array) and out.dtype == np.float32
    assert calls == []  # building the graph computed nothing
    assert out.shape == (37, 53, 3) and out.chunks[-1] == (3,)
    np.testing.assert_allclose(out.compute(), linear_stain(r, f, method), atol=1e-6)
    calls.clear()
    out[:5, :5].compute()
    assert len(calls) == 1  # a corner touches a single input chunk


def test_levels(rf):
    r, f = rf
    rl = [da.from_array(r), da.from_array(r[::2, ::2])]
    fl = [da.from_array(f), da.from_array(f[::2, ::2])]
    levels = linear_stain_levels(rl, fl, "gareau")
    assert [lv.shape for lv in levels] == [(37, 53, 3), (19, 27, 3)]
    np.testing.assert_allclose(levels[1].compute(), linear_stain(r[::2, ::2], f[::2, ::2]))
    with pytest.raises(ValueError, match="levels"):
        linear_stain_levels(rl, fl[:1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "hsv"}, "unknown linear stain method"),
        ({"method": "gareau", "k_f": 2.0}, "unknown coefficient"),
        ({"method": "gareau", "h": (1, 2)}, "three finite numbers"),
        ({"method": "gareau", "e": (np.nan, 0, 0)}, "three finite numbers"),
        ({"method": "beer-lambert", "k_r": -1.0}, "k_f and k_r"),
    ],
)
def test_bad_arguments(rf, kwargs, match):
    r, f = rf
    with pytest.raises(ValueError, match=match):
        linear_stain(r, f, **kwargs)
    with pytest.raises(ValueError, match=match):  # raised eagerly for dask too
        linear_stain(da.from_array(r), da.from_array(f), **kwargs)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"R \(3, 4\) vs F \(4, 3\)"):
        linear_stain(np.zeros((3, 4)), np.zeros((4, 3)))


def test_integer_and_float64_inputs_are_accepted():
    out = linear_stain(np.zeros((2, 2), np.float64), np.ones((2, 2), np.float64))
    assert out.dtype == np.float32
