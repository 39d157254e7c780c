"""The training package: noise models, data preparation, each command's smoke run, resume,
and the shipped weights.

The H&E input is a real image file made from the package's synthetic slide (Beer–Lambert
stain of its R/F modes, which has nuclei, fibres and glass), so the tests do not depend on
``../shared/data``.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_confocal_stain.inference import load_model
from training.__main__ import build_parser, main
from training.crops import load_crop_regions
from training.data import (
    CropDataset,
    PairedCropSampler,
    RandomCrop,
    RandomFlip,
    band_regions,
    extract_crops,
    hed_scale,
    load_he_regions,
    pseudo_confocal,
    read_he,
    split_by_slide,
)
from training.noise import NOISE_MODELS, add_speckle, noise_mean, noise_variance, speckle
from training.runstate import load_state, save_state

REPO = Path(__file__).resolve().parent.parent


def _write_he_tiff(path: Path, rgb: np.ndarray, um_per_px: float) -> Path:
    """An RGB TIFF with resolution tags (pixels per centimetre)."""
    px_per_cm = 1e4 / um_per_px
    tifffile.imwrite(
        path,
        (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8),
        photometric="rgb",
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
    )
    return path


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 768² H&E-like TIFF at 0.75 µm/px made from the synthetic confocal slide."""
    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.io.synthetic import synth_mosaic_arrays

    r, f = synth_mosaic_arrays((768, 768), seed=5)
    rgb = linear_stain(r, f, "beer-lambert")
    return _write_he_tiff(tmp_path_factory.mktemp("he") / "synthetic_he.tif", rgb, 0.75)


def _data_args(he: Path) -> list[str]:
    return ["--set", f"data.he={json.dumps([str(he)])}", "--set", "data.bands=3"]


# ------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("model", NOISE_MODELS)
@pytest.mark.parametrize("looks", [1.0, 5.0])
def test_speckle_has_unit_mean_and_documented_variance(model: str, looks: float) -> None:
    n = 400_000
    s = speckle((n,), model, np.random.default_rng(1), looks=looks, sigma=0.2).astype(np.float64)
    var = noise_variance(model, looks=looks, sigma=0.2)
    assert abs(noise_mean(model, looks) - 1.0) < 1e-4
    # Mean within 5 standard errors of 1; variance within 3 %.
    assert abs(s.mean() - noise_mean(model, looks)) < 5 * math.sqrt(var / n)
    assert s.var() == pytest.approx(var, rel=0.03)


def test_documented_variances() -> None:
    assert noise_variance("gamma", looks=5) == pytest.approx(0.2)
    assert noise_variance("uniform") == pytest.approx(0.04, rel=1e-3)
    assert noise_variance("rayleigh") == pytest.approx((4 - math.pi) / math.pi)
    assert noise_variance("gaussian", sigma=0.2) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="unknown speckle model"):
        speckle((2,), "poisson")
    with pytest.raises(ValueError, match="looks"):
        speckle((2,), "gamma", looks=0)


def test_add_speckle_is_multiplicative_and_clipped() -> None:
    clean = np.zeros((32, 32), np.float32)
    clean[:, 16:] = 0.5
    noisy = add_speckle(clean, "gamma", np.random.default_rng(0), looks=1)
    assert noisy.dtype == np.float32
    assert np.all(noisy[:, :16] == 0)  # zero stays zero: the noise multiplies
    assert noisy.min() >= 0 and noisy.max() <= 1
    raw = add_speckle(clean, "gamma", np.random.default_rng(0), looks=1, clip=False)
    assert raw.max() > 1  # L = 1 speckle exceeds 2× half the time


# ------------------------------------------------------------------------------------- data


def test_pseudo_confocal_f_follows_hematoxylin_r_follows_eosin() -> None:
    from skimage.color import hed2rgb

    hed = np.zeros((64, 64, 3))
    hed[:32, :, 0] = 0.8  # top half: hematoxylin only (nuclei)
    hed[32:, :, 1] = 0.8  # bottom half: eosin only (stroma)
    rgb = np.clip(hed2rgb(hed), 0, 1).astype(np.float32)
    scale = hed_scale(rgb)
    r, f = pseudo_confocal(rgb, scale)
    assert f[:32].mean() > 0.8 and f[32:].mean() < 0.2
    assert r[32:].mean() > 0.8 and r[:32].mean() < 0.2
    r_noisy, f2 = pseudo_confocal(
        rgb, scale, np.random.default_rng(0), speckle={"model": "gamma", "looks": 1}
    )
    np.testing.assert_array_equal(f2, f)  # speckle only on R
    assert np.std(r_noisy[40:]) > 10 * np.std(r[40:])


def test_band_split_and_slide_split_are_disjoint(he_slide: Path) -> None:
    boxes = band_regions((1000, 300), bands=6)
    rows = {name: set() for name in boxes}
    for name, bs in boxes.items():
        for y0, y1, _, _ in bs:
            rows[name] |= set(range(y0, y1))
    assert not (rows["source"] & rows["target"]) and not (rows["target"] & rows["heldout"])
    assert not (rows["source"] & rows["heldout"])
    assert set().union(*rows.values()) == set(range(1000))

    split = split_by_slide([f"s{i}" for i in range(10)] + ["s0"], val_fraction=0.2, seed=1)
    assert sorted(split.values()).count("val") == 2 and len(split) == 10

    regions = load_he_regions([he_slide], bands=3)
    sampler = PairedCropSampler(regions["source"], "pseudo", seed=0, min_tissue=0.1)
    source_rows = {r.box[:2] for r in regions["source"]}
    for i in range(20):
        region, y, _ = sampler._pick(64, np.random.default_rng([0, i]))
        assert region.box[:2] in source_rows
        assert 0 <= y and y + 64 <= region.rgb.shape[0]  # crops stay inside their band


def test_sampler_is_deterministic_and_pairs_agree(he_slide: Path) -> None:
    regions = load_he_regions([he_slide], bands=3)["source"]
    sampler = PairedCropSampler(regions, "pseudo", seed=3, speckle={"model": "gaussian"})
    a, b = sampler.sample(7, 64), sampler.sample(7, 64)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["dscm"], sampler.sample(8, 64)["dscm"])
    ds = CropDataset(sampler, 64, length=4, offset=5)
    assert len(ds) == 4
    np.testing.assert_array_equal(ds[2]["dscm"].numpy(), a["dscm"])  # offset 5 + 2 = 7
    assert a["dscm"].shape == (3, 64, 64) and a["dscm"].min() >= -1 and a["dscm"].max() <= 1
    # F and the true H&E are the same crop: F is bright where the H&E is dark and blue.
    he = (a["he"].transpose(1, 2, 0) + 1) / 2
    nuclei = a["f"][0] > 0.5
    if nuclei.any() and (~nuclei).any():
        assert he[nuclei].sum(-1).mean() < he[~nuclei].sum(-1).mean()


def test_paired_transforms_apply_the_same_crop_and_flip() -> None:
    rng = np.random.default_rng(0)
    a = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    b = np.stack([a, -a], axis=-1)
    for _ in range(5):
        ca, cb = RandomFlip(rotate=True)(RandomCrop(16)([a, b], rng), rng)
        np.testing.assert_array_equal(ca, cb[..., 0])
        np.testing.assert_array_equal(-ca, cb[..., 1])


def test_read_he_resizes_to_confocal_pixels(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).random((120, 90, 3)).astype(np.float32)
    he = read_he(_write_he_tiff(tmp_path / "a.tif", rgb, 0.5))
    assert he.pixel_size_um == pytest.approx(0.5, rel=1e-3)
    regions = load_he_regions([tmp_path / "a.tif"], bands=3)
    assert sum(r.rgb.shape[0] for rs in regions.values() for r in rs) == 80  # 120 · 0.5/0.75
    from napari_confocal_stain.errors import MosaicError

    with pytest.raises(MosaicError, match="not found"):
        read_he(tmp_path / "missing.svs")


def test_extract_crops_keeps_tissue_only() -> None:
    tissue = np.zeros((256, 256), np.float32)
    tissue[:128, :128] = 0.8
    kept = extract_crops([tissue, tissue], 64, min_tissue=0.5, min_mean=0.1)
    assert kept and all(y < 128 and x < 128 for y, x in kept)
    assert extract_crops([tissue, tissue * 0.01], 64, min_mean=0.1) == []  # F too dim


# ---------------------------------------------------------------------------------- state


def test_state_round_trip_keeps_optimizer_and_types(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_state(tmp_path / "s.safetensors", {"it": 4, "opt": opt.state_dict(), "pool": []})
    st = load_state(tmp_path / "s.safetensors")
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(st["opt"])
    assert st["it"] == 4 and st["pool"] == []
    assert opt2.param_groups[0]["betas"] == (0.5, 0.999)
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


# ------------------------------------------------------------------------------- commands


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    for cmd in ("extract-crops", "despeckle", "cyclegan", "gan-poc", "evaluate"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0
        assert "--config" in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "training", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "cyclegan" in out.stdout


def test_extract_crops_smoke(he_slide: Path, tmp_path: Path) -> None:
    from napari_confocal_stain.io.synthetic import synth_mosaic_arrays

    slide = tmp_path / "slide"
    slide.mkdir()
    r, f = synth_mosaic_arrays((512, 512), seed=2, dtype="uint16")
    tifffile.imwrite(slide / "cm_R.tif", r)
    tifffile.imwrite(slide / "cm_F.tif", f)
    out = tmp_path / "crops"
    args = ["extract-crops", "--config", "smoke", "--out", str(out), "--no-progress"]
    assert main([*args, "--he", str(he_slide), "--cm", str(slide)]) == 0
    with (out / "he" / "manifest.csv").open() as fh:
        he_rows = list(csv.DictReader(fh))
    assert he_rows and {r["kind"] for r in he_rows} == {"pseudo"}
    pseudo = load_crop_regions(out / "he")
    assert pseudo[0].rgb.shape == (128, 128, 3)
    cm = load_crop_regions(out / "cm", kind="cm")
    assert cm[0].modes.shape == (128, 128, 2) and 0 <= cm[0].modes.min() <= cm[0].modes.max() <= 1
    # Writing into an input's folder is refused.
    bad = main(
        [
            "extract-crops",
            "--config",
            "smoke",
            "--he",
            str(he_slide),
            "--out",
            str(he_slide.parent / "x"),
            "--no-progress",
        ]
    )
    assert bad == 2


def test_despeckle_smoke_and_resume(he_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "desp"
    base = [
        "despeckle",
        "--config",
        "smoke",
        "--out",
        str(out),
        "--no-progress",
        *_data_args(he_slide),
    ]
    assert main(base) == 0
    with (out / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["variant"] for r in rows} == {"log-add-tiny", "combalia-tiny"}
    assert all(float(r["psnr_in"]) > 0 and 0 < float(r["ssim_in"]) <= 1 for r in rows)
    assert "| variant |" in (out / "table.md").read_text()
    model = load_model(out / "combalia-tiny" / "despeckle.safetensors", device="cpu")
    assert model.checkpoint_meta["kwargs"]["clamp_output"] is True
    y = model(torch.rand(1, 1, 40, 40))
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1

    # Interrupted after 2 of 4 iterations, resumed: same weights as the uninterrupted run.
    cut = tmp_path / "desp_cut"
    args = [
        "despeckle",
        "--config",
        "smoke",
        "--out",
        str(cut),
        "--no-progress",
        *_data_args(he_slide),
    ]
    assert main([*args, "--set", "train.stop_at=2"]) == 0
    assert load_state(cut / "log-add-tiny" / "state.safetensors")["iteration"] == 2
    assert not (cut / "table.csv").exists()
    assert main([*args, "--resume"]) == 0
    for v in ("log-add-tiny", "combalia-tiny"):
        a = load_state(out / v / "state.safetensors")
        b = load_state(cut / v / "state.safetensors")
        assert a["iteration"] == b["iteration"] == 4
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_cyclegan_smoke_resume_is_identical(he_slide: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["cyclegan", "--config", "smoke", "--no-progress", *_data_args(he_slide)]
    assert main([*common, "--out", str(full)]) == 0
    # Stop after 3 of 4 iterations (inside epoch 2, after the crop grew to 128), then resume.
    assert main([*common, "--out", str(cut), "--set", "stop_at=3"]) == 0
    st = load_state(cut / "state.safetensors")
    assert st["iteration"] == 3 and st["opt_G"]["state"][0]["step"].item() == 3
    assert main([*common, "--out", str(cut)]) == 2  # refuses to overwrite a run
    assert main([*common, "--out", str(cut), "--resume"]) == 0

    a, b = load_state(full / "state.safetensors"), load_state(cut / "state.safetensors")
    assert a["iteration"] == b["iteration"] == 4
    for net in ("G_AB", "G_BA", "D_A", "D_B"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=0, atol=0)
    for k, v in a["opt_G"]["state"][0].items():
        torch.testing.assert_close(v, b["opt_G"]["state"][0][k], rtol=0, atol=0)
    assert (full / "log.csv").read_text().splitlines()[-1].split(",")[:13] == (
        (cut / "log.csv").read_text().splitlines()[-1].split(",")[:13]
    )

    with (full / "val.csv").open() as fh:
        val = list(csv.DictReader(fh))
    assert [r["model"] for r in val][:2] == ["linear-stain (input)", "true H&E (reference)"]
    assert float(val[-1]["epoch"]) == 2 and 0 <= float(val[-1]["nuclei_preserved"]) <= 1
    assert (full / "samples" / "epoch_002.png").is_file()

    g = load_model(full / "G_AB.safetensors", device="cpu")
    assert g.checkpoint_meta["architecture"] == "unet"
    assert g.checkpoint_meta["kwargs"]["base_filters"] == 8
    y = g(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert y.shape == (1, 3, 64, 64) and torch.isfinite(y).all() and y.abs().max() <= 1


def test_gan_poc_smoke_prints_ks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["gan-poc", "--config", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("KS vs N(0,1)") == 2 and "thesis: 0.1023" in printed
    assert printed.count("KS normality") == 2
    with (tmp_path / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    ours = [r for r in rows if r["loss"] in ("mse", "adversarial")]
    assert len(ours) == 2
    assert all(0 <= float(r["ks_statistic"]) <= 1 and 0 <= float(r["p_value"]) <= 1 for r in ours)
    mse = next(r for r in ours if r["loss"] == "mse")
    assert float(mse["std"]) < 0.5  # the MSE optimum ignores the noise: a collapsed sample


# ------------------------------------------------------------------- structure (issue 8)


def _nuclei_scene(centres: list[tuple[int, int]], size: int = 96) -> np.ndarray:
    """Gaussian blobs (σ 2.5 px) at ``centres``, peak 1: an F-like nuclear map."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size))
    for cy, cx in centres:
        out = np.maximum(out, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.5**2)))
    return out


def _he_like(nuclei: np.ndarray) -> torch.Tensor:
    """Pink eosin background with purple hematoxylin where ``nuclei`` is high, in [-1, 1]."""
    pink, purple = np.array([0.93, 0.6, 0.75]), np.array([0.35, 0.2, 0.55])
    rgb = pink * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    return torch.from_numpy(rgb.transpose(2, 0, 1)[None] * 2 - 1).float()


def test_hematoxylin_density_matches_skimage() -> None:
    from skimage.color import rgb2hed

    from training.structure import hematoxylin_density

    rgb = np.random.default_rng(0).uniform(0, 1, (2, 3, 17, 19))
    rgb[0, :, 0, 0] = 0.0  # the log clamp
    ours = hematoxylin_density(torch.from_numpy(rgb)).numpy()[:, 0]
    ref = np.stack([np.maximum(rgb2hed(im.transpose(1, 2, 0))[..., 0], 0) for im in rgb])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_hematoxylin_loss_is_differentiable_and_rewards_matching_nuclei() -> None:
    from training.structure import hematoxylin_loss

    centres = [(20, 20), (20, 70), (50, 45), (75, 25), (76, 74)]
    f = torch.from_numpy(_nuclei_scene(centres))[None, None].float()
    match = _he_like(_nuclei_scene(centres))
    erased = _he_like(_nuclei_scene(centres[:2]))  # three nuclei erased
    moved = _he_like(_nuclei_scene([(y, (x + 40) % 96) for y, x in centres]))
    losses = {k: hematoxylin_loss(v, f).item() for k, v in
              {"match": match, "erased": erased, "moved": moved}.items()}  # fmt: skip
    assert losses["match"] < 0.1
    assert losses["match"] < losses["erased"] - 0.2 and losses["match"] < losses["moved"] - 0.5

    # Gradient descent on the output's pixels, from the erased image, restores the nuclei.
    logits = torch.atanh(erased.clamp(-0.999, 0.999)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    start = hematoxylin_loss(torch.tanh(logits), f)
    start.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    for _ in range(30):
        opt.zero_grad()
        loss = hematoxylin_loss(torch.tanh(logits), f)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * start.item()


def test_ks_fitted_is_the_theses_test_of_normality() -> None:
    """A collapsed, tiny-spread but normal-shaped sample fails vs N(0, 1), passes normality."""
    from training.gan_poc import ks_normal

    gen = torch.nn.Linear(5, 1)
    with torch.no_grad():  # −0.05 + 0.003·Σz: Irwin–Hall of 5 uniforms, close to normal
        gen.weight.fill_(0.003)
        gen.bias.fill_(-0.05)
    res = ks_normal(gen, 300, seed=0)
    assert res["ks_statistic"] > 0.4 and res["p_value"] < 1e-10
    assert res["ks_fitted"] < 0.08 and res["p_fitted"] > 0.05
    assert res["mean"] == pytest.approx(-0.05, abs=2e-3)


def test_amp_setting_is_device_generic() -> None:
    from training.cyclegan import amp_dtype

    cpu = torch.device("cpu")
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("auto", cpu) is None and amp_dtype(False, cpu) is None
    with pytest.raises(ValueError, match="bf16"):
        amp_dtype(True, cpu)
    with pytest.raises(ValueError, match="amp must be"):
        amp_dtype("fp8", cpu)


def test_cyclegan_structure_options_and_bf16_amp_on_cpu(he_slide: Path, tmp_path: Path) -> None:
    """Conditional D + hematoxylin loss + bf16 autocast/GradScaler on the CPU, then init_from."""
    base = tmp_path / "base"
    common = ["cyclegan", "--config", "smoke", "--no-progress", *_data_args(he_slide)]
    opts = [
        "--set", "discriminator.conditional=true",
        "--set", "loss.lambda_hema=2",
        "--set", 'amp="bf16"',
    ]  # fmt: skip
    assert main([*common, "--out", str(base), *opts]) == 0
    st = load_state(base / "state.safetensors")
    assert st["D_B"]["model.0.weight"].shape[1] == 6  # (DSCM, H&E) pairs
    assert st["scaler"] and float(st["scaler"]["scale"]) > 0  # the GradScaler path ran
    with (base / "log.csv").open() as fh:
        log = list(csv.DictReader(fh))
    assert all(0 < float(r["hema"]) <= 4 and math.isfinite(float(r["loss_G"])) for r in log)
    g = load_model(base / "G_AB.safetensors", device="cpu")
    training = g.checkpoint_meta["training"]
    assert training["loss"]["lambda_hema"] == 2 and training["discriminator"]["conditional"]

    # Fine-tune from that run: G_AB starts from its weights; a plain D_B (3 channels) cannot
    # take the conditional one's and starts fresh instead of failing.
    tuned = tmp_path / "tuned"
    init = ["--set", f"init_from={json.dumps(str(base / 'state.safetensors'))}"]
    sched = ["--set", "schedule.epochs=1", "--set", "schedule.crops=[[0, 64]]"]
    assert main([*common, "--out", str(tuned), *init, *sched, "--set", "stop_at=1"]) == 0
    first = load_state(tuned / "state.safetensors")
    assert first["D_B"]["model.0.weight"].shape[1] == 3
    moved = [
        (first["G_AB"][k] - st["G_AB"][k]).abs().max().item()
        for k in st["G_AB"]
        if k.endswith("weight")
    ]
    assert max(moved) < 1e-2  # one small Adam step from the loaded weights, not a fresh net


def test_evaluate_smoke_with_shipped_models(he_slide: Path, tmp_path: Path) -> None:
    args = ["evaluate", "--config", "smoke", "--out", str(tmp_path), *_data_args(he_slide)]
    assert main(args) == 0
    with (tmp_path / "stain.csv").open() as fh:
        stain = {r["model"]: r for r in csv.DictReader(fh)}
    assert set(stain) == {"linear-stain (input)", "stain-unet", "true H&E (reference)"}
    assert float(stain["linear-stain (input)"]["ssim_input"]) == pytest.approx(1.0)
    assert (tmp_path / "despeckle.md").is_file()


# ------------------------------------------------------------------------- shipped weights


@pytest.mark.parametrize("name", ["despeckle-combalia", "stain-unet"])
def test_shipped_weights_load_and_run(name: str) -> None:
    from napari_confocal_stain.models import WEIGHTS_DIR

    assert (WEIGHTS_DIR / f"{name}.md").is_file()  # the model card
    model = load_model(name, device="cpu")
    meta = model.checkpoint_meta
    assert meta["training"] and meta["training"]["seed"] == 0
    g = torch.Generator().manual_seed(0)
    if name == "stain-unet":
        assert meta["architecture"] == "unet"
        assert (meta["kwargs"]["base_filters"], meta["kwargs"]["n_down"]) == (32, 3)
        x = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
        y = model(x)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    else:
        assert meta["architecture"] == "despeckle-combalia"
        x = torch.rand(1, 1, 96, 96, generator=g)
        y = model(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        # It denoises: on a flat grey patch with speckle the output varies less.
        flat = torch.full((1, 1, 96, 96), 0.4)
        noisy = torch.from_numpy(add_speckle(flat.numpy(), "gaussian", np.random.default_rng(0)))
        assert model(noisy).std() < 0.5 * noisy.std()
    assert torch.isfinite(y).all()
