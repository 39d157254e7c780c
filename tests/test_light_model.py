"""The light stain generator (issue 8): architecture, shipped weights, engine, distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_confocal_stain.inference import load_model, min_size, size_multiple, stain_region
from napari_confocal_stain.models import WEIGHTS_DIR, build_model, save_checkpoint
from napari_confocal_stain.models.flops import flops_per_pixel
from napari_confocal_stain.models.light import LightGenerator
from napari_confocal_stain.models.registry import available_models


def _smooth_dscm(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random DSCM-like image in [0, 1] (pink-ish with darker blobs)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.uniform(0, 1, (h, w, 3)), (4, 4, 0))
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    return np.clip(0.35 + 0.6 * base, 0, 1).astype(np.float32)


def test_light_generator_shapes_and_engine_conventions() -> None:
    assert "light" in available_models()
    g = build_model("light", channels=[4, 8, 16], n_blocks=1)
    assert isinstance(g, LightGenerator)
    assert size_multiple(g) == 4 and min_size(g) == 8
    # Every norm is a plain InstanceNorm2d (the seamless engine replaces them).
    assert len(g.norm_layers()) == 1 + 2 + 2 * 1 + 2
    assert all(type(m) is torch.nn.InstanceNorm2d for m in g.norm_layers())
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        g(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channel"):
        LightGenerator(channels=[8])


def test_light_checkpoint_round_trip(tmp_path: Path) -> None:
    g = build_model("light", channels=[4, 8, 16], n_blocks=1).eval()
    path = save_checkpoint(tmp_path / "light.safetensors", g, architecture="light")
    h = load_model(path, device="cpu")
    assert h.checkpoint_meta["architecture"] == "light"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(h(x), g(x))


def test_shipped_light_model_is_a_quarter_of_the_unet_and_has_a_card() -> None:
    assert (WEIGHTS_DIR / "stain-light.md").is_file()
    student = load_model("stain-light", device="cpu")
    teacher = load_model("stain-unet", device="cpu")
    assert student.checkpoint_meta["architecture"] == "light"
    ratio = flops_per_pixel(student) / flops_per_pixel(teacher)
    assert ratio <= 0.25, ratio
    training = student.checkpoint_meta["training"]
    assert training["teacher"] == "stain-unet" and training["seed"] == 0
    assert (WEIGHTS_DIR / "stain-light.safetensors").stat().st_size < 2_000_000


def test_shipped_light_model_runs_through_stain_region() -> None:
    model = load_model("stain-light", device="cpu")
    # A region no larger than a tile is exactly the model's single pass on it.
    img = _smooth_dscm(64, 96)
    out = stain_region(img, model, strategy="seamless", tile=128, precision="fp32")
    with torch.no_grad():
        ref = model(torch.from_numpy(img.transpose(2, 0, 1))[None] * 2 - 1)[0]
    ref = ((ref.numpy().transpose(1, 2, 0) + 1) / 2).clip(0, 1)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    # Larger than a tile, odd size: padded to the size multiple, cropped back, finite, [0, 1].
    big = _smooth_dscm(203, 301, seed=1)
    report: dict = {}
    out = stain_region(big, model, strategy="seamless", tile=64, precision="fp32", report=report)
    assert out.shape == (203, 301, 3) and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and report["strategy"] == "seamless"
    # It stains: the output is not the input (a pink-purple H&E palette, not DSCM).
    assert np.abs(out - big).mean() > 0.01


def test_distill_smoke_end_to_end(tmp_path: Path) -> None:
    """``python -m training distill --config smoke`` on a synthetic H&E slide."""
    import tifffile

    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.io.synthetic import synth_mosaic_arrays
    from training.__main__ import main

    r, f = synth_mosaic_arrays((768, 768), seed=5)
    rgb = (np.clip(linear_stain(r, f, "beer-lambert"), 0, 1) * 255 + 0.5).astype(np.uint8)
    he = tmp_path / "he.tif"
    px_per_cm = 1e4 / 0.75
    tifffile.imwrite(he, rgb, photometric="rgb", resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER")  # fmt: skip
    out = tmp_path / "run"
    args = ["distill", "--config", "smoke", "--out", str(out), "--no-progress",
            "--set", f"data.he={json.dumps([str(he)])}", "--set", "data.bands=3"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 2  # refuses to overwrite a run
    student = load_model(out / "student.safetensors", device="cpu")
    meta = student.checkpoint_meta
    assert meta["architecture"] == "light" and meta["training"]["teacher"] == "stain-unet"
    assert 0 < meta["training"]["flops_ratio_to_teacher"] < 0.25
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 4 and "hema" in log[0]
    val = (out / "val.csv").read_text()
    assert "teacher" in val and "student" in val and (out / "sample.png").is_file()
    y = stain_region(_smooth_dscm(40, 40), student, tile=32, precision="fp32")
    assert y.shape == (40, 40, 3) and np.isfinite(y).all()
