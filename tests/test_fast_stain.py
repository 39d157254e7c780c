"""The fast stain generator: architecture, exact tiling, the bf16 path, supervised training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_confocal_stain.inference import load_model, min_size, size_multiple, stain_region
from napari_confocal_stain.inference.geometry import in_channels
from napari_confocal_stain.inference.precision import CPU_BF16_TOLERANCE, cpu_precision
from napari_confocal_stain.models import build_model, save_checkpoint
from napari_confocal_stain.models.fast import FastGenerator


def _smooth_dscm(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random DSCM-like image in [0, 1] (pink-ish with darker blobs)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.uniform(0, 1, (h, w, 3)), (4, 4, 0))
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    return np.clip(0.35 + 0.6 * base, 0, 1).astype(np.float32)


def _trained_like(seed: int = 0, **kwargs) -> FastGenerator:
    """A fast generator with random (not near-identity) weights: every layer matters."""
    g = build_model("fast", **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))
    return g


def test_fast_generator_shapes_and_engine_conventions() -> None:
    g = build_model("fast", channels=[4, 8, 16], n_blocks=1)
    assert isinstance(g, FastGenerator) and g.norm_layers() == []
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in g.modules())
    # The 2×2 fold is one more halving: multiples of 2**(levels) = 8 here.
    assert size_multiple(g) == 8 and min_size(g) == 16
    assert in_channels(g) == 3  # declared, not the folded stem's 12
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        g(torch.zeros(1, 3, 28, 32))
    with pytest.raises(ValueError, match="channel"):
        FastGenerator(channels=[8])


def test_fast_generator_starts_at_the_linear_stain() -> None:
    """At initialisation the per-pixel path is the identity: output ≈ tanh(DSCM)."""
    g = build_model("fast").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        d = (g(x) - torch.tanh(x)).abs()
    assert float(d.mean()) < 0.05


@pytest.mark.parametrize("detail", [False, True])
def test_fast_checkpoint_round_trip(tmp_path: Path, detail: bool) -> None:
    g = _trained_like(channels=[4, 8, 16], n_blocks=1, detail=detail)
    path = save_checkpoint(tmp_path / "fast.safetensors", g, architecture="fast")
    h = load_model(path, device="cpu")
    assert h.checkpoint_meta["architecture"] == "fast"
    assert (h.detail is not None) is detail and h.config.get("detail", False) is detail
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(h(x), g(x))


@pytest.mark.parametrize("detail", [False, True])
def test_norm_free_regions_agree_with_the_whole(detail: bool) -> None:
    """No normalisation: a region computed alone equals the same pixels of a larger pass.

    The two passes convolve different-sized tensors, which oneDNN may block differently, so
    equality is up to float32 rounding of a ~20-layer network (1e-4 on a [0, 1] output).
    """
    g = _trained_like(channels=[8, 16, 32], n_blocks=1, detail=detail)
    img = _smooth_dscm(256, 320, seed=2)
    whole = stain_region(img, g, tile=64, precision="fp32", skip_background=False)
    # A window with 64 px of context on every side (more than the receptive field reaches
    # with non-negligible weight), away from the image border.
    part = stain_region(img[32:224, 48:304], g, tile=64, precision="fp32", skip_background=False)
    np.testing.assert_allclose(part[64:-64, 64:-64], whole[96:160, 112:240], atol=1e-4)


def test_bf16_fast_path_matches_fp32_within_the_stated_tolerance() -> None:
    """The CPU fast path (bf16 autocast where the CPU has bf16 units) stays near fp32.

    Checked on every CPU: without bf16 units PyTorch emulates it (slow, same rounding), so
    the tolerance holds everywhere; ``auto`` only picks bf16 where it is also faster.
    """
    g = _trained_like(channels=[16, 32, 64, 128], n_blocks=2)
    img = _smooth_dscm(128, 160, seed=3)
    ref = stain_region(img, g, tile=64, precision="fp32")
    fast = stain_region(img, g, tile=64, precision="bf16")
    diff = np.abs(fast - ref)
    assert diff.mean() <= CPU_BF16_TOLERANCE["mean_abs"]
    assert diff.max() <= CPU_BF16_TOLERANCE["max_abs"]
    report: dict = {}
    auto = stain_region(img, g, tile=64, precision="auto", report=report)
    cal = cpu_precision(g)
    assert report["precision"] == cal["precision"] in ("fp32", "bf16")
    np.testing.assert_allclose(auto, ref, atol=CPU_BF16_TOLERANCE["max_abs"])


def test_detail_path_starts_at_zero_and_carries_pixel_detail(tmp_path: Path) -> None:
    """``detail=True`` adds a path that starts silent; trained, it passes fine input detail.

    Near white the ``tanh`` output has slope ~0.08, so without the path a one-pixel input
    change barely reaches the output; through it, it arrives at the path's own gain.
    """
    from training.supervised import _build

    g = _trained_like(channels=[4, 8, 16], n_blocks=1)
    start = save_checkpoint(tmp_path / "start.safetensors", g, architecture="fast")
    config = {"model": {"name": "fast", "kwargs": {"channels": [4, 8, 16], "n_blocks": 1,
              "detail": True}}, "init": str(start), "schedule": {"crop": 32},
              "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}  # fmt: skip
    h = _build(config, torch.device("cpu")).model.eval()
    x = torch.full((1, 3, 32, 32), 0.9)
    x[..., 16, 16] += 0.05  # one brighter pixel on a near-white field
    with torch.no_grad():
        # Starts at ``init``: with the path, the per-pixel 1×1 runs as the centre of a fused
        # 3×3 (zeros around it), so only the float summation order differs.
        torch.testing.assert_close(h(x), g(x), rtol=0, atol=1e-6)
        h.detail.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        bump = h(x)[0, :, 16, 16] - h(x)[0, :, 16, 12]
        plain = g(x)[0, :, 16, 16] - g(x)[0, :, 16, 12]
    # The path adds (1 - 1/9) of the bump: 0.044 per channel.
    torch.testing.assert_close(bump - plain, torch.full((3,), 0.05 * 8 / 9), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="init"):
        _build({**config, "model": {"name": "fast", "kwargs": {"channels": [4, 8, 32]}}},
               torch.device("cpu"))  # fmt: skip


def test_augmentations_are_seeded_and_bounded() -> None:
    from training.augment import AUGMENT_DEFAULTS, degrade_pair, hed_jitter, zoom_crop

    rgb = np.clip(_smooth_dscm(64, 64) * [1.0, 0.6, 0.9], 0, 1).astype(np.float32)
    a, alpha = hed_jitter(rgb, np.random.default_rng(1))
    b, _ = hed_jitter(rgb, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == rgb.shape and 0 <= a.min() and a.max() <= 1
    assert alpha.shape == (3,) and np.all((alpha > 0.54) & (alpha < 1.83))
    assert np.abs(a - rgb).mean() > 1e-3  # it does change the colours
    np.testing.assert_allclose(hed_jitter(rgb, np.random.default_rng(1), 0.0, 0.0)[0], rgb)
    # An asymmetric range: paler answers on average, factors inside exp([lo, hi]).
    draws = np.array(
        [hed_jitter(rgb, np.random.default_rng(s), [-0.8, 0.4], 0.0)[1] for s in range(200)]
    )
    assert np.all((draws > np.exp(-0.8) - 1e-9) & (draws < np.exp(0.4) + 1e-9))
    assert np.log(draws).mean() == pytest.approx(-0.2, abs=0.06)
    with pytest.raises(ValueError, match="lo ≤ hi"):
        hed_jitter(rgb, np.random.default_rng(1), [0.4, -0.8])
    assert zoom_crop(rgb, 0, 0, 32, 2.0).shape == (32, 32, 3)  # 16² window magnified
    assert zoom_crop(rgb[..., 0], 0, 0, 32, 1.0).shape == (32, 32)
    r, f = degrade_pair(rgb[..., 0], rgb[..., 1], np.random.default_rng(2), AUGMENT_DEFAULTS)
    assert r.dtype == f.dtype == np.float32 and 0 <= r.min() and r.max() <= 1


def test_luminance_ssim_is_the_evaluations_ssim() -> None:
    """The training loss's SSIM is skimage's Gaussian SSIM on rgb2gray luminance."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    from training.supervised import luminance_ssim

    a, b = _smooth_dscm(48, 56, 4), _smooth_dscm(48, 56, 5)
    ref = structural_similarity(rgb2gray(a), rgb2gray(b), data_range=1.0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)  # fmt: skip
    t = [torch.from_numpy(v.transpose(2, 0, 1))[None].double() for v in (a, b)]
    # Same definition; scipy's separable filter and torch's conv2d sum in different orders
    # (seen: 1.5e-5 apart on this 48 × 56 image).
    assert float(luminance_ssim(*t)) == pytest.approx(ref, abs=1e-4)


def test_soft_lbp_chi2_is_the_evaluations_lbp_chi2_when_sharp() -> None:
    """With a narrow sigmoid the texture loss is the metric: skimage's LBP codes, χ²."""
    from napari_confocal_stain.core.metrics import chi2_distance, lbp_codes
    from training.supervised import _LUMA, luminance_lbp_chi2

    rng = np.random.default_rng(3)
    a = _smooth_dscm(40, 44, 1) + rng.normal(0, 0.02, (40, 44, 3)).astype(np.float32)
    b = _smooth_dscm(40, 44, 2)  # smooth: mostly edge codes, few extrema
    t = [torch.from_numpy(v.transpose(2, 0, 1))[None].double() for v in (a, b)]

    def hist(v: np.ndarray) -> np.ndarray:
        # The loss scores interior pixels (all 8 neighbours inside the image).
        return np.bincount(lbp_codes(v.astype(np.float64) @ np.array(_LUMA))[1:-1, 1:-1].ravel(),
                           minlength=256)  # fmt: skip

    ref = chi2_distance(hist(a), hist(b))
    assert ref > 0.05  # noise against smooth: a real texture difference to reproduce
    assert float(luminance_lbp_chi2(*t, tau=1e-9)) == pytest.approx(ref, abs=1e-6)
    assert float(luminance_lbp_chi2(t[0], t[0], tau=1e-3)) == pytest.approx(0.0, abs=1e-12)
    # Differentiable at a usable width: the smooth image is pushed somewhere.
    out = t[1].clone().requires_grad_()
    luminance_lbp_chi2(out, t[0], tau=5e-4).backward()
    assert out.grad is not None and float(out.grad.abs().sum()) > 0


def test_tissue_lbp_chi2_ignores_the_glass() -> None:
    """Texture differences in the white background leave the tissue column unchanged."""
    from training.validation import GLASS_LUMINANCE, tissue_lbp_chi2

    rng = np.random.default_rng(4)
    truth = _smooth_dscm(64, 64, 3) * 0.8  # tissue: luminance well below the glass level
    truth[:, 32:] = 0.985 + rng.normal(0, 0.004, (64, 32, 3))  # glass with grain
    smooth_glass = truth.copy()
    smooth_glass[:, 32:] = np.linspace(0.975, 0.99, 32)[None, :, None]  # a ramp, no grain
    assert (truth[:, 32:] @ np.array([0.2125, 0.7154, 0.0721]) >= GLASS_LUMINANCE).all()
    assert tissue_lbp_chi2(truth, truth) == 0.0
    whole = float(_whole_tile_lbp_chi2(truth, smooth_glass))
    assert whole > 0.05
    # Only the tissue column's pixels next to the glass see the ramp, through their neighbours.
    assert tissue_lbp_chi2(truth, smooth_glass) < 0.1 * whole
    assert np.isnan(tissue_lbp_chi2(np.ones((16, 16, 3)), np.ones((16, 16, 3))))


def _whole_tile_lbp_chi2(a: np.ndarray, b: np.ndarray) -> float:
    from napari_confocal_stain.core.metrics import lbp_chi2_map

    return float(lbp_chi2_map(a, b, max(a.shape[:2]), workers=1)[0, 0])


def _synthetic_he(path: Path, shape: tuple[int, int], seed: int) -> Path:
    import tifffile

    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.io.synthetic import synth_mosaic_arrays

    r, f = synth_mosaic_arrays(shape, seed=seed)
    rgb = (np.clip(linear_stain(r, f, "beer-lambert"), 0, 1) * 255 + 0.5).astype(np.uint8)
    px_per_cm = 1e4 / 0.75
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER")  # fmt: skip
    return path


def test_supervised_smoke_end_to_end(tmp_path: Path) -> None:
    """``python -m training supervised --config smoke``: per-tissue validation, checkpoint."""
    from training.__main__ import main

    slide = _synthetic_he(tmp_path / "slide.tif", (768, 512), seed=5)
    extra = _synthetic_he(tmp_path / "extra.tif", (256, 256), seed=6)
    held = _synthetic_he(tmp_path / "held.tif", (256, 256), seed=7)
    out = tmp_path / "run"
    args = ["supervised", "--config", "smoke", "--out", str(out), "--no-progress",
            "--set", f"data.he={json.dumps([str(slide)])}", "--set", "data.bands=3",
            "--set", f"data.train_images={json.dumps([str(extra)])}",
            "--set", f"data.val_images={json.dumps([str(held)])}"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 2  # refuses to overwrite a run
    model = load_model(out / "G.safetensors", device="cpu")
    meta = model.checkpoint_meta
    assert meta["architecture"] == "fast" and "supervised" in meta["training"]["recipe"]
    val = (out / "val.csv").read_text()
    for name in ("heldout bands", "held.tif", "linear-stain (input)"):
        assert name in val
    y = stain_region(_smooth_dscm(40, 40), model, tile=32, precision="fp32")
    assert y.shape == (40, 40, 3) and np.isfinite(y).all()
    # Training on an image it also evaluates on is refused.
    overlap = f"data.val_images={json.dumps([str(extra)])}"
    bad = [*args[:4], str(tmp_path / "run2"), *args[5:-1], overlap]
    assert main(bad) == 2
