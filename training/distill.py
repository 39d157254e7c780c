"""``python -m training distill``: distil a stain generator into a light student.

The teacher (a trained stain model, by default the bundled ``stain-unet``) stains the
pseudo-confocal DSCM of the *training* regions (never the held-out ones) once, whole, through
the plugin's engine (:func:`~napari_confocal_stain.inference.stain_region`, seamless
strategy): its labels are exactly what the viewer would show. ``label_realizations`` speckle
draws per region are labelled. The student (default: the registry's ``light`` architecture,
:class:`~napari_confocal_stain.models.light.LightGenerator`) then learns on random crops of
those (input, label) pairs to reproduce the teacher:

``loss = L1(student(x), teacher(x)) + λ_hema · hematoxylin_loss(student(x), F)``

The optional second term (:func:`training.structure.hematoxylin_loss`) ties the student's
hematoxylin to the input's nuclear signal, so the student may keep nuclei the teacher drops
(structure-preserving distillation). Adam, learning rate constant then linearly decayed to 0,
random tissue crops with flips / 90° turns; sample ``i`` is drawn from
``default_rng([seed, i])`` so ``--resume`` continues exactly
(:class:`training.runstate.RunFolder`).

Labelling whole regions once instead of every crop on the fly makes the teacher's cost
negligible (a 120 kFLOP/px teacher would otherwise cost 10× the student's training step) and
trains the student against the teacher as deployed — seamless windowed normalisation, not the
statistics of a small crop. The student's crops are its own instance-norm context, as in any
training; at inference the engine gives both the same windowed statistics.

Outputs in ``out``: ``config.json``, ``log.csv``, ``val.csv`` (held-out metrics of the student,
and of the teacher and the linear stain as references), ``sample.png``, ``state.safetensors``
(resume) and ``student.safetensors`` (a plugin checkpoint: ``load_model(out /
"student.safetensors")``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.inference import load_model, stain_region
from napari_confocal_stain.models import build_model, save_checkpoint
from napari_confocal_stain.models.flops import flops_per_pixel
from napari_confocal_stain.models.registry import DSCM_INPUT
from training.config import portable_record
from training.data import (
    RandomFlip,
    TissueRegion,
    band_split_defaults,
    check_disjoint,
    dscm_tensor,
    pseudo_confocal,
    regions_in,
    split_regions,
    stack_batch,
)
from training.images import grid_png
from training.loop import check_finite, linear_decay, progress_bar, set_lr, stop_iteration
from training.runstate import RunFolder, Stateful, start_run
from training.structure import hematoxylin_loss
from training.validation import (
    INPUT_ROW,
    STAIN_METRICS,
    ValidationSet,
    make_validation_set,
    sample_rows,
    validate,
)

__all__ = ["DEFAULTS", "LabelledRegion", "label_regions", "run_distill", "sample_batch"]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "threads": None,
    "out": "runs/distill",
    "teacher": "stain-unet",
    "label_realizations": 2,
    "label_tile": 512,
    "student": {"name": "light", "kwargs": {}},
    "loss": {"lambda_l1": 1.0, "lambda_hema": 0.5, "hema_window": 15},
    "optim": {"lr": 2e-3, "betas": [0.9, 0.999]},
    "schedule": {"iterations": 2000, "decay_start": 1000, "crop": 256, "batch_size": 4},
    "data": {
        **band_split_defaults(),
        "train_splits": ["source", "target"],
        "val_splits": ["heldout"],
        "min_tissue": 0.3,
        "speckle": {"model": "gaussian", "sigma": 0.2},
        "val_tile": 256,
        "val_tiles": 12,
        "val_min_tissue": 0.5,
    },
    "log_every": 10,
    "val_every": 500,
    "checkpoint_every": 100,
    "stop_at": None,
}

LOG_FIELDS = ("iteration", "lr", "loss", "l1", "hema", "seconds")
VAL_FIELDS = ("iteration", "model", *STAIN_METRICS)


@dataclass
class LabelledRegion:
    """A training region's pseudo-confocal input and the teacher's output on it.

    Attributes
    ----------
    region
        The source :class:`~training.data.TissueRegion` (tissue mask, crop origins).
    dscm
        ``(H, W, 3)`` DSCM in [-1, 1].
    f
        ``(H, W)`` nuclear signal in [0, 1].
    label
        ``(H, W, 3)`` teacher output in [-1, 1].
    """

    region: TissueRegion
    dscm: np.ndarray
    f: np.ndarray
    label: np.ndarray


def label_regions(
    teacher: nn.Module,
    regions: list[TissueRegion],
    *,
    realizations: int = 2,
    speckle: Mapping[str, Any] | None = None,
    seed: int = 0,
    tile: int = 512,
    device: torch.device | str = "cpu",
) -> list[LabelledRegion]:
    """Stain every region (``realizations`` speckle draws each) with the teacher, seamlessly.

    Draw ``k`` of region ``i`` uses ``default_rng([seed, 5, i, k])``.
    """
    out = []
    for i, region in enumerate(regions):
        if region.rgb is None:
            raise ValueError(f"distill: region {region.slide} {region.box} holds no H&E")
        for k in range(int(realizations)):
            rng = np.random.default_rng([seed, 5, i, k])
            r, f = pseudo_confocal(region.rgb, region.hed_scale, rng, speckle=speckle)
            dscm = dscm_tensor(r, f).transpose(1, 2, 0)
            label = stain_region(
                (dscm + 1.0) / 2.0,
                teacher,
                strategy="seamless",
                tile=tile,
                device=device,
                precision="fp32",
            )
            out.append(LabelledRegion(region, dscm, f, label * 2.0 - 1.0))
    return out


def sample_batch(
    items: list[LabelledRegion],
    indices: range,
    size: int,
    seed: int,
    min_tissue: float,
) -> dict[str, torch.Tensor]:
    """Crops ``(B, C, size, size)``: ``dscm``, ``f`` and ``label``, one per sample index.

    Sample ``i`` uses ``default_rng([seed, i])``: an item weighted by its number of valid
    tissue crops, a position, and the same flips / 90° turn for the three arrays.
    """
    counts = np.array([len(it.region.origins(size, min_tissue)) for it in items], float)
    if counts.sum() == 0:
        raise ValueError(f"distill: no {size}² crop has ≥ {min_tissue:.0%} tissue")
    flip = RandomFlip(rotate=True)
    dscm, f, label = [], [], []
    for i in indices:
        rng = np.random.default_rng([seed, int(i)])
        it = items[int(rng.choice(len(items), p=counts / counts.sum()))]
        origins = it.region.origins(size, min_tissue)
        y, x = (int(v) for v in origins[int(rng.integers(len(origins)))])
        s = np.s_[y : y + size, x : x + size]
        a, b, c = flip([it.dscm[s], it.f[s], it.label[s]], rng)
        dscm.append(a.transpose(2, 0, 1))
        f.append(b[None])
        label.append(c.transpose(2, 0, 1))
    return stack_batch({"dscm": dscm, "f": f, "label": label})


@dataclass
class _Distiller:
    """Teacher, student and the student's optimiser."""

    teacher: nn.Module
    student: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    flops_ratio: float
    """Student ÷ teacher FLOPs per pixel."""

    def parts(self) -> dict[str, Stateful]:
        """What the resume state holds, by key."""
        return {"student": self.student, "opt": self.opt}


def _build(config: Mapping[str, Any], device: torch.device) -> _Distiller:
    """The frozen teacher, a fresh student whose crops both models accept, and Adam."""
    teacher = load_model(config["teacher"], device=device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    st_cfg = config["student"]
    student = build_model(st_cfg["name"], **st_cfg.get("kwargs", {})).to(device)
    mult = max(int(getattr(m, "size_multiple", 1)) for m in (teacher, student))
    crop = int(config["schedule"]["crop"])
    if crop % mult:
        raise ValueError(f"schedule.crop {crop} must be a multiple of {mult}")
    probe = (3, max(crop, 2 * mult), max(crop, 2 * mult))
    flops_ratio = flops_per_pixel(student, probe) / flops_per_pixel(teacher, probe)
    opt = torch.optim.Adam(
        student.parameters(),
        lr=float(config["optim"]["lr"]),
        betas=tuple(config["optim"]["betas"]),
    )
    return _Distiller(teacher, student, opt, device, flops_ratio)


def _labelled_data(
    config: Mapping[str, Any], teacher: nn.Module, seed: int, device: torch.device
) -> tuple[list[LabelledRegion], ValidationSet]:
    """The teacher-labelled training regions and the held-out validation tiles."""
    d = config["data"]
    regions = split_regions(d)
    train = regions_in(regions, d["train_splits"])
    held = regions_in(regions, d["val_splits"])
    check_disjoint({"training": train, "validation": held})
    items = label_regions(
        teacher,
        train,
        realizations=int(config.get("label_realizations", 2)),
        speckle=d.get("speckle"),
        seed=seed,
        tile=int(config.get("label_tile", 512)),
        device=device,
    )
    val = make_validation_set(
        held,
        int(d["val_tile"]),
        int(d["val_tiles"]),
        min_tissue=float(d["val_min_tissue"]),
        speckle=d.get("speckle"),
        seed=seed,
    )
    return items, val


def _train(
    model: _Distiller,
    items: list[LabelledRegion],
    val: ValidationSet,
    config: Mapping[str, Any],
    run: RunFolder,
    start: int,
    progress: bool,
) -> tuple[int, dict[str, Any]]:
    """Iterations ``start`` … ``stop_at`` or the end; the last one done and validation."""
    sched, lam = config["schedule"], config["loss"]
    seed, lr0, crop = int(config["seed"]), float(config["optim"]["lr"]), int(sched["crop"])
    total, batch = int(sched["iterations"]), int(sched["batch_size"])
    stop = stop_iteration(total, config.get("stop_at"))
    lam_l1, lam_hema = float(lam.get("lambda_l1", 1.0)), float(lam.get("lambda_hema", 0.0))
    window = int(lam.get("hema_window", 15))
    student, device = model.student, model.device
    student.train()
    last_val: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = progress_bar(start, stop, total, "distill", progress)
    for it in bar:
        lr = lr0 * linear_decay(it, int(sched["decay_start"]), total, extra=0.0)
        set_lr([model.opt], lr)
        idx = range(it * batch, (it + 1) * batch)
        b = sample_batch(items, idx, crop, seed, float(config["data"]["min_tissue"]))
        y = student(b["dscm"].to(device))
        l1 = nn.functional.l1_loss(y, b["label"].to(device))
        hema = hematoxylin_loss(y, b["f"].to(device), window=window) if lam_hema > 0 else None
        loss = lam_l1 * l1 + (lam_hema * hema if hema is not None else 0.0)
        model.opt.zero_grad(set_to_none=True)
        loss.backward()
        model.opt.step()
        done = it + 1
        if done % int(config["log_every"]) == 0 or done == stop:
            values = {
                "iteration": done,
                "lr": lr,
                "loss": float(loss.item()),
                "l1": float(l1.item()),
                "hema": float(hema.item()) if hema is not None else 0.0,
                "seconds": time.perf_counter() - t0,
            }
            check_finite(values, done)
            run.logs["log.csv"].write(values)
            bar.set_postfix(l1=f"{values['l1']:.4f}", hema=f"{values['hema']:.3f}")
        if (done % int(config["val_every"]) == 0 or done == total) and len(val):
            last_val = validate(student, val)
            run.logs["val.csv"].write({"iteration": done, "model": "student", **last_val})
        if done % int(config["checkpoint_every"]) == 0 or done == stop:
            run.save(done, model.parts())
    return stop, last_val


def _export(
    model: _Distiller, config: Mapping[str, Any], out: Path, val: Mapping[str, Any]
) -> Path:
    """Write the student as a plugin checkpoint (architecture, kwargs, recipe, metrics)."""
    d, st_cfg = config["data"], config["student"]
    training = {
        "recipe": "distillation: L1 to the teacher's output (+ hematoxylin-F correlation loss) "
        "on pseudo-confocal DSCM crops",
        "teacher": str(config["teacher"]),
        "iteration": int(config["schedule"]["iterations"]),
        "schedule": dict(config["schedule"]),
        "loss": dict(config["loss"]),
        "optim": dict(config["optim"]),
        "seed": int(config["seed"]),
        "student": dict(st_cfg),
        "flops_ratio_to_teacher": model.flops_ratio,
        "data": {k: d.get(k) for k in ("he", "bands", "order", "train_splits", "val_splits")},
        "val": dict(val),
    }
    return save_checkpoint(
        out / "student.safetensors",
        model.student,
        architecture=st_cfg["name"],
        normalization=dict(DSCM_INPUT),
        training=portable_record(training),
    )


def run_distill(
    config: Mapping[str, Any], *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Distil ``config["teacher"]`` into ``config["student"]`` (see the module docstring).

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
        ``{"iteration", "checkpoint", "val", "flops_ratio"}`` (student ÷ teacher FLOPs/px).
    """
    logs = {"log.csv": LOG_FIELDS, "val.csv": VAL_FIELDS}
    run, device = start_run(config, logs, resume=resume)
    model = _build(config, device)
    start = run.resume(model.parts())
    items, val = _labelled_data(config, model.teacher, int(config["seed"]), device)
    if start == 0 and len(val):
        for name, reference in ((INPUT_ROW, None), ("teacher", model.teacher)):
            run.logs["val.csv"].write({"iteration": 0, "model": name, **validate(reference, val)})
    stop, last_val = _train(model, items, val, config, run, start, progress)
    total = int(config["schedule"]["iterations"])
    if stop < total:
        return {"iteration": stop, "stopped": True, "checkpoint": None, "val": last_val}
    model.student.eval()
    if len(val):
        grid_png(run.out / "sample.png", sample_rows(val, [model.teacher, model.student], 4))
    ckpt = _export(model, config, run.out, last_val)
    return {
        "iteration": total,
        "checkpoint": str(ckpt),
        "val": last_val,
        "flops_ratio": model.flops_ratio,
    }
