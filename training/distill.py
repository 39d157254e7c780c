"""Distil a stain generator into a light student (issue 8): ``python -m training distill``.

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
``default_rng([seed, i])`` so ``--resume`` continues exactly.

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

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from napari_confocal_stain.inference import load_model, select_device, stain_region
from napari_confocal_stain.models import build_model, save_checkpoint
from napari_confocal_stain.models.flops import flops_per_pixel
from napari_confocal_stain.models.registry import DSCM_INPUT
from training.cyclegan import _grid_png, make_validation_set, validate
from training.data import RandomFlip, TissueRegion, dscm_tensor, load_he_regions, pseudo_confocal
from training.evaluate import run_generator
from training.runstate import (
    CsvLog,
    load_state,
    portable_paths,
    save_state,
    seed_everything,
    write_atomic,
)
from training.structure import hematoxylin_loss

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
        "he": ["${NCS_DATA}/he/cmu_small_region.svs"],
        "pixel_size_um": None,
        "bands": 6,
        "order": ["source", "target", "heldout"],
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
VAL_FIELDS = (
    "iteration",
    "model",
    "tiles",
    "ssim_truth",
    "lbp_chi2_truth",
    "ssim_input",
    "lbp_chi2_input",
    "nuclei_f",
    "nuclei_output",
    "nuclei_matched",
    "nuclei_preserved",
    "nuclei_invented",
)


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

    def __init__(self, region: TissueRegion, dscm: np.ndarray, f: np.ndarray, label: np.ndarray):
        self.region, self.dscm, self.f, self.label = region, dscm, f, label


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
    return {
        k: torch.from_numpy(np.ascontiguousarray(np.stack(v), dtype=np.float32))
        for k, v in (("dscm", dscm), ("f", f), ("label", label))
    }


def _lr(sched: Mapping[str, Any], it: int, lr0: float) -> float:
    start, total = int(sched["decay_start"]), int(sched["iterations"])
    if it < start or total <= start:
        return lr0
    return lr0 * max(0.0, 1.0 - (it - start) / float(total - start))


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
    out = Path(config["out"])
    state_path = out / "state.safetensors"
    if state_path.exists() and not resume:
        raise FileExistsError(
            f"{out} already holds a run (state.safetensors); pass --resume to continue it or "
            f"choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(config, indent=2, default=str))
    seed = int(config["seed"])
    seed_everything(seed, config.get("threads"))
    device = select_device(config.get("device", "auto"), fallback=True)
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
    lr0 = float(config["optim"]["lr"])
    opt = torch.optim.Adam(student.parameters(), lr=lr0, betas=tuple(config["optim"]["betas"]))
    log = CsvLog(out / "log.csv", LOG_FIELDS)
    val_log = CsvLog(out / "val.csv", VAL_FIELDS)
    start = 0
    if resume and state_path.is_file():
        st = load_state(state_path)
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["opt"])
        start = int(st["iteration"])
        log.truncate_from("iteration", start + 1)
        val_log.truncate_from("iteration", start + 1)
    else:
        for p in (out / "log.csv", out / "val.csv"):
            p.unlink(missing_ok=True)

    d = config["data"]
    regions = load_he_regions(
        d["he"], bands=int(d["bands"]), order=d["order"], pixel_size_um=d.get("pixel_size_um")
    )
    train = [r for s in d["train_splits"] for r in regions[s]]
    held = [r for s in d["val_splits"] for r in regions[s]]
    if {(r.slide, r.box) for r in train} & {(r.slide, r.box) for r in held}:
        raise ValueError("distill: training and validation regions overlap")
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
    if start == 0 and len(val):
        for name, model in (("linear-stain (input)", None), ("teacher", teacher)):
            val_log.write({"iteration": 0, "model": name, **validate(model, val)})

    sched, lam = config["schedule"], config["loss"]
    total, batch = int(sched["iterations"]), int(sched["batch_size"])
    stop = min(total, int(config.get("stop_at") or total))
    lam_l1, lam_hema = float(lam.get("lambda_l1", 1.0)), float(lam.get("lambda_hema", 0.0))
    window = int(lam.get("hema_window", 15))
    student.train()
    last_val: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, stop), desc="distill", initial=start, total=total, disable=not progress
    )
    for it in bar:
        lr = _lr(sched, it, lr0)
        for group in opt.param_groups:
            group["lr"] = lr
        b = sample_batch(
            items, range(it * batch, (it + 1) * batch), crop, seed, float(d["min_tissue"])
        )
        x, target = b["dscm"].to(device), b["label"].to(device)
        y = student(x)
        l1 = nn.functional.l1_loss(y, target)
        hema = hematoxylin_loss(y, b["f"].to(device), window=window) if lam_hema > 0 else None
        loss = lam_l1 * l1 + (lam_hema * hema if hema is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at iteration {done}: {values}")
            log.write(values)
            bar.set_postfix(l1=f"{values['l1']:.4f}", hema=f"{values['hema']:.3f}")
        if (done % int(config["val_every"]) == 0 or done == total) and len(val):
            last_val = validate(student, val)
            val_log.write({"iteration": done, "model": "student", **last_val})
            student.train()
        if done % int(config["checkpoint_every"]) == 0 or done == stop:
            save_state(
                state_path,
                {"iteration": done, "student": student.state_dict(), "opt": opt.state_dict()},
            )
    if stop < total:
        return {"iteration": stop, "stopped": True, "checkpoint": None, "val": last_val}
    student.eval()
    if len(val):
        rows = []
        for k in range(min(4, len(val))):
            xk = val.dscm[k]
            row = [(xk.transpose(1, 2, 0) + 1) / 2, run_generator(teacher, xk)]
            row.append(run_generator(student, xk))
            if val.truth is not None:
                row.append(val.truth[k])
            rows.append(row)
        _grid_png(out / "sample.png", rows)
    training = {
        "recipe": "distillation: L1 to the teacher's output (+ hematoxylin-F correlation loss) "
        "on pseudo-confocal DSCM crops",
        "teacher": str(config["teacher"]),
        "iteration": total,
        "schedule": dict(sched),
        "loss": dict(lam),
        "optim": dict(config["optim"]),
        "seed": seed,
        "student": dict(st_cfg),
        "flops_ratio_to_teacher": flops_ratio,
        "data": {k: d.get(k) for k in ("he", "bands", "order", "train_splits", "val_splits")},
        "val": dict(last_val),
    }
    ckpt = save_checkpoint(
        out / "student.safetensors",
        student,
        architecture=st_cfg["name"],
        normalization=dict(DSCM_INPUT),
        training=portable_paths(json.loads(json.dumps(training, default=str))),
    )
    return {
        "iteration": total,
        "checkpoint": str(ckpt),
        "val": last_val,
        "flops_ratio": flops_ratio,
    }
