"""Per-cell LBP χ² and SSIM maps against scikit-image computed cell by cell."""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.feature import local_binary_pattern
from skimage.io import imread
from skimage.metrics import structural_similarity

from napari_confocal_stain.core import metrics
from napari_confocal_stain.core.linear_stain import linear_stain
from napari_confocal_stain.core.metrics import (
    chi2_distance,
    hallucination_maps,
    lbp_chi2_map,
    lbp_codes,
    luminance,
    ssim_map,
)

HE_CROP = Path("/work/shared/data/he/cmu_small_region_crop1024.png")


# ------------------------------------------------------------------ slow references


def skimage_lbp(gray: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about float images
        return local_binary_pattern(gray, P=8, R=1, method="default")


def reference_maps(source, output, cell, data_range=1.0):
    """scikit-image on every cell crop, with an explicit χ² (the issue's slow reference)."""
    # LBP codes are a discontinuous function of the gray levels, so the reference gets
    # our luminance (checked against rgb2gray to a few ulp above) and checks every
    # later step exactly.
    gs, go = luminance(source), luminance(output)
    ny, nx = -(-gs.shape[0] // cell), -(-gs.shape[1] // cell)
    chi2 = np.empty((ny, nx))
    ssim = np.full((ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            a = gs[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
            b = go[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
            p = np.bincount(skimage_lbp(a).astype(int).ravel(), minlength=256) / a.size
            q = np.bincount(skimage_lbp(b).astype(int).ravel(), minlength=256) / b.size
            total = 0.0
            for k in range(256):
                if p[k] + q[k] > 0:
                    total += (p[k] - q[k]) ** 2 / (p[k] + q[k])
            chi2[i, j] = 0.5 * total
            if min(a.shape) >= 11:
                ssim[i, j] = structural_similarity(
                    a,
                    b,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    data_range=data_range,
                )
    return chi2, ssim


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return imread(HE_CROP)[..., :3].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def he_pair(he) -> tuple[np.ndarray, np.ndarray]:
    """The real H&E crop and a perturbed copy (blur-free noise, colour shift, a smear)."""
    rng = np.random.default_rng(7)
    out = he * np.float32([0.97, 0.92, 1.03]) + rng.normal(0, 0.02, he.shape).astype(np.float32)
    out[300:500, 600:900] = out[300:500, 600:900][:, ::-1]  # a structural change
    return he, np.clip(out, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------ luminance


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_luminance_matches_rgb2gray_and_is_the_same_for_every_layout(dtype):
    rng = np.random.default_rng(0)
    rgb = rng.random((33, 47, 3))
    rgb = (rgb * 255).astype(np.uint8) if dtype == np.uint8 else rgb.astype(dtype)
    expected = rgb2gray(rgb)
    got = luminance(rgb)
    assert got.dtype == expected.dtype
    # Both sum three non-negative products (no cancellation), each with at most three
    # roundings in its own order: they agree to a few ulp of the value.
    eps = np.finfo(got.dtype).eps
    np.testing.assert_allclose(got, expected, rtol=4 * eps, atol=0)
    # Same arithmetic by construction (elementwise, fixed order): identical bits for
    # every chunking and memory layout, on any CPU.
    for chunks in ((10, 20, 2), (33, 47, 3), (1, 5, 1), (7, 47, 3)):
        lazy = luminance(da.from_array(rgb, chunks=chunks))
        np.testing.assert_array_equal(lazy.compute(), got)
    np.testing.assert_array_equal(luminance(np.asfortranarray(rgb)), got)
    np.testing.assert_array_equal(luminance(rgb[5:20, 3:40]), got[5:20, 3:40])
    np.testing.assert_array_equal(luminance(rgb[::-1, ::2]), got[::-1, ::2])


def test_luminance_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"photo must be \(H, W\) grayscale"):
        luminance(np.zeros((4, 4, 4)), "photo")


# ------------------------------------------------------------------------------ LBP


@pytest.mark.parametrize(
    "name",
    ["uniform64", "uniform32", "quantised", "constant", "zeros", "one_row", "one_column"],
)
def test_lbp_codes_equal_skimage_on_synthetic_images(name):
    rng = np.random.default_rng(1)
    image = {
        "uniform64": rng.random((67, 91)),
        "uniform32": rng.random((128, 100)).astype(np.float32),
        # Few gray levels: many exact ties, where the float64 operation order matters.
        "quantised": (rng.integers(0, 4, (200, 180)) / 3.0).astype(np.float32),
        "constant": np.full((50, 60), 0.3712, np.float32),
        "zeros": np.zeros((20, 20)),
        "one_row": rng.random((1, 9)),
        "one_column": rng.random((70, 1)),
    }[name]
    codes = lbp_codes(image)
    assert codes.dtype == np.uint8 and codes.shape == image.shape
    np.testing.assert_array_equal(codes, skimage_lbp(image))


def test_lbp_codes_equal_skimage_on_real_he(he):
    gray = rgb2gray(he)
    np.testing.assert_array_equal(lbp_codes(gray), skimage_lbp(gray))
    crop = gray[300:812, 100:612]  # cell-local coordinates matter for the diagonals
    np.testing.assert_array_equal(lbp_codes(crop), skimage_lbp(crop))


def test_lbp_exactness_is_not_trivial(he):
    """A textbook bilinear interpolation (constant weights) already differs from skimage."""
    gray = rgb2gray(he).astype(np.float64)
    a = metrics._DIAG
    z = np.pad(gray, 1)
    hp = (1 - a) * z[:, 1:-1] + a * z[:, 2:]
    up_right = a * hp[:-2] + (1 - a) * hp[1:-1]  # skimage: (1 - dr) * top + dr * bottom
    naive_bit = up_right >= gray
    skimage_bit = (skimage_lbp(gray).astype(np.int64) >> 1) & 1
    assert np.count_nonzero(naive_bit != skimage_bit.astype(bool)) > 0
    np.testing.assert_array_equal((lbp_codes(gray) >> 1) & 1, skimage_bit)


def test_chi2_distance_formula():
    p = np.array([4.0, 0.0, 4.0, 0.0])
    assert chi2_distance(p, p) == 0.0
    assert chi2_distance(np.array([1.0, 0, 0]), np.array([0, 0, 3.0])) == pytest.approx(1.0)
    # Normalised: p = [0.5, 0.5], q = [1, 0] -> ½ (0.25/1.5 + 0.25/0.5)
    got = chi2_distance(np.array([1.0, 1.0, 0.0]), np.array([2.0, 0.0, 0.0]))
    assert got == pytest.approx(0.5 * (0.25 / 1.5 + 0.25 / 0.5))
    assert chi2_distance(np.ones((3, 5)), np.ones((3, 5))).shape == (3,)


# ------------------------------------------------------------------ maps vs reference


@pytest.mark.parametrize(
    ("shape", "cell"),
    [((300, 430), 128), ((256, 256), 64), ((140, 97), 50), ((64, 70), 200)],
)
def test_maps_match_per_cell_skimage_on_random_images(shape, cell):
    rng = np.random.default_rng(sum(shape) + cell)
    dtype = np.float64 if cell == 50 else np.float32  # float64 RGB: float64 luminance
    source = rng.random((*shape, 3)).astype(dtype)
    output = np.clip(source + rng.normal(0, 0.1, source.shape), 0, 1).astype(dtype)
    ref_chi2, ref_ssim = reference_maps(source, output, cell)
    chi2 = lbp_chi2_map(source, output, cell)
    ssim = ssim_map(source, output, cell)
    grid = (-(-shape[0] // cell), -(-shape[1] // cell))
    assert chi2.shape == ssim.shape == grid
    np.testing.assert_allclose(chi2, ref_chi2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ssim, ref_ssim, rtol=0, atol=1e-4)
    assert np.array_equal(np.isnan(ssim), np.isnan(ref_ssim))


def test_edge_cells_narrower_than_window_have_no_ssim():
    rng = np.random.default_rng(3)
    source = rng.random((70, 105))  # 64-px cells: the last row is 6 px, the last column 41
    ssim = ssim_map(source, source * 0.9, 64)
    assert ssim.shape == (2, 2)
    assert np.isnan(ssim[1]).all() and np.isfinite(ssim[0]).all()
    with pytest.raises(ValueError):
        structural_similarity(
            source[64:, :64], source[64:, :64], gaussian_weights=True, data_range=1.0
        )
    assert np.isfinite(lbp_chi2_map(source, source * 0.9, 64)).all()


def test_maps_match_per_cell_skimage_on_real_he(he_pair):
    source, output = he_pair
    ref_chi2, ref_ssim = reference_maps(source, output, 256)
    maps = hallucination_maps(source, output, 256)
    np.testing.assert_allclose(maps["lbp_chi2"], ref_chi2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps["ssim"], ref_ssim, rtol=0, atol=1e-4)
    # The flipped block (rows 300:500, cols 600:900) sits in cells (1, 2) and (1, 3).
    assert np.argmin(maps["ssim"]) in (1 * 4 + 2, 1 * 4 + 3)


def test_real_he_partial_cells_and_grayscale_input(he_pair):
    source, output = (rgb2gray(x)[:700, :1000] for x in he_pair)
    ref_chi2, ref_ssim = reference_maps(source, output, 300)
    maps = hallucination_maps(source, output, 300)
    assert maps["lbp_chi2"].shape == (3, 4)
    np.testing.assert_allclose(maps["lbp_chi2"], ref_chi2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps["ssim"], ref_ssim, rtol=0, atol=1e-4)


def test_data_range_scales_ssim_constants():
    rng = np.random.default_rng(5)
    source = rng.random((96, 96))
    output = source * 0.5 + 0.2
    for data_range in (1.0, 2.0, 255.0):
        _, ref = reference_maps(source, output, 48, data_range=data_range)
        np.testing.assert_allclose(
            ssim_map(source, output, 48, data_range=data_range), ref, atol=1e-4
        )


# --------------------------------------------------------------- dask and threading


def test_dask_input_equals_numpy_input(he_pair):
    source, output = (x[:900, :1000] for x in he_pair)
    expected = hallucination_maps(source, output, 128)
    lazy = hallucination_maps(
        da.from_array(source, chunks=(300, 350, 3)),
        da.from_array(output, chunks=(256, 512, 1)),
        128,
    )
    assert all(isinstance(v, da.Array) for v in lazy.values())
    # Chunks are multiples of the cell: every block is whole cells.
    assert lazy["ssim"].shape == expected["ssim"].shape == (8, 8)
    got = dict(zip(lazy, da.compute(*lazy.values()), strict=True))
    # LBP χ² is integer histograms of codes from elementwise arithmetic: exact. SSIM
    # filters in float32 BLAS products whose kernels may round differently for another
    # batch layout: ~1e-7 relative per filtered moment, ~1e-6 on SSIM.
    np.testing.assert_array_equal(got["lbp_chi2"], expected["lbp_chi2"])
    np.testing.assert_allclose(got["ssim"], expected["ssim"], rtol=0, atol=1e-5)
    # Mixed inputs work too (the numpy side is wrapped).
    np.testing.assert_array_equal(
        lbp_chi2_map(da.from_array(source, chunks=400), output, 128).compute(),
        expected["lbp_chi2"],
    )


def test_threads_give_the_same_numbers(he_pair):
    source, output = he_pair
    one = hallucination_maps(source, output, 128, workers=1)
    two = hallucination_maps(source, output, 128, workers=2)
    np.testing.assert_array_equal(one["lbp_chi2"], two["lbp_chi2"])
    np.testing.assert_allclose(one["ssim"], two["ssim"], rtol=0, atol=1e-5)  # as above


def test_lbp_chi2_does_not_depend_on_chunking_of_quantised_images():
    """8-bit stains have many exact luminance ties: the worst case for chunking."""
    rng = np.random.default_rng(11)
    src = (rng.integers(0, 256, (600, 700, 3)) / 255).astype(np.float32)
    out = (np.clip(src * 255 + rng.integers(-3, 4, src.shape), 0, 255) / 255).astype(np.float32)
    expected = lbp_chi2_map(src, out, 100)
    for chunks_s, chunks_o in (((100, 700, 3), (600, 100, 3)), ((37, 53, 1), (211, 97, 2))):
        got = lbp_chi2_map(
            da.from_array(src, chunks=chunks_s), da.from_array(out, chunks=chunks_o), 100
        ).compute()
        np.testing.assert_array_equal(got, expected)


# -------------------------------------------------------------- what the maps show


def test_painted_fake_structure_lights_up_only_its_cell():
    """A bright textured blob painted into one cell of the output: worst χ² and SSIM there."""
    from napari_confocal_stain.io.synthetic import synth_mosaic_arrays

    r, f = synth_mosaic_arrays((768, 1024), seed=4)
    source = linear_stain(r, f)
    rng = np.random.default_rng(0)
    # The "network output": the source with mild noise everywhere (no cell is pristine).
    output = np.clip(source + rng.normal(0, 0.01, source.shape), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:180, 0:180]
    blob = ((yy - 90) ** 2 + (xx - 90) ** 2) < 80**2
    texture = 0.5 + 0.5 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    patch = output[300:480, 560:740]  # inside cell (1, 2) of the 256-px grid
    patch[blob] = (texture[blob, None] * np.float32([0.55, 0.2, 0.75])).astype(np.float32)
    maps = hallucination_maps(source, output, 256)
    chi2, ssim = maps["lbp_chi2"], maps["ssim"]
    others = np.ones(chi2.shape, bool)
    others[1, 2] = False
    assert np.unravel_index(np.argmax(chi2), chi2.shape) == (1, 2)
    assert np.unravel_index(np.argmin(ssim), ssim.shape) == (1, 2)
    assert chi2[1, 2] > 3 * chi2[others].max()
    assert ssim[1, 2] < ssim[others].min() - 0.1


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output": np.zeros((10, 12, 3))}, "differ in size"),
        ({"source": np.zeros((10, 11, 4))}, r"source must be \(H, W\)"),
        ({"cell": 0}, "cell must be a positive integer"),
        ({"cell": 2.5}, "cell must be a positive integer"),
        ({"data_range": 0}, "data_range must be"),
        ({"sigma": -1}, "sigma must be"),
        ({"metrics": ("psnr",)}, "unknown metric"),
        ({"source": np.zeros((0, 11, 3)), "output": np.zeros((0, 11, 3))}, "empty"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message):
    args = {"source": np.zeros((10, 11, 3)), "output": np.zeros((10, 11, 3)), "cell": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        hallucination_maps(args.pop("source"), args.pop("output"), **args)
