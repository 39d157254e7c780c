"""Nuclei detection in F and in the stain's hematoxylin, matching, per-cell preservation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from skimage.color import rgb2hed

from napari_confocal_stain.core import nuclei
from napari_confocal_stain.core.linear_stain import GAREAU_DEFAULTS, linear_stain
from napari_confocal_stain.core.nuclei import (
    HEMATOXYLIN_REF,
    detect_nuclei_fluorescence,
    detect_nuclei_he,
    hematoxylin,
    match_nuclei,
    nuclei_preservation_map,
)
from napari_confocal_stain.io.synthetic import synth_mosaic_arrays, synth_nuclei

SIZE = (768, 1024)
SEED = 11


@pytest.fixture(scope="module")
def slide():
    """A synthetic R/F slide, its Gareau stain and its ground-truth nuclei (y, x, r)."""
    r, f = synth_mosaic_arrays(SIZE, seed=SEED)
    truth = synth_nuclei(SIZE, seed=SEED)
    gt = np.column_stack([truth["y"], truth["x"], truth["radius_px"]]).astype(np.float64)
    return r, f, linear_stain(r, f), gt


def recall_precision(truth: np.ndarray, found: np.ndarray, radius: float = 4.0):
    m = match_nuclei(truth, found, radius)
    return len(m.pairs) / len(truth), len(m.pairs) / max(len(found), 1)


def disc_image(shape, centres, radii, contrast=0.8, noise=0.03, seed=0):
    """Soft bright discs on a noisy dark background (our own minimal blobs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 0.05, np.float32)
    for (y, x), r in zip(centres, radii, strict=True):
        d = np.hypot(yy - y, xx - x)
        img = np.maximum(img, 0.05 + contrast / (1 + np.exp((d - r) / 0.7)))
    return np.clip(img + rng.normal(0, noise, shape), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------- detection


def test_detection_recall_and_precision_on_synthetic_slide(slide):
    _, f, stain, gt = slide
    assert len(gt) > 300
    rec, prec = recall_precision(gt, detect_nuclei_fluorescence(f, pixel_size_um=0.75))
    assert rec >= 0.95 and prec >= 0.95, (rec, prec)
    rec, prec = recall_precision(gt, detect_nuclei_he(stain, pixel_size_um=0.75))
    assert rec >= 0.95 and prec >= 0.95, (rec, prec)


def test_detection_of_known_discs_and_their_radii():
    centres = [(40, 40), (40, 100), (110, 60), (150, 150), (100, 170)]
    radii = [4.0, 6.0, 8.0, 5.0, 9.0]
    img = disc_image((200, 200), centres, radii)
    found = detect_nuclei_fluorescence(img, pixel_size_um=0.75, diameter_um=(5, 14))
    assert found.shape == (5, 3)
    m = match_nuclei(np.array(centres, float), found, 2.0)
    assert len(m.pairs) == 5
    for i, j in m.pairs:  # the radius is the nearest of the 3 scales' radii
        assert abs(found[j, 2] - radii[i]) < 2.5
    # Too faint for the threshold: nothing.
    assert len(detect_nuclei_fluorescence(img * 0.1, threshold=0.1)) == 0
    assert detect_nuclei_fluorescence(np.zeros((50, 60))).shape == (0, 3)


def test_hematoxylin_unit_is_gareau_nucleus_colour():
    pure = np.ones((4, 4, 3)) * np.array(GAREAU_DEFAULTS["h"])
    np.testing.assert_allclose(hematoxylin(pure), 1.0, rtol=1e-6)
    assert rgb2hed(pure)[0, 0, 0] == pytest.approx(HEMATOXYLIN_REF, rel=1e-6)
    assert np.all(hematoxylin(np.ones((3, 3, 3))) == 0)
    uint8 = (pure * 255).round().astype(np.uint8)
    np.testing.assert_allclose(hematoxylin(uint8), 1.0, rtol=0.02)


def test_tiles_and_dask_reproduce_the_whole_image_result(slide, monkeypatch):
    _, f, stain, _ = slide
    whole_f = detect_nuclei_fluorescence(f)
    whole_h = detect_nuclei_he(stain)
    monkeypatch.setattr(nuclei, "_TILE", 300)  # tile borders cut through many nuclei
    np.testing.assert_array_equal(detect_nuclei_fluorescence(f, workers=2), whole_f)
    np.testing.assert_array_equal(detect_nuclei_he(stain, workers=1), whole_h)
    lazy = da.from_array(f, chunks=256)
    np.testing.assert_array_equal(detect_nuclei_fluorescence(lazy), whole_f)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"diameter_um": (14, 5)}, "diameter_um"),
        ({"diameter_um": 5}, "diameter_um"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_detection_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detect_nuclei_fluorescence(np.zeros((20, 20)), **kwargs)


def test_detection_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"f must be \(H, W\)"):
        detect_nuclei_fluorescence(np.zeros((20, 20, 3)))
    with pytest.raises(ValueError, match=r"rgb must be \(H, W, 3\)"):
        detect_nuclei_he(np.zeros((20, 20)))


# -------------------------------------------------------------------------- matching


def test_match_is_one_to_one_and_closest_first():
    a = np.array([[0.0, 0.0], [0.0, 10.0], [50.0, 50.0]])
    b = np.array([[0.0, 3.0], [0.0, 8.0], [100.0, 100.0]])
    m = match_nuclei(a, b, 5.0)
    # a1-b1 (2 px) is taken first; a0-b0 (3 px) next; b0 is not also given to a1.
    assert m.pairs.tolist() == [[1, 1], [0, 0]]
    np.testing.assert_allclose(m.distances, [2.0, 3.0])
    assert m.unmatched_a.tolist() == [2] and m.unmatched_b.tolist() == [2]


def test_match_edge_cases():
    pts = np.array([[5.0, 5.0, 4.0], [20.0, 20.0, 6.0]])  # (y, x, r): radius ignored
    empty = np.empty((0, 3))
    m = match_nuclei(empty, pts, 3)
    assert m.pairs.shape == (0, 2) and m.unmatched_a.size == 0
    assert m.unmatched_b.tolist() == [0, 1]
    m = match_nuclei(pts, [], 3)
    assert m.pairs.shape == (0, 2) and m.unmatched_a.tolist() == [0, 1]
    m = match_nuclei([], [], 3)
    assert m.pairs.shape == (0, 2) and m.unmatched_a.size == m.unmatched_b.size == 0
    # Duplicates: two identical source nuclei, one output nucleus -> one pair.
    m = match_nuclei(np.array([[5.0, 5.0], [5.0, 5.0]]), np.array([[5.0, 6.0]]), 3)
    assert len(m.pairs) == 1 and len(m.unmatched_a) == 1 and len(m.unmatched_b) == 0
    # The radius is inclusive; beyond it nothing matches.
    assert len(match_nuclei([[0.0, 0.0]], [[0.0, 3.0]], 3.0).pairs) == 1
    assert len(match_nuclei([[0.0, 0.0]], [[0.0, 3.01]], 3.0).pairs) == 0
    with pytest.raises(ValueError, match="radius_px"):
        match_nuclei(pts, pts, -1)
    with pytest.raises(ValueError, match=r"a must be an \(N, 2\)"):
        match_nuclei(np.zeros((3, 1)), pts, 1)
    with pytest.raises(ValueError, match="non-finite"):
        match_nuclei([[np.nan, 1.0]], pts, 1)


# ------------------------------------------------------------------- preservation map


def erase_nucleus(f: np.ndarray, y: float, x: float, r: float) -> np.ndarray:
    """Replace one nucleus of F by its surrounding background."""
    out = f.copy()
    yy, xx = np.mgrid[0 : f.shape[0], 0 : f.shape[1]]
    d = np.hypot(yy - y, xx - x)
    ring = (d > 2.2 * r) & (d < 3.2 * r)
    out[d < 1.8 * r] = np.percentile(f[ring], 20)
    return out


def test_erased_and_invented_nuclei_land_in_their_cells(slide):
    r, f, _, gt = slide
    cell = 256
    # Erase an isolated nucleus inside cell (iy, ix) of the output; paint a fake one
    # into an empty spot of another cell.
    dist = np.hypot(gt[:, None, 0] - gt[None, :, 0], gt[:, None, 1] - gt[None, :, 1])
    np.fill_diagonal(dist, np.inf)
    lonely = np.flatnonzero(dist.min(axis=1) > 25)
    y, x, rad = gt[lonely[len(lonely) // 2]]
    f_out = erase_nucleus(f, y, x, rad)
    output = linear_stain(r, f_out)
    cy, cx = round(y) // cell, round(x) // cell
    # The fake: the first spot of a 32-px lattice far from every real nucleus, in
    # another cell.
    fy, fx = next(
        (py, px)
        for py in range(48, SIZE[0] - 48, 32)
        for px in range(48, SIZE[1] - 48, 32)
        if np.hypot(gt[:, 0] - py, gt[:, 1] - px).min() > 30
        and (py // cell, px // cell) != (cy, cx)
    )
    yy, xx = np.mgrid[0 : f.shape[0], 0 : f.shape[1]]
    output[np.hypot(yy - fy, xx - fx) < 6] = np.float32(GAREAU_DEFAULTS["h"])

    res = nuclei_preservation_map(f, output, cell, pixel_size_um=0.75)
    expected_erased = np.zeros_like(res.erased_count)
    expected_erased[cy, cx] = 1
    np.testing.assert_array_equal(res.erased_count, expected_erased)
    expected_invented = np.zeros_like(res.invented_count)
    expected_invented[fy // cell, fx // cell] = 1
    np.testing.assert_array_equal(res.invented_count, expected_invented)
    assert res.totals["erased"] == 1 and res.totals["invented"] == 1
    np.testing.assert_allclose(res.erased_points, [[y, x]], atol=2.0)
    np.testing.assert_allclose(res.invented_points, [[fy, fx]], atol=2.0)
    # Preserved fraction: below 1 only in the erased cell; NaN where F has no nuclei.
    frac = res.preserved_fraction
    has = res.source_count > 0
    assert frac[cy, cx] == pytest.approx(1 - 1 / res.source_count[cy, cx])
    others = has.copy()
    others[cy, cx] = False
    assert np.all(frac[others] == 1.0) and np.all(np.isnan(frac[~has]))
    assert res.source_count.sum() == res.totals["source"]
    assert res.matched_count.sum() + res.erased_count.sum() == res.totals["source"]
    assert res.totals["preserved_fraction"] == pytest.approx(1 - 1 / res.totals["source"])
    assert res.preserved_points.shape == (res.totals["matched"], 2)


def test_linear_stain_keeps_every_nucleus(slide):
    _, f, stain, _ = slide
    res = nuclei_preservation_map(f, stain, 512)
    assert res.preserved_fraction.shape == (2, 2)
    assert res.totals["preserved_fraction"] >= 0.99
    assert res.totals["invented"] <= 0.01 * res.totals["source"]


def test_preservation_map_rejects_mismatched_inputs(slide):
    _, f, stain, _ = slide
    with pytest.raises(ValueError, match="differ in size"):
        nuclei_preservation_map(f[:100], stain, 256)
    with pytest.raises(ValueError, match="cell must be"):
        nuclei_preservation_map(f, stain, 0)
