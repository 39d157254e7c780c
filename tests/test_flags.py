"""Hallucination flags: shapes, background, painted defects, calibration round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_confocal_stain.core.linear_stain import linear_stain
from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.io.synthetic import synth_region
from napari_confocal_stain.measure.flags import (
    CALIBRATION_KEY,
    SIGNALS,
    FlagCalibration,
    flag_hallucinations,
    load_calibration,
    reasons_text,
)
from napari_confocal_stain.models.checkpoint import load_checkpoint, save_checkpoint
from napari_confocal_stain.models.registry import build_model
from training.calibrate import (
    Pair,
    calibrate_model,
    solve_thresholds,
    transfer_factor,
    write_calibrated_checkpoint,
)

SLIDE = (4096, 4096)


def _pair(seed: int, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return synth_region(SLIDE, y0, x0, h, w, seed=seed)


@pytest.fixture(scope="module")
def calibration() -> FlagCalibration:
    """Calibrated on the linear stain of synthetic tissue: a model that never hallucinates."""
    pairs = []
    for seed, (y0, x0) in ((2, (1600, 1600)), (3, (1800, 1500))):
        r, f = _pair(seed, y0, x0, 640, 640)
        pairs.append(Pair(f"seed {seed}", r, f, stained=linear_stain(r, f)))
    return calibrate_model(pairs, cells=(64, 256, 1024), target=0.04, model_name="linear")


def _tissue_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, f = _pair(9, 1700, 1700, 512, 512)
    return r, f, linear_stain(r, f)


@pytest.mark.parametrize(
    ("cell", "shape"),
    [(64, (200, 150)), (100, (333, 250)), (128, (300, 500)), (512, (600, 700)),
     (1024, (1030, 1100))],
)  # fmt: skip
def test_shapes_for_any_cell_and_size(calibration, cell, shape):
    r, f = _pair(4, 1500, 1500, *shape)
    out = flag_hallucinations(r, f, linear_stain(r, f), cell=cell, model=calibration)
    grid = (-(-shape[0] // cell), -(-shape[1] // cell))
    assert out["flagged"].shape == out["score"].shape == out["reasons"].shape == grid
    assert out["flagged"].dtype == bool
    assert set(out["signals"]) == set(SIGNALS) == set(out["ratios"])
    for v in out["signals"].values():
        assert v.shape == grid
    assert out["erased_points"].shape[1:] == (2,)
    assert out["invented_points"].shape[1:] == (2,)
    # The flag is exactly "score > 1 on tissue" and its reasons are the ratios above 1.
    assert np.array_equal(out["flagged"], out["tissue"] & (out["score"] > 1))
    for idx in np.ndindex(grid):
        fired = tuple(k for k in SIGNALS if out["ratios"][k][idx] > 1 and out["flagged"][idx])
        assert out["reasons"][idx] == fired


def test_background_is_never_flagged(calibration):
    r, f, stained = _tissue_pair()
    r, f, stained = r.copy(), f.copy(), stained.copy()
    r[:, 256:] = 0.0  # right half: bare glass, nothing in either mode
    f[:, 256:] = 0.0
    stained[:, 256:] = 1.0
    # Paint garbage on the glass: a purple blob field and a checkerboard.
    yy, xx = np.mgrid[0:512, 256:512]
    stained[:, 256:] = np.where(((yy // 2 + xx // 2) % 2)[..., None] == 1, 0.2, 0.9)
    out = flag_hallucinations(r, f, stained, cell=128, model=calibration)
    assert not out["tissue"][:, 2:].any()
    assert not out["flagged"][:, 2:].any()
    assert np.all(out["score"][:, 2:] == 0)
    assert out["tissue"][:, :2].all()


def _erase_nuclei(stained: np.ndarray, f: np.ndarray, box: tuple[int, int, int, int]):
    """Paint the F nuclei of a box out of the stain (cytoplasm colour over them)."""
    from scipy import ndimage as ndi

    y0, y1, x0, x1 = box
    nuclear = ndi.binary_dilation(f > 0.35, iterations=3)
    out = stained.copy()
    region = out[y0:y1, x0:x1]
    mask = nuclear[y0:y1, x0:x1]
    region[mask] = np.median(region[~mask], axis=0)
    return out


def test_a_painted_defect_flags_its_cell_only(calibration):
    # Local signals average over a 12 µm window (σ; about 70 px of support with the
    # detail bands), so a defect that close to a border also reaches the neighbour:
    # paint well inside a 256-px cell.
    r, f, stained = _tissue_pair()
    clean = flag_hallucinations(r, f, stained, cell=256, model=calibration)
    painted = _erase_nuclei(stained, f, (336, 432, 80, 176))  # inside cell (1, 0)
    out = flag_hallucinations(r, f, painted, cell=256, model=calibration)
    assert not clean["flagged"][1, 0] and out["flagged"][1, 0]
    assert "erased_nuclei" in out["reasons"][1, 0]
    assert out["reasons_text"][1, 0].split(";") == list(out["reasons"][1, 0])
    others = np.ones(out["flagged"].shape, bool)
    others[1, 0] = False  # every other cell keeps its flag and score
    assert np.array_equal(out["flagged"][others], clean["flagged"][others])
    assert np.allclose(out["score"][others], clean["score"][others])
    pts = out["erased_points"]
    assert len(pts) > 0
    assert np.all((pts[:, 0] >= 330) & (pts[:, 0] < 438) & (pts[:, 1] >= 74) & (pts[:, 1] < 182))
    # A pasted foreign patch (another tissue's stain) is flagged too.
    r2, f2 = _pair(11, 2000, 2000, 96, 96)
    i, j = next(c for c in ((0, 1), (1, 1), (0, 0)) if not clean["flagged"][c])
    pasted = stained.copy()
    pasted[i * 256 + 80 : i * 256 + 176, j * 256 + 80 : j * 256 + 176] = linear_stain(r2, f2)
    out = flag_hallucinations(r, f, pasted, cell=256, model=calibration)
    assert out["flagged"][i, j]
    others = np.ones(out["flagged"].shape, bool)
    others[i, j] = False
    assert np.array_equal(out["flagged"][others], clean["flagged"][others])


def test_transfer_factor_makes_thresholds_hold_on_an_unseen_image():
    """In-sample quantiles fit the images they came from; the factor corrects for that."""
    rng = np.random.default_rng(0)
    # Four images whose known-good signal levels differ, as tissues do.
    levels = np.array([0.0, 0.5, 1.0, 1.5])
    groups = np.repeat(np.arange(4), 300)
    values = rng.normal(0, 1, (1200, 3)) + levels[groups][:, None]
    target = 0.05
    q, _, rate = solve_thresholds(values, target)
    med = np.nanmedian(values, axis=0)
    factor, before, after = transfer_factor(values, groups, q, med, target)
    assert rate <= target < before  # optimistic in sample, not on a left-out image
    assert factor > 1 and after <= target + 1e-9
    # The factor is what the left-out scores need: every image against the others.
    scores = []
    for g in range(4):
        own = groups == g
        tg = np.quantile(values[~own], q, axis=0)
        scores.append(((values[own] - med) / (tg - med)).max(axis=1))
    assert np.isclose(factor, np.quantile(np.concatenate(scores), 1 - target))
    # One image: nothing to transfer from.
    assert transfer_factor(values[:300], groups[:300], q, med, target)[0] == 1.0
    # Images that agree need no correction beyond sampling noise.
    same = rng.normal(0, 1, (1200, 3))
    q2, _, _ = solve_thresholds(same, target)
    assert transfer_factor(same, groups, q2, np.median(same, axis=0), target)[0] < 1.2


def test_reasons_text_is_csv_ready():
    reasons = np.empty((1, 3), object)
    reasons[0, 0], reasons[0, 1], reasons[0, 2] = (), ("lbp_chi2",), ("colour", "periodic")
    assert reasons_text(reasons).tolist() == [["", "lbp_chi2", "colour;periodic"]]


def test_calibration_round_trip(tmp_path, calibration):
    torch.manual_seed(0)
    model = build_model("affine")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = save_checkpoint(tmp_path / "tiny.safetensors", model, training={"note": "tiny"})
    from training.calibrate import stain_pairs

    pairs = []
    for seed in (2, 3):
        r, f = _pair(seed, 1700, 1700, 320, 320)
        pairs.append(Pair(f"seed {seed}", r, f))
    stain_pairs(pairs, model.eval(), device="cpu")
    cal = calibrate_model(pairs, cells=(64, 128), target=0.05, model_name="tiny")
    out = write_calibrated_checkpoint(src, tmp_path / "tiny-calibrated.safetensors", cal)
    before, meta0 = load_checkpoint(src)
    after, meta1 = load_checkpoint(out)
    assert set(before) == set(after)
    for k in before:  # the same tensors, bit for bit
        assert before[k].dtype == after[k].dtype
        assert torch.equal(before[k], after[k])
    assert meta1["training"] == meta0["training"] == {"note": "tiny"}
    stored = meta1["extra"][CALIBRATION_KEY]
    assert stored == json.loads(json.dumps(cal.to_dict()))
    loaded = load_calibration(out)
    assert loaded.to_dict() == cal.to_dict()
    assert loaded.measured["64"]["false_flag_rate"] <= 0.05
    # flag_hallucinations(model=path) uses exactly that calibration.
    r, f = pairs[0].r, pairs[0].f
    via_path = flag_hallucinations(r, f, pairs[0].stained, cell=96, model=out)
    via_cal = flag_hallucinations(r, f, pairs[0].stained, cell=96, model=cal)
    assert via_path["model"] == "tiny"
    assert np.array_equal(via_path["score"], via_cal["score"])
    # A checkpoint without calibration is refused with its path in the message.
    with pytest.raises(ValueError, match=r"tiny\.safetensors.*no hallucination-flag calibration"):
        flag_hallucinations(r, f, pairs[0].stained, cell=64, model=src)


def test_calibrate_command(tmp_path):
    from training.__main__ import main

    model = build_model("affine")
    src = save_checkpoint(tmp_path / "m.safetensors", model)
    (tmp_path / "m.md").write_text("# Model card: m\n\n## Limitations\n\nTiny.\n")
    data = {
        "he": [],
        "synthetic": [{"seed": 2, "size": [4096, 4096], "region": [1700, 1956, 1700, 1956]}],
    }
    argv = ["calibrate", "--model", str(src), "--out", str(tmp_path / "m2.safetensors"),
            "--no-progress", "--set", f"data={json.dumps(data)}", "--set", "cells=[64, 128]",
            "--card", str(tmp_path / "m.md")]  # fmt: skip
    assert main(argv) == 0
    cal = load_calibration(tmp_path / "m2.safetensors")
    assert cal.cells == [64, 128]
    card = (tmp_path / "m.md").read_text()
    assert "## Hallucination-flag calibration" in card and "## Limitations" in card
    assert main([*argv]) == 0  # re-running replaces the section instead of adding one
    assert (tmp_path / "m.md").read_text().count("## Hallucination-flag calibration") == 1
    bad = ["calibrate", "--model", str(tmp_path / "missing.safetensors"), "--out", "x"]
    assert main(bad) == 2


def test_default_model_uses_its_stored_calibration():
    from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

    default = load_calibration(None)
    assert default.to_dict() == load_calibration(DEFAULT_STAIN_MODEL).to_dict()
    assert default.model == DEFAULT_STAIN_MODEL
    assert load_calibration("stain-light").model == "stain-light"
    r, f, stained = _tissue_pair()
    out = flag_hallucinations(r[:256, :256], f[:256, :256], stained[:256, :256], cell=128)
    assert out["model"] == DEFAULT_STAIN_MODEL
    from napari_confocal_stain import flag_hallucinations as top_level

    assert top_level is flag_hallucinations


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cell": 32}, "between 64 and 1024"),
        ({"cell": 2048}, "between 64 and 1024"),
        ({"cell": 64.0}, "integer"),
        ({"cell": True}, "integer"),
        ({"cell": 512}, "smaller than one 512-px cell"),
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"pixel_size_um": "x"}, "pixel_size_um"),
        ({"r": np.zeros((200, 200, 3))}, "r must be"),
        ({"stained": np.zeros((200, 200))}, "stained must be"),
        ({"f": np.zeros((199, 200))}, "differ in size"),
        ({"f": np.full((200, 200), np.nan)}, "NaN"),
        ({"stained": np.zeros((200, 200, 3), np.uint8)}, "integer dtype"),
        ({"model": 3.5}, "model must be"),
    ],
)
def test_bad_arguments(calibration, change, message):
    args = {"r": np.zeros((200, 200)), "f": np.zeros((200, 200)),
            "stained": np.ones((200, 200, 3)), "cell": 64, "model": calibration,
            "pixel_size_um": 0.75}  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=message):
        flag_hallucinations(args.pop("r"), args.pop("f"), args.pop("stained"), **args)


def test_missing_or_broken_checkpoint(tmp_path):
    img = np.zeros((128, 128))
    with pytest.raises(CheckpointError, match="not found"):
        flag_hallucinations(img, img, np.ones((128, 128, 3)), cell=64,
                            model=tmp_path / "nope.safetensors")  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        flag_hallucinations(img, img, np.ones((128, 128, 3)), cell=64, model=bad)
    with pytest.raises(ValueError, match="malformed flag calibration"):
        FlagCalibration.from_dict({"cells": [64]})
