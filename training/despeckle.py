"""``python -m training despeckle``: despeckling (thesis §3.2 / §4.2, Combalia §2.1 / §3.1).

Clean images get synthetic unit-mean speckle (:mod:`training.noise`); a
:class:`~napari_confocal_stain.models.DespeckleNN` learns to undo it with an MSE loss and Adam.
One run trains a list of *variants* (architecture × noise model) and writes an evaluation
table like thesis Table 1 / Combalia Table 1: SSIM and PSNR of the noisy input and of the
output (and of the output after Combalia's 3×3 median filter) on held-out tiles
(:func:`training.validation.evaluate_despeckler` defines the metrics).

Clean images are the inverted luma ``1 − Y`` of H&E at 0.75 µm/px (Combalia's recipe: tissue
bright on a dark background, like reflectance), cut into spatial bands of the slide so the
evaluation tiles never overlap a training crop (:func:`training.data.load_he_regions`).

Each variant is its own resumable run in ``out/<variant>`` (:class:`training.runstate.RunFolder`);
batch ``it`` speckle comes from ``default_rng([seed, 1, it])``, so ``--resume`` continues
exactly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch import nn

from napari_confocal_stain.models import build_model, model_spec, save_checkpoint
from training.config import portable_record, write_config
from training.data import (
    PairedCropSampler,
    TissueRegion,
    band_split_defaults,
    check_disjoint,
    regions_in,
    split_regions,
)
from training.images import save_png
from training.loop import linear_decay, progress_bar, set_lr, stop_iteration
from training.noise import add_speckle, speckle_kwargs
from training.runstate import RunFolder, Stateful, seed_everything
from training.tables import write_table
from training.validation import (
    DESPECKLE_METRICS,
    denoise,
    despeckle_eval_sets,
    evaluate_despeckler,
    speckled,
)

__all__ = ["DEFAULTS", "TABLE_COLUMNS", "init_identity", "run_despeckle", "train_variant"]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "out": "runs/despeckle",
    "data": {
        **band_split_defaults(),
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
    *DESPECKLE_METRICS,
)
"""Columns of ``table.csv`` / ``table.md``: the variant, then its scores per evaluation set."""


def _noise_param(noise: Mapping[str, Any]) -> str:
    model = noise.get("model", "gamma")
    if model == "gamma":
        return f"L={noise.get('looks', 1)}"
    if model == "gaussian":
        return f"sigma={noise.get('sigma', 0.2)}"
    return ""


def _build(variant: Mapping[str, Any]) -> nn.Module:
    """A fresh despeckler to train: the output clamp to [0, 1] is off, since it would zero
    the gradient of every out-of-range prediction."""
    kwargs = dict(variant.get("kwargs") or {})
    if model_spec(variant["model"]).kind != "despeckle":
        raise ValueError(f"variant {variant['name']!r}: {variant['model']!r} is no despeckler")
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
    else:  # relu or none: the neutral value itself
        bias = neutral
    with torch.no_grad():
        final.weight.mul_(0.01)
        final.bias.fill_(bias)
    return model


@dataclass
class _Trainer:
    """One variant in training: its model and optimiser, where its crops come from."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sampler: PairedCropSampler
    noise: dict[str, Any]
    device: torch.device
    seed: int

    def step(self, it: int, batch: int, crop: int, lr: float) -> torch.Tensor:
        """Iteration ``it``: speckle clean crops, learn to restore them; the MSE."""
        clean = self.sampler.batch(range(it * batch, (it + 1) * batch), crop)["clean"].numpy()
        noisy = add_speckle(clean, rng=np.random.default_rng([self.seed, 1, it]), **self.noise)
        set_lr([self.opt], lr)
        x = torch.from_numpy(noisy).to(self.device)
        y = torch.from_numpy(clean).to(self.device)
        loss = nn.functional.mse_loss(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def parts(self) -> dict[str, Stateful]:
        """What the resume state holds, by key."""
        return {"model": self.model, "optimizer": self.opt}


def _train(trainer: _Trainer, tcfg: Mapping[str, Any], run: RunFolder, progress: bool) -> None:
    """The loop: from the restored iteration to ``stop_at`` or the end, logging and saving."""
    start = run.resume(trainer.parts())
    total, batch, crop = int(tcfg["iterations"]), int(tcfg["batch_size"]), int(tcfg["crop"])
    decay_start = float(tcfg.get("decay_start", 1.0)) * total
    stop = stop_iteration(total, tcfg.get("stop_at"))
    log = run.logs["log.csv"]
    trainer.model.train()
    t0 = time.perf_counter()
    bar = progress_bar(start, stop, total, f"despeckle {trainer.name}", progress)
    for it in bar:
        lr = float(tcfg["lr"]) * linear_decay(it, decay_start, total)
        loss = trainer.step(it, batch, crop, lr)
        done = it + 1
        if done % int(tcfg["log_every"]) == 0 or done == total:
            seconds = time.perf_counter() - t0
            log.write({"iteration": done, "loss": loss.item(), "lr": lr, "seconds": seconds})
            bar.set_postfix(loss=f"{loss.item():.2e}")
        if done % int(tcfg["checkpoint_every"]) == 0 or done == stop:
            run.save(done, trainer.parts())


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
    tcfg = config["train"]
    seed = int(config["seed"])
    device = torch.device(config.get("device", "cpu"))
    seed_everything(seed, config.get("threads"))
    model = _build(variant)
    if tcfg.get("init_identity", True):
        init_identity(model)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]))
    sampler = PairedCropSampler(
        regions, "reflectance", seed=seed, min_tissue=float(config["data"]["min_tissue"])
    )
    noise = speckle_kwargs(variant["noise"])
    trainer = _Trainer(variant["name"], model, opt, sampler, noise, device, seed)
    _train(trainer, tcfg, RunFolder(out_dir, {"log.csv": LOG_FIELDS}, resume=resume), progress)
    model.eval()
    model.clamp_output = True
    model.config["clamp_output"] = True
    return model


def _sample_png(
    path: Path, model: nn.Module, clean: np.ndarray, noise: Mapping[str, Any], config: Mapping
) -> None:
    """clean | noisy | output | output + median, side by side."""
    noisy = speckled(clean, noise, int(config["seed"]), 0)
    out = denoise(model, noisy)
    median = int(config["median"])
    med = median_filter(out, size=median) if median > 1 else out
    save_png(path, np.concatenate([clean, noisy, out, med], axis=1))


def _finish_variant(
    variant: Mapping[str, Any],
    model: nn.Module,
    config: Mapping[str, Any],
    sets: Mapping[str, list[np.ndarray]],
    vdir: Path,
) -> list[dict[str, Any]]:
    """Score a trained variant, write its checkpoint and sample; its rows of the table."""
    dcfg = config["data"]
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
        "data": [str(p) for p in dcfg["he"]],
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
        training=portable_record(training),
    )
    first = next(iter(sets.values()))
    if first:
        _sample_png(vdir / "sample.png", model, first[0], variant["noise"], config)
    described = {
        "variant": variant["name"],
        "model": variant["model"],
        "skip": cfg["skip"],
        "M": cfg["layers"],
        "K": cfg["filters"],
        "N": cfg["kernel"],
        "noise": variant["noise"].get("model", "gamma"),
        "param": _noise_param(variant["noise"]),
    }
    return [{**described, "eval_set": name, **m} for name, m in metrics_by_set.items()]


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
        The table rows (none when ``train.stop_at`` ends the run early: the variants are
        scored once it is resumed to its end).
    """
    out = Path(config["out"])
    write_config(out, config)
    dcfg = config["data"]
    regions = split_regions(dcfg)
    train_regions = regions_in(regions, dcfg["train_splits"])
    held = regions_in(regions, dcfg["eval_splits"])
    check_disjoint({"training": train_regions, "evaluation": held})
    sets = despeckle_eval_sets(
        held,
        int(dcfg["eval_tile"]),
        int(dcfg["eval_tiles"]),
        float(dcfg["eval_min_tissue"]),
        dcfg.get("extra_eval") or [],
    )
    stop_at = config["train"].get("stop_at")
    stopped = bool(stop_at) and int(stop_at) < int(config["train"]["iterations"])
    rows: list[dict[str, Any]] = []
    for variant in config["variants"]:
        vdir = out / variant["name"]
        model = train_variant(
            variant, config, train_regions, vdir, resume=resume, progress=progress
        )
        if not stopped:
            rows += _finish_variant(variant, model, config, sets, vdir)
    if not stopped:
        write_table(
            rows,
            out / "table.csv",
            out / "table.md",
            TABLE_COLUMNS,
            title="Despeckling: PSNR (dB) and SSIM, noisy input vs output",
        )
    return rows
