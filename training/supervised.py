"""``python -m training supervised``: train a stain model on H&E and its pseudo-confocal pair.

Real H&E is the one stain whose answer we know: its hematoxylin and eosin optical densities
give a pseudo-confocal pair (F from hematoxylin, R from eosin, :func:`training.data.
pseudo_confocal`) whose true H&E is the image itself. Trained on such pairs from varied tissue
(:mod:`training.tissues`: skin, oral and breast carcinoma at 20× and 40×) with stain,
magnification and detector augmentation (:mod:`training.augment`), a generator learns the
mapping from the Gareau linear stain of (R, F) to H&E as it is, not as one CycleGAN's
discriminator liked it. Per sample ``i`` (``default_rng([seed, i])``): a training image (each
image equally likely, the CC0 slide's four training bands counted as one image), a zoom, a
tissue crop, flips and 90° turns, an HED stain jitter of the crop (the answer), its
pseudo-confocal pair with a jittered normalisation, blur, noise and speckle (the input).

``loss = λ_l1 · L1(G(x), y) + λ_ssim · (1 − SSIM(lum G(x), lum y)) + λ_grad · L1(∇ lum G(x),
∇ lum y) + λ_hema · hematoxylin_loss``

SSIM on luminance (Gaussian σ = 1.5, the evaluation's definition) is what a pathologist's eye
and our held-out tables weigh; L1 keeps the colours; the gradient term (finite differences of
luminance) keeps fine texture that a pixel loss averages away (a regression to the mean is
smooth, which LBP χ² sees); the optional hematoxylin term
(:func:`training.structure.hematoxylin_loss`) ties nuclei to F. ``init`` starts from a
checkpoint's weights (fine-tuning). Adam, constant learning rate
then linear decay to 0.

Held-out scoring (``val.csv``) is per tissue: the held-out bands of the CC0 slide and every
held-out image (:data:`training.tissues.HELDOUT_IMAGES`), each with the linear stain as the
reference row. Outputs in ``out``: ``config.json``, ``log.csv``, ``val.csv``, ``sample.png``,
``state.safetensors`` (``--resume``) and ``G.safetensors`` (a plugin checkpoint:
``load_model(out / "G.safetensors")``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from napari_confocal_stain.models import build_model, read_model, save_checkpoint
from napari_confocal_stain.models.registry import DSCM_INPUT
from training.augment import AUGMENT_DEFAULTS, degrade_pair, hed_jitter, zoom_crop, zoom_factor
from training.config import portable_record
from training.data import (
    RandomFlip,
    TissueRegion,
    band_split_defaults,
    check_disjoint,
    dscm_tensor,
    load_he_regions,
    pseudo_confocal,
    regions_in,
    split_regions,
    stack_batch,
)
from training.images import grid_png
from training.loop import check_finite, linear_decay, progress_bar, set_lr, stop_iteration
from training.runstate import RunFolder, Stateful, start_run
from training.structure import hematoxylin_loss
from training.tissues import image_entries
from training.validation import (
    INPUT_ROW,
    STAIN_METRICS,
    ValidationSet,
    image_entry,
    make_validation_set,
    sample_rows,
    validate,
)

__all__ = [
    "DEFAULTS",
    "luminance_gradient_l1",
    "luminance_lbp_chi2",
    "luminance_ssim",
    "run_supervised",
    "sample_pairs",
    "validation_sets",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "threads": None,
    "out": "runs/supervised",
    "model": {"name": "fast", "kwargs": {}},
    "init": None,
    "loss": {
        "lambda_l1": 1.0,
        "lambda_ssim": 1.0,
        "lambda_grad": 0.0,
        "lambda_hema": 0.0,
        "hema_window": 15,
        "lambda_lbp": 0.0,
        "lbp_tau": 0.0005,
        "lbp_crop": 96,
    },
    "optim": {"lr": 2e-3, "betas": [0.9, 0.999]},
    "schedule": {"iterations": 3000, "decay_start": 1500, "crop": 192, "batch_size": 8},
    "augment": dict(AUGMENT_DEFAULTS),
    "data": {
        **band_split_defaults(),
        "train_splits": ["source", "target"],
        "val_splits": ["heldout"],
        "train_images": image_entries("train"),
        "val_images": image_entries("heldout"),
        "min_tissue": 0.3,
        "val_tile": 128,
        "val_tiles": 12,
        "val_min_tissue": 0.3,
        "val_speckle": {"model": "gaussian", "sigma": 0.2},
    },
    "log_every": 10,
    "val_every": 500,
    "checkpoint_every": 100,
    "stop_at": None,
    # The model card's known limits (one sentence each), written into the checkpoint's
    # metadata (extra.known_limits) so the viewer can show them when the model loads.
    "known_limits": [],
}

LOG_FIELDS = ("iteration", "lr", "loss", "l1", "ssim", "grad", "hema", "lbp", "seconds")
VAL_FIELDS = ("iteration", "model", "eval_set", *STAIN_METRICS)
HELDOUT_BANDS = "heldout bands"
"""Name of the validation set made of the CC0 slide's held-out bands."""

_RECORDED_DATA = ("he", "bands", "order", "train_splits", "val_splits", "train_images",
                  "val_images")  # fmt: skip
_SSIM_SIGMA = 1.5
_LUMA = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray, the metrics' luminance


def _gaussian_window(sigma: float, device: torch.device) -> torch.Tensor:
    # skimage's gaussian_filter window (truncate 3.5): the valid region is the one
    # structural_similarity averages over.
    radius = int(3.5 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _luma(t: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luminance of a ``(B, 3, H, W)`` RGB batch (the metrics' weights)."""
    w = torch.tensor(_LUMA, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    return t.mul(w).sum(1, keepdim=True)


def luminance_ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = _SSIM_SIGMA) -> torch.Tensor:
    """Mean Gaussian-window SSIM of the luminance of two RGB batches in [0, 1].

    The definition of :func:`napari_confocal_stain.core.metrics.ssim_map` (Wang et al. 2004,
    ``K1 = 0.01``, ``K2 = 0.03``, data range 1), differentiable, valid region only.

    Parameters
    ----------
    a, b
        ``(B, 3, H, W)`` in [0, 1].

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    x, y = _luma(a), _luma(b)
    g = _gaussian_window(sigma, a.device).to(a.dtype)
    gy, gx = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gy), gx)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()


def luminance_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean |∂x| and |∂y| difference of the luminance of two RGB batches in [0, 1]."""
    x, y = _luma(a), _luma(b)
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


# skimage's neighbour order for P=8, R=1: bit k at angle 2πk/8, (dy, dx) = (-sin, cos);
# the diagonal ones are bilinear samples at distance 1, as in the evaluation's LBP.
_LBP_ANGLES = tuple(
    (k % 2 == 1, round(-math.sin(math.pi * k / 4)), round(math.cos(math.pi * k / 4)))
    for k in range(8)
)
_DIAG = math.sqrt(0.5)


def _soft_lbp_histogram(lum: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-image 256-bin histogram of soft radius-1 LBP codes of ``(B, 1, H, W)``."""
    c = lum[..., 1:-1, 1:-1]
    h, w = c.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return lum[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] - c

    hist = torch.ones_like(c)
    for diagonal, dy, dx in _LBP_ANGLES:
        d = at(dy, dx)
        if diagonal:
            # Bilinear sample at (dy, dx)·√½ minus the centre.
            d = _DIAG * (1 - _DIAG) * (at(dy, 0) + at(0, dx)) + _DIAG * _DIAG * d
        bit = torch.sigmoid(d / tau)
        # Codes so far × (this bit 0, this bit 1): 2^k channels → 2^(k+1), bit k the k-th.
        hist = torch.cat([hist * (1 - bit), hist * bit], 1)
    return hist.mean((-2, -1))


def luminance_lbp_chi2(a: torch.Tensor, b: torch.Tensor, tau: float = 0.0005) -> torch.Tensor:
    """Mean χ² between the soft LBP histograms of the luminance of two batches, per image.

    The differentiable counterpart of the evaluation's LBP χ² to the true H&E: each of
    the 8 neighbour comparisons is a sigmoid of width ``tau`` (default: an eighth of an 8-bit
    grey level; at ``tau → 0`` it is the metric exactly, bilinear diagonals included), so
    each pixel spreads unit mass over the 256 codes. A pixel loss leaves the white
    background as a smooth ramp (edge codes) where the true H&E has the scanner's grain
    (extrema); this term asks for the true texture's code statistics, not its pixels.
    ``loss.lambda_lbp`` (default 0) weighs it in ``python -m training supervised``, on a
    centre crop of ``loss.lbp_crop`` pixels (the 256-channel histogram costs about as much
    as the rest of a step). Not used by the shipped recipe: see docs/training.md.

    Parameters
    ----------
    a, b
        ``(B, 3, H, W)`` in [0, 1].
    tau
        Width of the soft comparison, in luminance units.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    p, q = _soft_lbp_histogram(_luma(a), tau), _soft_lbp_histogram(_luma(b), tau)
    return 0.5 * ((p - q) ** 2 / (p + q + 1e-8)).sum(1).mean()


# ------------------------------------------------------------------------------ data


def _load_images(entries: Sequence[Any], split: str) -> list[TissueRegion]:
    """Every image of ``entries`` whole, at 0.75 µm/px (see :func:`~training.data.read_he`)."""
    regions: list[TissueRegion] = []
    for entry in entries:
        path, size = image_entry(entry)
        regions += load_he_regions([path], bands=0, order=[split], pixel_size_um=size)[split]
    return regions


def training_regions(
    data: Mapping[str, Any], bands: Mapping[str, list[TissueRegion]]
) -> list[TissueRegion]:
    """The training bands (of ``bands``, from :func:`~training.data.split_regions`) and every
    ``train_images`` image."""
    trained = regions_in(bands, data["train_splits"]) if bands else []
    return trained + _load_images(data.get("train_images") or [], "train")


def validation_sets(
    data: Mapping[str, Any], seed: int, bands: Mapping[str, list[TissueRegion]]
) -> dict[str, ValidationSet]:
    """Held-out tiles per tissue: the held-out bands (of ``bands``), then each ``val_images``.

    Every set uses ``val_tile``² tiles (at most ``val_tiles``) with ``val_speckle`` on R; the
    tiles and their speckle are the same for every model and every epoch.
    """
    size, count, mt = int(data["val_tile"]), int(data["val_tiles"]), float(data["val_min_tissue"])
    speckle = data.get("val_speckle")
    groups: dict[str, list[TissueRegion]] = {}
    if bands:
        groups[HELDOUT_BANDS] = regions_in(bands, data["val_splits"])
    for entry in data.get("val_images") or []:
        path, _ = image_entry(entry)
        groups[Path(path).name] = _load_images([entry], "val")
    return {
        name: make_validation_set(regions, size, count, min_tissue=mt, speckle=speckle, seed=seed)
        for name, regions in groups.items()
    }


def _slide_weights(regions: Sequence[TissueRegion], size: int, min_tissue: float) -> np.ndarray:
    """Sampling weights: each slide equally likely, its regions by their valid crops."""
    counts = np.array([len(r.origins(size, min_tissue)) for r in regions], float)
    per_slide: dict[str, float] = {}
    for r, c in zip(regions, counts, strict=True):
        per_slide[r.slide] = per_slide.get(r.slide, 0.0) + c
    w = np.array(
        [c / per_slide[r.slide] if c else 0.0 for r, c in zip(regions, counts, strict=True)]
    )
    if w.sum() == 0:
        raise ValueError(f"supervised: no {size}² crop has ≥ {min_tissue:.0%} tissue")
    return w / w.sum()


def _window(size: int, zoom: float) -> int:
    """Source window of a zoomed crop, on a 16-px lattice (few distinct origin tables)."""
    return max(16, round(size / zoom / 16.0) * 16)


def sample_pairs(
    regions: Sequence[TissueRegion],
    indices: range,
    size: int,
    seed: int,
    min_tissue: float,
    augment: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Augmented training pairs ``(B, C, size, size)``: ``dscm`` [-1, 1], ``f``, ``truth`` [-1, 1].

    Sample ``i`` uses ``default_rng([seed, i])`` (see the module docstring).
    """
    aug = {**AUGMENT_DEFAULTS, **augment}
    weights: dict[int, np.ndarray] = {}  # per source window size
    flip = RandomFlip(rotate=True)
    dscm, fs, truth = [], [], []
    for i in indices:
        rng = np.random.default_rng([seed, int(i)])
        win = _window(size, zoom_factor(rng, aug["zoom_range"], float(aug["zoom_probability"])))
        if win not in weights:
            weights[win] = _slide_weights(regions, win, min_tissue)
        region = regions[int(rng.choice(len(regions), p=weights[win]))]
        origins = region.origins(win, min_tissue)
        y, x = (int(v) for v in origins[int(rng.integers(len(origins)))])
        rgb = zoom_crop(region.rgb, y, x, size, size / win)
        rgb, alpha = hed_jitter(rgb, rng, aug["hed_log_scale"], float(aug["hed_bias"]))
        # Normalised as a slide of that stain strength would be (see training.augment), or
        # by the unjittered slide's densities (the input then shows the jitter).
        norm = alpha[:2] if aug["hed_renormalise"] else 1.0
        scale = region.hed_scale * norm * rng.uniform(*aug["gain_range"], 2)
        r, f = pseudo_confocal(rgb, scale)
        r, f = degrade_pair(r, f, rng, aug)
        a, b, c = flip([dscm_tensor(r, f).transpose(1, 2, 0), f, rgb * 2.0 - 1.0], rng)
        dscm.append(a.transpose(2, 0, 1))
        fs.append(b[None])
        truth.append(c.transpose(2, 0, 1))
    return stack_batch({"dscm": dscm, "f": fs, "truth": truth})


# ----------------------------------------------------------------------------- training


@dataclass
class _Trainee:
    """The generator, its optimiser and where they run."""

    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device

    def parts(self) -> dict[str, Stateful]:
        """What the resume state holds, by key."""
        return {"model": self.model, "opt": self.opt}


def _build(config: Mapping[str, Any], device: torch.device) -> _Trainee:
    """A fresh generator whose size multiple divides the crop, and Adam."""
    spec = config["model"]
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    if config.get("init"):
        start = read_model(config["init"])
        # A path the start lacks (the fast model's ``detail``) starts at its zero init.
        added = {k for k, v in model.config.items() if v is True and k not in start.config}
        base = {k: v for k, v in model.config.items() if k not in added}
        if type(start) is not type(model) or start.config != base:
            raise ValueError(
                f"init {config['init']}: a {type(start).__name__}{start.config}, not the "
                f"configured {type(model).__name__}{model.config}"
            )
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        if unexpected or any(k.split(".")[0] not in added for k in missing):
            raise ValueError(f"init {config['init']}: parameters differ ({missing}, {unexpected})")
    model = model.to(device)
    mult = int(getattr(model, "size_multiple", 1))
    crop = int(config["schedule"]["crop"])
    if crop % mult:
        raise ValueError(f"schedule.crop {crop} must be a multiple of {mult}")
    opt = torch.optim.Adam(
        model.parameters(), lr=float(config["optim"]["lr"]), betas=tuple(config["optim"]["betas"])
    )
    return _Trainee(model, opt, device)


def _step(t: _Trainee, batch: Mapping[str, torch.Tensor], lam: Mapping[str, Any]) -> dict:
    """One optimiser step; the loss terms as floats."""
    x, y = batch["dscm"].to(t.device), batch["truth"].to(t.device)
    out = t.model(x)
    l1 = F.l1_loss(out, y)
    ssim = luminance_ssim((out + 1) / 2, (y + 1) / 2)
    loss = float(lam.get("lambda_l1", 1.0)) * l1 + float(lam.get("lambda_ssim", 1.0)) * (1 - ssim)
    grad = torch.zeros(())
    if float(lam.get("lambda_grad", 0.0)) > 0:
        grad = luminance_gradient_l1((out + 1) / 2, (y + 1) / 2)
        loss = loss + float(lam["lambda_grad"]) * grad
    hema = torch.zeros(())
    if float(lam.get("lambda_hema", 0.0)) > 0:
        f = batch["f"].to(t.device)
        hema = hematoxylin_loss(out, f, window=int(lam.get("hema_window", 15)))
        loss = loss + float(lam["lambda_hema"]) * hema
    lbp = torch.zeros(())
    if float(lam.get("lambda_lbp", 0.0)) > 0:
        # The 256-channel soft histogram is the costly part: score a centre crop of each sample.
        n = min(int(lam.get("lbp_crop", 96)), *out.shape[-2:])
        top, left = (out.shape[-2] - n) // 2, (out.shape[-1] - n) // 2
        a, b = (v[..., top : top + n, left : left + n] for v in (out, y))
        lbp = luminance_lbp_chi2((a + 1) / 2, (b + 1) / 2, float(lam.get("lbp_tau", 0.0005)))
        loss = loss + float(lam["lambda_lbp"]) * lbp
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()
    return {
        "loss": loss.item(),
        "l1": l1.item(),
        "ssim": ssim.item(),
        "grad": grad.item(),
        "hema": hema.item(),
        "lbp": lbp.item(),
    }


def _validate_all(
    model: nn.Module | None, sets: Mapping[str, ValidationSet], label: str, iteration: int
) -> list[dict[str, Any]]:
    """One ``val.csv`` row per set."""
    return [
        {"iteration": iteration, "model": label, "eval_set": name, **validate(model, val)}
        for name, val in sets.items()
        if len(val)
    ]


def _train(
    t: _Trainee,
    regions: list[TissueRegion],
    sets: Mapping[str, ValidationSet],
    config: Mapping[str, Any],
    run: RunFolder,
    start: int,
    progress: bool,
) -> tuple[int, list[dict[str, Any]]]:
    """Iterations ``start`` … ``stop_at`` or the end; the last one done and its validation."""
    sched, d = config["schedule"], config["data"]
    seed, lr0, crop = int(config["seed"]), float(config["optim"]["lr"]), int(sched["crop"])
    total, batch = int(sched["iterations"]), int(sched["batch_size"])
    stop = stop_iteration(total, config.get("stop_at"))
    t.model.train()
    last_val: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = progress_bar(start, stop, total, "supervised", progress)
    for it in bar:
        lr = lr0 * linear_decay(it, int(sched["decay_start"]), total, extra=0.0)
        set_lr([t.opt], lr)
        idx = range(it * batch, (it + 1) * batch)
        b = sample_pairs(regions, idx, crop, seed, float(d["min_tissue"]), config["augment"])
        values = _step(t, b, config["loss"])
        done = it + 1
        if done % int(config["log_every"]) == 0 or done == stop:
            values = {"iteration": done, "lr": lr, **values, "seconds": time.perf_counter() - t0}
            check_finite(values, done)
            run.logs["log.csv"].write(values)
            bar.set_postfix(l1=f"{values['l1']:.4f}", ssim=f"{values['ssim']:.3f}")
        if done % int(config["val_every"]) == 0 or done == total:
            last_val = _validate_all(t.model, sets, "model", done)
            for row in last_val:
                run.logs["val.csv"].write(row)
            t.model.train()
        if done % int(config["checkpoint_every"]) == 0 or done == stop:
            run.save(done, t.parts())
    return stop, last_val


def _export(
    t: _Trainee, config: Mapping[str, Any], out: Path, val: Sequence[Mapping[str, Any]]
) -> Path:
    """Write the generator as a plugin checkpoint (architecture, kwargs, recipe, metrics)."""
    d = config["data"]
    training = {
        "recipe": "supervised on real H&E and its pseudo-confocal pair: L1 + (1 - luminance "
        "SSIM) to the true H&E, with HED stain, zoom and detector augmentation",
        "iteration": int(config["schedule"]["iterations"]),
        "schedule": dict(config["schedule"]),
        "loss": dict(config["loss"]),
        "optim": dict(config["optim"]),
        "augment": dict(config["augment"]),
        "seed": int(config["seed"]),
        "model": dict(config["model"]),
        "init": config.get("init"),
        "data": {k: d.get(k) for k in _RECORDED_DATA},
        "val": [dict(row) for row in val],
    }
    return save_checkpoint(
        out / "G.safetensors",
        t.model,
        architecture=config["model"]["name"],
        normalization=dict(DSCM_INPUT),
        training=portable_record(training),
        extra={"known_limits": [str(x) for x in config.get("known_limits") or []]},
    )


def run_supervised(
    config: Mapping[str, Any], *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train ``config["model"]`` on augmented pseudo-confocal pairs (see the module docstring).

    Parameters
    ----------
    config
        See :data:`DEFAULTS`.
    resume
        Continue from ``out/state.safetensors``; without it an existing run is an error.
    progress
        Progress bar.

    Returns
    -------
    dict
        ``{"iteration", "checkpoint", "val"}``; ``val`` is the last per-set validation.
    """
    logs = {"log.csv": LOG_FIELDS, "val.csv": VAL_FIELDS}
    run, device = start_run(config, logs, resume=resume)
    t = _build(config, device)
    start = run.resume(t.parts())
    d = config["data"]
    # The band-split slides are read and cut once, for training, validation and the check.
    bands = split_regions(d) if d.get("he") else {}
    if bands:
        check_disjoint(
            {
                "training": regions_in(bands, d["train_splits"]),
                "validation": regions_in(bands, d["val_splits"]),
            }
        )
    regions = training_regions(d, bands)
    sets = validation_sets(d, int(config["seed"]), bands)
    _check_images_disjoint(d)
    if start == 0:
        for row in _validate_all(None, sets, INPUT_ROW, 0):
            run.logs["val.csv"].write(row)
    stop, last_val = _train(t, regions, sets, config, run, start, progress)
    total = int(config["schedule"]["iterations"])
    if stop < total:
        return {"iteration": stop, "stopped": True, "checkpoint": None, "val": last_val}
    t.model.eval()
    first = next((v for v in sets.values() if len(v)), None)
    if first is not None:
        grid_png(run.out / "sample.png", sample_rows(first, [t.model], 4))
    ckpt = _export(t, config, run.out, last_val)
    return {"iteration": total, "checkpoint": str(ckpt), "val": last_val}


def _check_images_disjoint(data: Mapping[str, Any]) -> None:
    """Refuse a config that trains on an image it also evaluates on."""
    train = {Path(image_entry(e)[0]).resolve() for e in data.get("train_images") or []}
    val = {Path(image_entry(e)[0]).resolve() for e in data.get("val_images") or []}
    both = sorted(str(p) for p in train & val)
    if both:
        raise ValueError(f"supervised: images both trained and evaluated on: {both}")
