"""stain_region / despeckle_region against explicit slow implementations, on real models."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter
from skimage.io import imread
from torch import nn

from napari_confocal_stain.core.seams import seam_index
from napari_confocal_stain.core.tiling import triangular_weight
from napari_confocal_stain.inference import (
    Cancelled,
    background_response,
    cpu_precision,
    despeckle_region,
    is_background,
    receptive_radius,
    stain_region,
)
from napari_confocal_stain.inference.dense_norm import (
    DenseInstanceNorm2d,
    _cell_stats,
    make_seamless,
)
from napari_confocal_stain.models.despeckle import DespeckleNN
from napari_confocal_stain.models.generators import UNetGenerator

HE_CROP = Path("/work/shared/data/he/cmu_small_region_crop1024.png")
CPU = {"device": "cpu", "precision": "fp32"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread avoids OpenMP stalls on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """A real H&E crop as pseudo-DSCM in [0, 1] (epidermis + keratin + white background)."""
    if not HE_CROP.exists():
        pytest.skip(f"test image {HE_CROP} missing")
    return imread(HE_CROP)[..., :3].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    return UNetGenerator(base_filters=8, n_down=2).eval()


def _model_rgb(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """One direct model call on an (H, W, 3) image: [0, 1] → [-1, 1] → model → [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2 - 1
    with torch.inference_mode():
        y = model(x)[0].permute(1, 2, 0).numpy()
    return np.clip((y + 1) / 2, 0, 1)


def _reflect(img: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    return np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="reflect")


# ---------------------------------------------------------------------------------------------
# Each strategy against its definition


def test_independent_equals_per_tile_model_calls(he, unet) -> None:
    img = he[300:428, 400:528]
    out = stain_region(img, unet, strategy="independent", tile=32, skip_background=False, **CPU)
    expected = np.zeros_like(out)
    for y in range(0, 128, 32):
        for x in range(0, 128, 32):
            expected[y : y + 32, x : x + 32] = _model_rgb(unet, img[y : y + 32, x : x + 32])
    np.testing.assert_allclose(out, expected, atol=1e-5)  # engine arithmetic: float rounding


def test_crop_equals_explicit_definition(he, unet) -> None:
    img = he[300:364, 400:464]
    n = 32
    out = stain_region(img, unet, strategy="crop", tile=n, skip_background=False, **CPU)
    padded = _reflect(img, n // 4, n // 4, n // 4, n // 4)
    expected = np.zeros_like(out)
    for y in range(0, 64, n // 2):  # output square [y, y + N/2) comes from the window at y − N/4
        for x in range(0, 64, n // 2):
            full = _model_rgb(unet, padded[y : y + n, x : x + n])
            expected[y : y + n // 2, x : x + n // 2] = full[
                n // 4 : 3 * n // 4, n // 4 : 3 * n // 4
            ]
    np.testing.assert_allclose(out, expected, atol=1e-5)  # engine arithmetic: float rounding


@pytest.mark.parametrize("strategy", ["pyramid", "pyramid-flat"])
def test_pyramid_equals_slow_bel_et_al(he, unet, strategy) -> None:
    """Thesis §3.4: window N, centre M = N/2 kept, stride N/4, crops × W summed."""
    img = he[300:348, 400:448]
    n, m, s = 32, 16, 8
    out = stain_region(img, unet, strategy=strategy, tile=n, skip_background=False, **CPU)
    # Crops at c = −S, 0, S, … cover every pixel twice per axis; windows start S before them.
    pad = n // 2
    padded = _reflect(img, pad, pad + n, pad, pad + n)
    acc = np.zeros((48 + 2 * pad + n, 48 + 2 * pad + n, 3))
    lam = np.array([max(0.0, 1 - abs(i / (m / 2) - 1)) for i in range(m)])
    weight = np.outer(lam, lam) if strategy == "pyramid" else np.full((m, m), 0.25)
    for cy in range(-s, 48, s):
        for cx in range(-s, 48, s):
            wy, wx = cy - s + pad, cx - s + pad  # window corner in padded coordinates
            full = _model_rgb(unet, padded[wy : wy + n, wx : wx + n])
            crop = full[s : s + m, s : s + m]
            acc[cy + pad : cy + pad + m, cx + pad : cx + pad + m] += weight[..., None] * crop
    expected = acc[pad : pad + 48, pad : pad + 48]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(triangular_weight(m), np.outer(lam, lam))


# ---------------------------------------------------------------------------------------------
# Any H × W, no degraded border


@pytest.mark.parametrize(
    "strategy", ["seamless", "independent", "crop", "pyramid", "pyramid-flat"]
)
@pytest.mark.parametrize("shape", [(19, 45), (3, 5), (70, 33)])
def test_any_shape(he, unet, strategy, shape) -> None:
    img = he[200 : 200 + shape[0], 500 : 500 + shape[1]]
    out = stain_region(img, unet, strategy=strategy, tile=32, skip_background=False, **CPU)
    assert out.shape == (*shape, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("strategy", ["seamless", "independent"])
def test_region_within_one_tile_is_the_single_pass(he, unet, strategy) -> None:
    """Border included: equal to one model call on the region (reflect-padded to the multiple)."""
    img = he[100:158, 600:661]  # 58 × 61, tile 64
    out = stain_region(img, unet, strategy=strategy, tile=64, skip_background=False, **CPU)
    single = _model_rgb(unet, _reflect(img, 0, 2, 0, 3))[:58, :61]
    np.testing.assert_allclose(out, single, atol=2e-5)


def test_seamless_border_matches_single_pass_of_dense_norm(he, unet) -> None:
    """A multi-tile region: one pass of the dense-norm model, cut nowhere, edges included."""
    img = he[:96, :128]
    out = stain_region(img, unet, strategy="seamless", tile=32, skip_background=False, **CPU)
    blocks = stain_region(
        img, unet, strategy="seamless", tile=32, skip_background=False, max_block_pixels=9000,
        **CPU,
    )  # fmt: skip
    # Blocks differ only by their context cut-offs, never at the image border.
    border = np.ones(out.shape[:2], bool)
    border[8:-8, 8:-8] = False
    assert np.abs(out - blocks)[border].mean() < 0.01
    assert np.abs(out - blocks).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# Seams


def test_seamless_has_no_seam_and_independent_has(he) -> None:
    torch.manual_seed(1)
    model = UNetGenerator(base_filters=8, n_down=3).eval()
    img = he[:256, :256]
    tile = 64
    kw = {"tile": tile, "skip_background": False, **CPU}
    ind = stain_region(img, model, strategy="independent", **kw)
    ind_shift = stain_region(img, model, strategy="independent", origin=(32, 32), **kw)
    sea = stain_region(img, model, strategy="seamless", **kw)
    sea_shift = stain_region(img, model, strategy="seamless", origin=(32, 32), **kw)
    assert seam_index(ind, ind_shift, tile) > 1.05
    assert seam_index(sea, sea_shift, tile) <= 1.05
    # Stricter: against a run whose fine statistics lattice (tile/8) is shifted by half a cell,
    # at the tile boundaries and at the lattice's own lines.
    sea_half = stain_region(img, model, strategy="seamless", origin=(4, 4), **kw)
    assert seam_index(sea, sea_half, tile) <= 1.05
    assert seam_index(sea, sea_half, tile // 8) <= 1.05
    # Blocks (a memory budget of ~1/3 of the region) cross-fade without a seam at their cuts.
    blocked = stain_region(img, model, strategy="seamless", max_block_pixels=25_000, **kw)
    blocked_shift = stain_region(
        img, model, strategy="seamless", max_block_pixels=25_000, origin=(32, 32), **kw
    )
    assert seam_index(blocked, blocked_shift, tile) <= 1.05


# ---------------------------------------------------------------------------------------------
# Background, progress, cancel


def _with_background(he: np.ndarray) -> np.ndarray:
    img = he[300:428, 300:428].copy()
    img[:, 64:] = 1.0  # the right half is slide background (white DSCM)
    return img


def test_is_background() -> None:
    white = np.ones((32, 32, 3), np.float32)
    assert is_background(white)
    noisy = white - np.random.default_rng(0).uniform(0, 0.04, white.shape).astype(np.float32)
    assert is_background(noisy)
    tissue = white.copy()
    tissue[10:14, 10:14, 1] = 0.5  # 16 px of eosin = 1.6 % of the tile
    assert not is_background(tissue)


@pytest.mark.parametrize("strategy", ["independent", "crop", "pyramid"])
def test_background_skip_fills_like_computed_background(he, unet, strategy) -> None:
    img = _with_background(he)
    report: dict = {}
    kw = {"strategy": strategy, "tile": 32, "batch_size": 1, **CPU}
    skipped = stain_region(img, unet, report=report, **kw)
    computed = stain_region(img, unet, skip_background=False, **kw)
    assert report["skipped"] > 0
    assert report["model_pixels"] < report["windows"] * 32 * 32
    np.testing.assert_allclose(skipped, computed, atol=1e-5)


def test_seamless_background_region_is_filled(he, unet) -> None:
    white = np.ones((64, 96, 3), np.float32)
    report: dict = {}
    out = stain_region(white, unet, strategy="seamless", tile=32, report=report, **CPU)
    assert report["skipped"] == 1 and report["model_pixels"] == 0
    fill = background_response(unet, (32, 32), kind="constant")
    np.testing.assert_allclose(out, np.broadcast_to(fill, out.shape), atol=1e-6)
    # A region with tissue is computed in full (one block, nothing skipped).
    report = {}
    stain_region(_with_background(he), unet, strategy="seamless", tile=32, report=report, **CPU)
    assert report["skipped"] == 0


def test_progress_and_cancel(he, unet) -> None:
    img = he[:128, :128]
    calls: list[tuple[int, int]] = []
    stain_region(img, unet, strategy="independent", tile=32, batch_size=2, skip_background=False,
                 progress=lambda d, t: calls.append((d, t)), **CPU)  # fmt: skip
    assert calls[-1] == (16, 16) and len(calls) == 8  # 16 windows in batches of 2
    polls = {"n": 0}

    def cancel_after_two() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    done: list[int] = []
    with pytest.raises(Cancelled):
        stain_region(img, unet, strategy="crop", tile=32, batch_size=2, cancel=cancel_after_two,
                     skip_background=False, progress=lambda d, t: done.append(d),
                     **CPU)  # fmt: skip
    assert done == [2, 4]
    with pytest.raises(Cancelled):
        stain_region(img, unet, strategy="seamless", tile=32, cancel=lambda: True, **CPU)


# ---------------------------------------------------------------------------------------------
# Precision and device fallbacks


def test_cpu_bf16_is_close_to_fp32(he, unet) -> None:
    img = he[300:364, 300:364]
    ref = stain_region(img, unet, tile=32, device="cpu", precision="fp32")
    report: dict = {}
    bf = stain_region(img, unet, tile=32, device="cpu", precision="bf16", report=report)
    assert report["precision"] == "bf16"
    assert 0 < np.abs(bf - ref).mean() < 0.02


def test_cpu_fp16_falls_back_to_fp32_with_warning(he, unet) -> None:
    img = he[300:364, 300:364]
    ref = stain_region(img, unet, tile=32, device="cpu", precision="fp32")
    report: dict = {}
    with pytest.warns(RuntimeWarning, match="fp16"):
        out = stain_region(img, unet, tile=32, device="cpu", precision="fp16", report=report)
    assert report["precision"] == "fp32"
    np.testing.assert_array_equal(out, ref)


def test_cpu_auto_precision_is_calibrated_once(unet) -> None:
    first = cpu_precision(unet, size=32, repeats=1)
    assert first["precision"] in ("fp32", "bf16")
    assert first["max_abs"] >= first["mean_abs"] >= 0
    assert cpu_precision(unet) is first  # cached per model
    report: dict = {}
    stain_region(np.ones((16, 16, 3), np.float32) * 0.5, unet, device="cpu", report=report)
    assert report["precision"] == first["precision"]


def _oom_when(pred):
    def runner(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if pred(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return model(x)

    return runner


def test_oom_halves_the_batch(he, unet) -> None:
    img = he[:96, :96]
    ref = stain_region(img, unet, strategy="independent", tile=32, batch_size=4, **CPU)
    report: dict = {}
    out = stain_region(img, unet, strategy="independent", tile=32, batch_size=4, report=report,
                       runner=_oom_when(lambda x: x.shape[0] > 1), **CPU)  # fmt: skip
    assert report["batch_size"] == 1
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_oom_at_batch_one_falls_back_to_cpu(he, unet) -> None:
    """An accelerator that is always out of memory: the run finishes on the CPU, with a warning."""
    img = he[:64, :64]
    ref = stain_region(img, unet, strategy="independent", tile=32, **CPU)
    report: dict = {}
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        out = stain_region(img, unet, strategy="independent", tile=32, batch_size=2,
                           device="meta", precision="fp32", report=report,
                           runner=_oom_when(lambda x: x.device.type == "meta"))  # fmt: skip
    assert report["device"] == "cpu"
    np.testing.assert_allclose(out, ref, atol=1e-6)
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        sea = stain_region(img, unet, tile=32, device="meta", precision="fp32",
                           runner=_oom_when(lambda x: x.device.type == "meta"))  # fmt: skip
    np.testing.assert_allclose(sea, stain_region(img, unet, tile=32, **CPU), atol=1e-6)


def test_seamless_oom_splits_into_blocks(he, unet) -> None:
    img = he[:128, :128]
    ref = stain_region(img, unet, tile=32, skip_background=False, **CPU)
    report: dict = {}
    out = stain_region(img, unet, tile=32, skip_background=False, report=report,
                       runner=_oom_when(lambda x: x.shape[-2] * x.shape[-1] > 12000),
                       **CPU)  # fmt: skip
    assert report["blocks"] > 1
    assert np.abs(out - ref).mean() < 0.01


def test_oom_on_cpu_is_an_error(he, unet) -> None:
    with pytest.raises(MemoryError):
        stain_region(he[:64, :64], unet, strategy="independent", tile=32, batch_size=1,
                     runner=_oom_when(lambda x: True), **CPU)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model-agnostic and input checks


class _PlainNet(nn.Module):
    """No size_multiple, no n_down: zero-padded convs and an InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.InstanceNorm2d(6, affine=True),
            nn.ReLU(),
            nn.Conv2d(6, 3, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_model_agnostic(he) -> None:
    torch.manual_seed(3)
    net = _PlainNet().eval()
    with torch.no_grad():
        net.net[1].weight.uniform_(0.5, 1.5)
        net.net[1].bias.uniform_(-0.2, 0.2)
    img = he[400:447, 400:451]
    for strategy in ("seamless", "independent", "crop", "pyramid"):
        out = stain_region(img, net, strategy=strategy, tile=16, skip_background=False, **CPU)
        assert out.shape == (47, 51, 3)
    small = stain_region(img, net, tile=64, skip_background=False, **CPU)
    np.testing.assert_allclose(small, _model_rgb(net, img), atol=2e-5)


def test_bad_input(unet) -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stain_region(np.zeros((8, 8)), unet, **CPU)
    with pytest.raises(ValueError, match="unknown strategy"):
        stain_region(np.zeros((8, 8, 3)), unet, strategy="bel", **CPU)
    with pytest.raises(ValueError, match="multiple"):
        stain_region(np.zeros((8, 8, 3)), unet, tile=30, **CPU)
    with pytest.raises(ValueError, match="NaN"):
        stain_region(np.full((8, 8, 3), np.nan), unet, **CPU)
    with pytest.raises(ValueError, match="precision"):
        stain_region(np.zeros((8, 8, 3)), unet, precision="int8", device="cpu")


# ---------------------------------------------------------------------------------------------
# despeckle_region


@pytest.fixture(scope="module")
def despeckler() -> nn.Module:
    torch.manual_seed(4)
    net = DespeckleNN(skip="log-add", layers=3, filters=8, kernel=5).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _speckled(shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(7)
    clean = np.clip(np.indices(shape).sum(0) / sum(shape), 0, 1)
    return np.clip(clean * rng.gamma(5, 1 / 5, size=shape), 0, 1).astype(np.float32)


def test_despeckle_region_equals_single_pass(despeckler) -> None:
    r = _speckled((101, 130))
    with torch.inference_mode():
        single = despeckler(torch.from_numpy(r)[None, None])[0, 0].numpy()
    tiled = despeckle_region(r, despeckler, median=False, tile=32, device="cpu")
    np.testing.assert_allclose(tiled, np.clip(single, 0, 1), atol=1e-5)
    med = despeckle_region(r, despeckler, median=True, tile=32, device="cpu")
    expected = np.clip(median_filter(single, size=3, mode="reflect"), 0, 1)
    np.testing.assert_allclose(med, expected, atol=1e-5)
    assert med.dtype == np.float32 and med.shape == r.shape


def test_despeckle_receptive_radius_is_measured_without_halo() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    assert receptive_radius(net) == 3
    r = _speckled((50, 70))
    with torch.inference_mode():
        single = net(torch.from_numpy(r)[None, None])[0, 0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = despeckle_region(r, net, median=False, tile=16, device="cpu")
    np.testing.assert_allclose(out, np.clip(single, 0, 1), atol=1e-5)


def test_despeckle_bad_input(despeckler) -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        despeckle_region(np.zeros((4, 4, 3)), despeckler)


# ---------------------------------------------------------------------------------------------
# The seamless machinery on its own


def test_dense_norm_without_grid_is_instance_norm() -> None:
    torch.manual_seed(6)
    for affine in (False, True):
        norm = nn.InstanceNorm2d(6, affine=affine)
        if affine:
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-1, 1)
        dense = make_seamless(nn.Sequential(norm)).inner[0]
        x = torch.randn(2, 6, 37, 45) * 3 + 5
        near_uniform = torch.full((1, 6, 32, 32), 7.0) + torch.randn(1, 6, 32, 32) * 1e-4
        with torch.inference_mode():
            for t in (x, near_uniform):
                ref = norm(t)
                for layout in (torch.contiguous_format, torch.channels_last):
                    got = dense(t.contiguous(memory_format=layout))
                    assert got.is_contiguous(memory_format=layout)
                    # near-uniform input: IN amplifies float error ×1/√eps ≈ 300
                    tol = 1e-5 if t is x else 2e-3
                    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def test_cell_statistics_match_explicit_sums() -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 5, 37, 45) * 2 + 3
    ey, ex = np.array([0, 5, 13, 21, 29, 37]), np.array([0, 3, 11, 19, 27, 35, 43, 45])
    for nhwc in (False, True):
        t = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        for exact in (False, True):
            n, s1, m2, sq = _cell_stats(t, ey, ex, exact=exact, nhwc=nhwc)
            for i in range(len(ey) - 1):
                for j in range(len(ex) - 1):
                    c = x[:, :, ey[i] : ey[i + 1], ex[j] : ex[j + 1]]
                    assert n[i, j] == c[0, 0].numel()
                    torch.testing.assert_close(s1[:, :, i, j], c.sum((2, 3)), atol=1e-4, rtol=0)
                    torch.testing.assert_close(
                        sq[:, :, i, j], (c * c).sum((2, 3)), rtol=1e-5, atol=0
                    )
                    dev = ((c - c.mean((2, 3), keepdim=True)) ** 2).sum((2, 3))
                    torch.testing.assert_close(m2[:, :, i, j], dev, rtol=1e-4, atol=1e-3)


def test_make_seamless_shares_parameters_and_normalises_in_place_after_convs(unet) -> None:
    copy = make_seamless(unet)
    assert copy.dense_norms == len(unet.norm_layers())
    ours = dict(copy.inner.named_parameters())
    for name, p in unet.named_parameters():
        assert ours[name] is p  # shared, not copied
    norms = [m for m in copy.inner.modules() if isinstance(m, DenseInstanceNorm2d)]
    assert norms and all(m.in_place for m in norms)  # every U-Net norm follows a conv
    # A norm whose input is reused elsewhere must not be in place.
    net = make_seamless(nn.Sequential(nn.ReLU(), nn.InstanceNorm2d(3)))
    assert not net.inner[1].in_place
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), nn.InstanceNorm2d(3)(x.relu()), atol=1e-5, rtol=0)


def test_seamless_output_does_not_depend_on_the_tile_grid(he, unet) -> None:
    """Lattice cells are tile/8: shifting the grid by whole cells changes nothing."""
    img = he[:96, :128]
    kw = {"tile": 32, "skip_background": False, **CPU}
    a = stain_region(img, unet, origin=(0, 0), **kw)
    b = stain_region(img, unet, origin=(12, 20), **kw)  # multiples of the 4-px cell
    c = stain_region(img, unet, origin=(2, 2), **kw)  # half a cell: slightly different
    np.testing.assert_array_equal(a, b)
    assert 0 < np.abs(a - c).mean() < 0.01


def test_seamless_gives_tissue_free_cells_the_background_fill(unet):
    """Instance norm would amplify the faint noise of empty background into texture."""
    rng = np.random.default_rng(0)
    img = 1.0 - rng.uniform(0.0, 0.01, (128, 256, 3)).astype(np.float32)  # empty, faint noise
    img[:, :60] = rng.uniform(0.2, 0.9, (128, 60, 3))  # tissue in the first cell only
    out = stain_region(img, unet, tile=64, precision="fp32", max_block_pixels=1e9)
    fill = stain_region(np.ones((64, 64, 3), np.float32), unet, tile=64, precision="fp32")
    # Cells 2–3 of each row are tissue-free: exactly the background fill, flat.
    np.testing.assert_allclose(out[:, 128:], np.broadcast_to(fill[32, 32], (128, 128, 3)))
    assert out[:, :60].std() > 0.01  # tissue is still stained
    plain = stain_region(img, unet, tile=64, precision="fp32", skip_background=False)
    assert plain[:, 128:].std() > out[:, 128:].std()
