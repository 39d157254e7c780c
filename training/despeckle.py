"""Despeckling training (thesis §3.2 / §4.2, Combalia §2.1 / §3.1).

Clean images get synthetic unit-mean speckle (:mod:`training.noise`); a
:class:`~napari_confocal_stain.models.DespeckleNN` learns to undo it with an MSE loss and Adam.
One run trains a list of *variants* (architecture × noise model) and writes an evaluation
table like thesis Table 1 / Combalia Table 1: SSIM and PSNR of the noisy input and of the
output (and of the output after Combalia's 3×3 median filter) on held-out tiles.

Clean images are the inverted luma ``1 − Y`` of H&E at 0.75 µm/px (Combalia's recipe: tissue
bright on a dark background, like reflectance), cut into spatial bands of the slide so the
evaluation tiles never overlap a training crop (:func:`training.data.load_he_regions`).

Metrics, per tile then averaged over tiles:

* PSNR = ``10 log10(1 / MSE)`` with data range 1.
* SSIM = ``skimage.metrics.structural_similarity(clean, test, data_range=1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (Wang et al. 2004's
  Gaussian-window definition, the one :mod:`napari_confocal_stain.core.metrics` uses).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import median_filter
from skimage.metrics import structural_similarity
from torch import nn
from tqdm import tqdm

from napari_confocal_stain.models import build_model, model_spec, save_checkpoint
from training.data import (
    PairedCropSampler,
    TissueRegion,
    inverted_luma,
    load_he_regions,
    read_he,
    resize_to_pixel_size,
    tile_grid_regions,
)
from training.evaluate import write_table
from training.noise import add_speckle
from training.runstate import (
    CsvLog,
    load_state,
    portable_paths,
    save_state,
    seed_everything,
    write_atomic,
)

__all__ = [
    "DEFAULTS",
    "eval_tiles",
    "evaluate_despeckler",
    "init_identity",
    "psnr",
    "run_despeckle",
    "ssim",
    "train_variant",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "out": "runs/despeckle",
    "data": {
        "he": ["${NCS_DATA}/he/cmu_small_region.svs"],
        "pixel_size_um": None,
        "bands": 6,
        "order": ["source", "target", "heldout"],
        "train_splits": ["source", "target"],
        "eval_splits": ["heldout"],
        "extra_eval": [],
        "min_tissue": 0.3,
        "eval_tile": 256,
        "eval_min_tissue": 0.5,
        "eval_tiles": 32,
    },
    "train": {
        "iterations": 2000,
        "batch_size": 8,
        "crop": 64,
        "lr": 5e-4,
        "betas": [0.9, 0.999],
        "decay_start": 1.0,
        "init_identity": True,
        "log_every": 20,
        "checkpoint_every": 100,
        "stop_at": None,
    },
    "median": 3,
    "variants": [
        {
            "name": "combalia",
            "model": "despeckle-combalia",
            "kwargs": {},
            "noise": {"model": "gaussian", "sigma": 0.2},
        }
    ],
}

LOG_FIELDS = ("iteration", "loss", "lr", "seconds")
TABLE_COLUMNS = (
    "variant",
    "model",
    "skip",
    "M",
    "K",
    "N",
    "noise",
    "param",
    "eval_set",
    "tiles",
    "psnr_in",
    "psnr_out",
    "psnr_out_median",
    "ssim_in",
    "ssim_out",
    "ssim_out_median",
)


def psnr(clean: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    mse = float(np.mean((np.asarray(clean, np.float64) - np.asarray(test, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(clean: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Gaussian-window SSIM (σ = 1.5, population covariances) of two grey images."""
    return float(
        structural_similarity(
            np.asarray(clean, np.float64),
            np.asarray(test, np.float64),
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def _noise_kwargs(noise: Mapping[str, Any]) -> dict[str, Any]:
    kw = {"model": noise.get("model", "gamma")}
    if "looks" in noise:
        kw["looks"] = float(noise["looks"])
    if "sigma" in noise:
        kw["sigma"] = float(noise["sigma"])
    return kw


def _noise_param(noise: Mapping[str, Any]) -> str:
    model = noise.get("model", "gamma")
    if model == "gamma":
        return f"L={noise.get('looks', 1)}"
    if model == "gaussian":
        return f"sigma={noise.get('sigma', 0.2)}"
    return ""


def _lr_at(cfg: Mapping[str, Any], it: int) -> float:
    """Constant, then linear decay to 0 from ``decay_start · iterations``."""
    total = int(cfg["iterations"])
    start = float(cfg.get("decay_start", 1.0)) * total
    if it < start or total <= start:
        return float(cfg["lr"])
    return float(cfg["lr"]) * max(0.0, 1.0 - (it - start) / (total - start + 1))


def _build(variant: Mapping[str, Any], *, training: bool) -> nn.Module:
    kwargs = dict(variant.get("kwargs") or {})
    if model_spec(variant["model"]).kind != "despeckle":
        raise ValueError(f"variant {variant['name']!r}: {variant['model']!r} is no despeckler")
    # Clamping to [0, 1] would zero the gradient of every out-of-range prediction.
    if training:
        kwargs["clamp_output"] = False
    return build_model(variant["model"], **kwargs)


def init_identity(model: nn.Module) -> nn.Module:
    """Start a DespeckleNN near the identity map (output ≈ input).

    The final 1×1 convolution's weights are scaled by 0.01 and its bias set so the net's
    output is the skip's neutral value (1 for the multiplicative and divisive skips, 0 for
    the log-space ones), passed through the inverse of the final activation. Training then
    starts from "no denoising" instead of a random image, which saves a large share of a
    short CPU budget. Not possible for a tanh or sigmoid last layer with a multiplicative
    skip (they cannot output 1); those start at tanh(2) ≈ 0.96 / sigmoid(4) ≈ 0.98.

    Parameters
    ----------
    model
        A :class:`~napari_confocal_stain.models.DespeckleNN`.

    Returns
    -------
    nn.Module
        ``model``, modified in place.
    """
    convs = [m for m in model.net if isinstance(m, nn.Conv2d)]
    final = convs[-1]
    neutral = 1.0 if model.skip in ("multiplicative", "divisive") else 0.0
    act = model.config.get("final_activation")
    if act == "softplus":
        bias = float(np.log(np.expm1(neutral))) if neutral > 0 else -10.0
    elif act == "tanh":
        bias = 2.0 if neutral > 0 else 0.0
    elif act == "sigmoid":
        bias = 4.0 if neutral > 0 else -10.0
    elif act == "relu":
        bias = neutral
    else:
        bias = neutral
    with torch.no_grad():
        final.weight.mul_(0.01)
        final.bias.fill_(bias)
    return model


def train_variant(
    variant: Mapping[str, Any],
    config: Mapping[str, Any],
    regions: Sequence[TissueRegion],
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Train one despeckler on speckled crops of ``regions``; resumable.

    Parameters
    ----------
    variant
        ``{"name", "model" (registry name), "kwargs", "noise": {"model", "looks"|"sigma"}}``.
    config
        The full run configuration (``seed``, ``device``, ``train`` section).
    regions
        Training regions (inverted luma crops are drawn from them).
    out_dir
        This variant's folder: ``state.safetensors`` (resume), ``log.csv``,
        ``despeckle.safetensors`` (the plugin checkpoint).
    resume
        Continue from ``state.safetensors`` if it exists.
    progress
        Show a progress bar.

    Returns
    -------
    torch.nn.Module
        The trained model (eval mode, output clamped to [0, 1]).
    """
    out_dir = Path(out_dir)
    tcfg = config["train"]
    seed = int(config["seed"])
    device = torch.device(config.get("device", "cpu"))
    seed_everything(seed, config.get("threads"))
    model = _build(variant, training=True)
    if tcfg.get("init_identity", True):
        init_identity(model)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]))
    state_path = out_dir / "state.safetensors"
    log = CsvLog(out_dir / "log.csv", LOG_FIELDS)
    start = 0
    if resume and state_path.is_file():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        log.truncate_from("iteration", start + 1)
    elif state_path.exists() or (out_dir / "log.csv").exists():
        (out_dir / "log.csv").unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
    sampler = PairedCropSampler(
        regions, "reflectance", seed=seed, min_tissue=float(config["data"]["min_tissue"])
    )
    noise = _noise_kwargs(variant["noise"])
    total, batch, crop = int(tcfg["iterations"]), int(tcfg["batch_size"]), int(tcfg["crop"])
    stop = min(total, int(tcfg.get("stop_at") or total))  # a time-boxed job; resume later
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, stop),
        desc=f"despeckle {variant['name']}",
        disable=not progress,
        initial=start,
        total=total,
        mininterval=5,
    )
    for it in bar:
        clean = sampler.batch(range(it * batch, (it + 1) * batch), crop)["clean"].numpy()
        noisy = add_speckle(clean, rng=np.random.default_rng([seed, 1, it]), **noise)
        lr = _lr_at(tcfg, it)
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.from_numpy(noisy).to(device)
        y = torch.from_numpy(clean).to(device)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = it + 1
        if done % int(tcfg["log_every"]) == 0 or done == total:
            log.write(
                {
                    "iteration": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.set_postfix(loss=f"{loss.item():.2e}")
        if done % int(tcfg["checkpoint_every"]) == 0 or done == stop:
            save_state(
                state_path,
                {"iteration": done, "model": model.state_dict(), "optimizer": opt.state_dict()},
            )
    model.eval()
    model.clamp_output = True
    model.config["clamp_output"] = True
    return model


def eval_tiles(
    config: Mapping[str, Any], regions: Sequence[TissueRegion]
) -> dict[str, list[np.ndarray]]:
    """Clean held-out evaluation tiles (inverted luma), per evaluation set.

    The held-out bands give ``eval_tiles`` tissue tiles of ``eval_tile``²; every file of
    ``data.extra_eval`` (a path, or ``{"path", "pixel_size_um"}``; resized to 0.75 µm/px when
    the pixel size is known) gives its own set of non-overlapping tiles.
    """
    dcfg = config["data"]
    size = int(dcfg["eval_tile"])
    sets: dict[str, list[np.ndarray]] = {}
    tiles = tile_grid_regions(
        regions, size, float(dcfg["eval_min_tissue"]), int(dcfg["eval_tiles"])
    )
    sets["heldout-bands"] = [inverted_luma(r.rgb[y : y + size, x : x + size]) for r, y, x in tiles]
    for entry in dcfg.get("extra_eval") or []:
        path, um = (
            (entry["path"], entry.get("pixel_size_um"))
            if isinstance(entry, Mapping)
            else (entry, None)
        )
        he = read_he(path, um)
        rgb = resize_to_pixel_size(he.rgb, he.pixel_size_um)
        img = inverted_luma(rgb)
        s = min(size, *img.shape)
        sets[he.name] = [
            img[y : y + s, x : x + s]
            for y in range(0, img.shape[0] - s + 1, s)
            for x in range(0, img.shape[1] - s + 1, s)
        ]
    return sets


@torch.no_grad()
def evaluate_despeckler(
    model: nn.Module,
    tiles: Sequence[np.ndarray],
    noise: Mapping[str, Any],
    seed: int = 0,
    median: int = 3,
) -> dict[str, float]:
    """Mean PSNR / SSIM of noisy input, output and median-filtered output against clean.

    Parameters
    ----------
    model
        A despeckler (eval mode).
    tiles
        Clean ``(H, W)`` tiles in [0, 1].
    noise
        The speckle to add (``{"model", "looks"|"sigma"}``); tile ``i`` uses
        ``default_rng([seed, 2, i])``, the same for every model.
    seed
        Noise seed.
    median
        Median filter size applied to the output (0 or 1: none).

    Returns
    -------
    dict
        ``tiles``, ``psnr_in``, ``psnr_out``, ``psnr_out_median``, ``ssim_in``, ``ssim_out``,
        ``ssim_out_median``.
    """
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    kw = _noise_kwargs(noise)
    for i, clean in enumerate(tiles):
        noisy = add_speckle(clean, rng=np.random.default_rng([seed, 2, i]), **kw)
        x = torch.from_numpy(noisy[None, None]).to(device)
        out = model(x)[0, 0].float().cpu().numpy()
        med = median_filter(out, size=median, mode="reflect") if median > 1 else out
        for name, test in (("in", noisy), ("out", out), ("out_median", med)):
            sums[f"psnr_{name}"] = sums.get(f"psnr_{name}", 0.0) + psnr(clean, test)
            sums[f"ssim_{name}"] = sums.get(f"ssim_{name}", 0.0) + ssim(clean, test)
    n = max(len(tiles), 1)
    return {"tiles": len(tiles), **{k: v / n for k, v in sums.items()}}


def _sample_png(
    model: nn.Module,
    clean: np.ndarray,
    noise: Mapping[str, Any],
    seed: int,
    median: int,
    path: Path,
) -> None:
    """clean | noisy | output | output + median, side by side."""
    from training.evaluate import save_png

    noisy = add_speckle(clean, rng=np.random.default_rng([seed, 2, 0]), **_noise_kwargs(noise))
    with torch.no_grad():
        dev = next(model.parameters()).device
        out = model(torch.from_numpy(noisy[None, None]).to(dev))[0, 0].cpu().numpy()
    med = median_filter(out, size=median) if median > 1 else out
    save_png(path, np.concatenate([clean, noisy, out, med], axis=1))


def run_despeckle(
    config: Mapping[str, Any], *, resume: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every variant of ``config`` and write the evaluation table.

    Writes into ``config["out"]``: ``<variant>/despeckle.safetensors`` (loadable with
    ``load_model``), ``<variant>/log.csv``, ``<variant>/state.safetensors``,
    ``<variant>/sample.png``, ``table.csv`` and ``table.md``.

    Parameters
    ----------
    config
        See :data:`DEFAULTS`.
    resume
        Continue interrupted variants from their last state; finished variants are kept.
    progress
        Progress bars.

    Returns
    -------
    list of dict
        The table rows.
    """
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", _json(config))
    dcfg = config["data"]
    regions = load_he_regions(
        dcfg["he"],
        bands=int(dcfg["bands"]),
        order=dcfg["order"],
        pixel_size_um=dcfg.get("pixel_size_um"),
    )
    train_regions = [r for s in dcfg["train_splits"] for r in regions[s]]
    held = [r for s in dcfg["eval_splits"] for r in regions[s]]
    overlap = {r.box for r in train_regions} & {r.box for r in held}
    if overlap:
        raise ValueError(f"train and eval splits share regions {sorted(overlap)}")
    sets = eval_tiles(config, held)
    stop_at = config["train"].get("stop_at")
    stopped = bool(stop_at) and int(stop_at) < int(config["train"]["iterations"])
    rows: list[dict[str, Any]] = []
    for variant in config["variants"]:
        vdir = out / variant["name"]
        model = train_variant(
            variant, config, train_regions, vdir, resume=resume, progress=progress
        )
        if stopped:
            continue  # stopped early: evaluate once the run is resumed to its end
        metrics_by_set = {
            name: evaluate_despeckler(
                model, tiles, variant["noise"], int(config["seed"]), int(config["median"])
            )
            for name, tiles in sets.items()
            if tiles
        }
        cfg = model.config
        training = {
            "recipe": "synthetic speckle on the inverted luma (1 - Y) of H&E, MSE, Adam",
            "noise": dict(variant["noise"]),
            "data": portable_paths([str(p) for p in dcfg["he"]]),
            "split": {
                "bands": dcfg["bands"],
                "order": list(dcfg["order"]),
                "train": list(dcfg["train_splits"]),
                "eval": list(dcfg["eval_splits"]),
            },
            **{k: config["train"][k] for k in ("iterations", "batch_size", "crop", "lr")},
            "seed": config["seed"],
            "median_filter": int(config["median"]),
            "eval": metrics_by_set,
        }
        save_checkpoint(
            vdir / "despeckle.safetensors",
            model,
            architecture=variant["model"],
            kwargs=cfg,
            training=training,
        )
        first = next(iter(sets.values()))
        if first:
            _sample_png(
                model,
                first[0],
                variant["noise"],
                int(config["seed"]),
                int(config["median"]),
                vdir / "sample.png",
            )
        for set_name, m in metrics_by_set.items():
            rows.append(
                {
                    "variant": variant["name"],
                    "model": variant["model"],
                    "skip": cfg["skip"],
                    "M": cfg["layers"],
                    "K": cfg["filters"],
                    "N": cfg["kernel"],
                    "noise": variant["noise"].get("model", "gamma"),
                    "param": _noise_param(variant["noise"]),
                    "eval_set": set_name,
                    **m,
                }
            )
    if stopped:
        return rows
    write_table(
        rows,
        out / "table.csv",
        out / "table.md",
        TABLE_COLUMNS,
        title="Despeckling: PSNR (dB) and SSIM, noisy input vs output",
    )
    return rows


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)
