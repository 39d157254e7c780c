"""``python -m training cyclegan``: linear stain (DSCM) ↔ H&E, unpaired CycleGAN (thesis §3.3).

Faithful to the published recipe (Combalia §2.2; see ``docs/training.md``):

* two generators ``G_AB`` (DSCM → H&E, the one the plugin ships) and ``G_BA`` (H&E → DSCM),
  any registered architecture (``unet``, ``unet-light``, ``resnet``, ``affine`` — the affine
  generator starts at the identity on DSCM, i.e. exactly at Gareau's linear stain);
* two PatchGAN discriminators, ``D_B`` (real H&E vs ``G_AB`` output) and ``D_A``;
* LSGAN losses (MSE to 1 for real, 0 for fake; Mao et al. 2017), cycle L1 × λ_cycle = 10,
  identity L1 × λ_identity = 5 (CycleGAN's ``lambda_identity 0.5 × lambda 10``);
* Adam, lr 2e-4, β = (0.5, 0.999); the discriminators see a pool of the last 50 generated
  images (Shrivastava et al. 2017; half the time a stored one); the discriminator loss is
  halved (CycleGAN);
* learning rate constant, then linearly decayed to 0 (CycleGAN's ``linear`` policy);
* crop size schedule (Combalia: 256² for 50 epochs, then 512²); the image pools are emptied
  when the crop size changes (their images no longer stack with the new crops);
* mixed precision (autocast fp16 + GradScaler) on CUDA by default; ``amp: "bf16"`` runs
  bf16 autocast (+ GradScaler) on any device, the CPU included (this is how the tests exercise
  the mixed-precision path without a GPU); otherwise fp32.

Structure-preserving options (all off by default, so the default *is* the recipe; their
comparison is in ``docs/training.md``, "Keeping nuclei"):

* ``loss.lambda_hema`` — weight of :func:`training.structure.hematoxylin_loss` on ``G_AB``'s
  output: the local contrast of its hematoxylin density (differentiable colour deconvolution)
  must correlate with the input's nuclear signal F;
* ``discriminator.conditional`` — ``D_B`` sees the input and the output together (6 channels):
  fake pairs ``(A, G_AB(A))`` against real pairs ``(G_BA(B), B)``, so the discriminator judges
  whether the H&E *belongs to* its DSCM, not only whether it looks like H&E;
* higher ``loss.lambda_cycle`` / ``loss.lambda_identity`` (the thesis's §6.1 suggestion);
* ``init_from`` — start the networks from another run's ``state.safetensors`` (optimizers,
  pools and iteration start fresh): fine-tune a trained model with one option switched on,
  against a control fine-tuned without it for the same iterations.

An "epoch" is ``iters_per_epoch`` iterations of random tissue crops. Sample ``i`` of a run
is drawn from ``default_rng([seed, i])`` (see :mod:`training.data`), so a run resumed from
its last state continues exactly as the uninterrupted run would have
(:class:`training.runstate.RunFolder`).

Outputs in ``out``: ``config.json``, ``log.csv`` (losses every ``log_every`` iterations),
``val.csv`` (per epoch: SSIM / LBP χ² against the input and the true H&E, nuclei
preservation — plus reference rows for the linear stain itself and the true H&E),
``samples/epoch_NNN.png``, ``state.safetensors`` (resume) and ``G_AB.safetensors`` (a plugin
checkpoint: ``load_model(out / "G_AB.safetensors")``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.models import build_model, save_checkpoint
from napari_confocal_stain.models.registry import DSCM_INPUT
from training.config import portable_record
from training.crops import load_crop_regions
from training.data import (
    PairedCropSampler,
    TissueRegion,
    band_split_defaults,
    check_disjoint,
    regions_in,
    split_regions,
)
from training.images import grid_png, tensor_image
from training.loop import check_finite, linear_decay, progress_bar, set_lr, stop_iteration
from training.runstate import RunFolder, Stateful, load_state, start_run
from training.structure import hematoxylin_loss
from training.validation import (
    INPUT_ROW,
    STAIN_METRICS,
    TRUTH_ROW,
    ValidationSet,
    make_validation_set,
    sample_rows,
    truth_reference,
    validate,
)

__all__ = [
    "DEFAULTS",
    "CycleGAN",
    "ImagePool",
    "amp_dtype",
    "crop_size_at",
    "lr_factor",
    "run_cyclegan",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "threads": None,
    "amp": "auto",
    "out": "runs/cyclegan",
    "generator": {"name": "unet", "kwargs": {"base_filters": 64, "n_down": 3}},
    "discriminator": {
        "name": "patchgan",
        "kwargs": {"base_filters": 64, "n_layers": 3},
        "conditional": False,
    },
    "loss": {
        "lambda_cycle": 10.0,
        "lambda_identity": 5.0,
        "lambda_hema": 0.0,
        "hema_window": 15,
    },
    "init_from": None,
    "optim": {"lr": 2e-4, "betas": [0.5, 0.999]},
    "schedule": {
        "epochs": 100,
        "iters_per_epoch": 1000,
        "decay_start": 50,
        "crops": [[0, 256], [50, 512]],
        "batch_size": 1,
    },
    "pool_size": 50,
    "data": {
        **band_split_defaults(),
        "source_splits": ["source"],
        "target_splits": ["target"],
        "val_splits": ["heldout"],
        "cm_crops": None,
        "he_crops": None,
        "min_tissue": 0.3,
        "speckle": {"model": "gaussian", "sigma": 0.2},
        "val_tile": 256,
        "val_tiles": 16,
        "val_min_tissue": 0.5,
    },
    "log_every": 10,
    "checkpoint_every": 100,
    "sample_tiles": 4,
    "stop_at": None,
}

LOG_FIELDS = (
    "iteration",
    "epoch",
    "crop",
    "lr",
    "loss_G",
    "gan_AB",
    "gan_BA",
    "cycle_A",
    "cycle_B",
    "idt_A",
    "idt_B",
    "hema",
    "loss_D_A",
    "loss_D_B",
    "seconds",
)
VAL_FIELDS = ("epoch", "iteration", "model", *STAIN_METRICS)


# ------------------------------------------------------------------------------ schedules


def crop_size_at(schedule: Mapping[str, Any], epoch: int) -> int:
    """Crop side for ``epoch``: the last ``[from_epoch, size]`` entry with from ≤ epoch."""
    size = None
    for start, s in sorted(schedule["crops"]):
        if epoch >= start:
            size = int(s)
    if size is None:
        raise ValueError(f"crop schedule {schedule['crops']} does not cover epoch {epoch}")
    return size


def lr_factor(schedule: Mapping[str, Any], epoch_float: float) -> float:
    """CycleGAN's linear policy: 1 until ``decay_start``, then linearly to 0 at ``epochs``.

    ``1 − max(0, e − decay_start) / (epochs − decay_start + 1)`` with fractional epochs ``e``
    (per iteration rather than per epoch: the same line, without steps).
    """
    return linear_decay(epoch_float, float(schedule["decay_start"]), float(schedule["epochs"]))


# ------------------------------------------------------------------------------ image pool


class ImagePool:
    """CycleGAN's history of generated images for the discriminator (size 0: no pool).

    ``query`` returns, per image of the batch: the image itself while the pool fills; once
    full, with probability ½ a random stored image (replaced by the new one), else the new
    image.

    Parameters
    ----------
    size
        Capacity.
    device
        Where restored images go.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.size = int(size)
        self.device = device
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Images (``(B, C, H, W)``, detached) for the discriminator."""
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif rng.random() > 0.5:
                k = int(rng.integers(self.size))
                out.append(self.images[k].clone())
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.cat(out, 0)

    def state_dict(self) -> list[torch.Tensor]:
        """The stored images (for the resume state)."""
        return [t.cpu() for t in self.images]

    def load_state_dict(self, images: Sequence[torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.images = [t.to(self.device) for t in images]


# -------------------------------------------------------------------------------- networks


def amp_dtype(amp: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the ``amp`` setting on ``device`` (None: fp32).

    ``"auto"``: fp16 on CUDA, else fp32; ``true`` / ``"fp16"``: fp16 (CUDA only — fp16 autocast
    on the CPU is slow and poorly covered); ``"bf16"``: bf16 on any device with autocast;
    ``false`` / ``"fp32"``: fp32.
    """
    if amp in (False, None, "fp32", "false"):
        return None
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp in (True, "fp16", "true"):
        if device.type != "cuda":
            raise ValueError(
                f"amp={amp!r} (fp16) needs a CUDA device; use amp='bf16' for mixed precision "
                f"on {device.type}, or amp=false"
            )
        return torch.float16
    if amp == "bf16":
        if not torch.amp.is_autocast_available(device.type):
            raise ValueError(f"amp='bf16': no autocast on {device.type}")
        return torch.bfloat16
    raise ValueError(f"amp must be 'auto', true/'fp16', 'bf16' or false/'fp32', got {amp!r}")


def _init_from(path: str | Path, nets: Mapping[str, nn.Module], device: torch.device) -> list[str]:
    """Load the networks of another run's state file; returns the names loaded.

    A network whose shapes differ (e.g. a conditional ``D_B`` with 6 input channels) keeps its
    fresh initialisation; that is printed, not an error.
    """
    st = load_state(Path(path))
    loaded = []
    for key, net in nets.items():
        sd = st.get(key)
        if sd is None:
            continue
        mine = net.state_dict()
        if set(sd) == set(mine) and all(sd[k].shape == mine[k].shape for k in mine):
            net.load_state_dict({k: v.to(device) for k, v in sd.items()})
            loaded.append(key)
    fresh = [k for k in nets if k not in loaded]
    if fresh:
        print(
            f"init_from {path}: {', '.join(fresh)} start fresh (not in the file or shapes differ)"
        )
    return loaded


def _set_requires_grad(nets: Sequence[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device)


@dataclass
class CycleGAN:
    """The four networks of a run, their optimisers, GradScaler, image pools and loss weights.

    :meth:`step` is one iteration of the recipe; :meth:`parts` is what its resume state holds.
    """

    G_AB: nn.Module
    G_BA: nn.Module
    D_A: nn.Module
    D_B: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pool_A: ImagePool
    pool_B: ImagePool
    loss: Mapping[str, Any]
    conditional: bool
    device: torch.device
    amp: torch.dtype | None

    def nets(self) -> dict[str, nn.Module]:
        """The networks by their state names."""
        return {"G_AB": self.G_AB, "G_BA": self.G_BA, "D_A": self.D_A, "D_B": self.D_B}

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward passes when ``amp`` is on (see :func:`amp_dtype`)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def _generators_step(
        self, real_A: torch.Tensor, real_B: torch.Tensor, f: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Generators: fool the (frozen) discriminators, cycle back, keep identity."""
        l1, mse = nn.functional.l1_loss, nn.functional.mse_loss
        lam_cycle, lam_idt = float(self.loss["lambda_cycle"]), float(self.loss["lambda_identity"])
        lam_hema = float(self.loss.get("lambda_hema", 0.0))
        _set_requires_grad([self.D_A, self.D_B], False)
        with self.autocast():
            fake_B = self.G_AB(real_A)
            rec_A = self.G_BA(fake_B)
            fake_A = self.G_BA(real_B)
            rec_B = self.G_AB(fake_A)
            pred_fb = self.D_B(torch.cat([real_A, fake_B], 1) if self.conditional else fake_B)
            pred_fa = self.D_A(fake_A)
            gan_AB = mse(pred_fb, torch.ones_like(pred_fb))
            gan_BA = mse(pred_fa, torch.ones_like(pred_fa))
            cyc_A = l1(rec_A, real_A) * lam_cycle
            cyc_B = l1(rec_B, real_B) * lam_cycle
            if lam_idt > 0:
                idt_A = l1(self.G_AB(real_B), real_B) * lam_idt
                idt_B = l1(self.G_BA(real_A), real_A) * lam_idt
            else:
                idt_A = idt_B = _zero(self.device)
            if lam_hema > 0:
                window = int(self.loss.get("hema_window", 15))
                hema = lam_hema * hematoxylin_loss(fake_B, f.to(self.device), window=window)
            else:
                hema = _zero(self.device)
            loss_G = gan_AB + gan_BA + cyc_A + cyc_B + idt_A + idt_B + hema
        self.opt_G.zero_grad(set_to_none=True)
        self.scaler.scale(loss_G).backward()
        self.scaler.step(self.opt_G)
        losses = {
            "loss_G": loss_G,
            "gan_AB": gan_AB,
            "gan_BA": gan_BA,
            "cycle_A": cyc_A,
            "cycle_B": cyc_B,
            "idt_A": idt_A,
            "idt_B": idt_B,
            "hema": hema,
        }
        return (real_A, fake_B, rec_A, real_B, fake_A, rec_B), losses

    def _discriminators_step(
        self, images: tuple[torch.Tensor, ...], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """Discriminators: real → 1, (pooled) fake → 0, loss halved."""
        mse = nn.functional.mse_loss
        real_A, fake_B, _, real_B, fake_A, _ = images
        _set_requires_grad([self.D_A, self.D_B], True)
        if self.conditional:
            # Real pairs: (G_BA(B), B) — the DSCM that H&E "came from" by the other generator.
            pooled_B = self.pool_B.query(torch.cat([real_A, fake_B.float()], 1), rng)
            real_pair_B = torch.cat([fake_A.detach().float(), real_B], 1)
        else:
            pooled_B = self.pool_B.query(fake_B.float(), rng)
            real_pair_B = real_B
        pooled_A = self.pool_A.query(fake_A.float(), rng)
        with self.autocast():
            pr, pf = self.D_B(real_pair_B), self.D_B(pooled_B)
            loss_D_B = 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
            pr, pf = self.D_A(real_A), self.D_A(pooled_A)
            loss_D_A = 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
        self.opt_D.zero_grad(set_to_none=True)
        self.scaler.scale(loss_D_A + loss_D_B).backward()
        self.scaler.step(self.opt_D)
        self.scaler.update()
        return {"loss_D_A": loss_D_A, "loss_D_B": loss_D_B}

    def step(
        self, real_A: torch.Tensor, real_B: torch.Tensor, f: torch.Tensor, rng: np.random.Generator
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """One iteration on a batch of DSCM ``real_A`` (nuclear signal ``f``) and H&E ``real_B``.

        ``rng`` draws the image pools' choices. Returns the images of the sample grid's first
        row (real A, fake B, reconstructed A, real B, fake A, reconstructed B) and the losses.
        """
        images, losses = self._generators_step(real_A, real_B, f)
        losses.update(self._discriminators_step(images, rng))
        return images, losses

    def parts(self) -> dict[str, Stateful]:
        """What the resume state holds, by key: networks, optimisers, GradScaler, pools."""
        return {
            **self.nets(),
            "opt_G": self.opt_G,
            "opt_D": self.opt_D,
            "scaler": self.scaler,
            "pool_A": self.pool_A,
            "pool_B": self.pool_B,
        }


def _build(config: Mapping[str, Any], device: torch.device, init_from: str | None) -> CycleGAN:
    """Fresh networks (those of ``init_from``'s state where given) and their optimisers."""
    amp = amp_dtype(config.get("amp", "auto"), device)
    gen, disc = config["generator"], config["discriminator"]
    G_AB = build_model(gen["name"], **gen.get("kwargs", {})).to(device)
    G_BA = build_model(gen["name"], **gen.get("kwargs", {})).to(device)
    D_A = build_model(disc["name"], **disc.get("kwargs", {})).to(device)
    conditional = bool(disc.get("conditional", False))
    d_kwargs = dict(disc.get("kwargs", {}))
    if conditional:
        d_kwargs["in_channels"] = 6  # (DSCM, H&E) pairs
    D_B = build_model(disc["name"], **d_kwargs).to(device)
    if init_from:
        nets = {"G_AB": G_AB, "G_BA": G_BA, "D_A": D_A, "D_B": D_B}
        if "G_AB" not in _init_from(init_from, nets, device):
            raise ValueError(f"init_from {init_from}: no compatible G_AB in the file")
    betas = tuple(config["optim"]["betas"])
    lr0 = float(config["optim"]["lr"])
    return CycleGAN(
        G_AB=G_AB,
        G_BA=G_BA,
        D_A=D_A,
        D_B=D_B,
        opt_G=torch.optim.Adam([*G_AB.parameters(), *G_BA.parameters()], lr=lr0, betas=betas),
        opt_D=torch.optim.Adam([*D_A.parameters(), *D_B.parameters()], lr=lr0, betas=betas),
        scaler=torch.amp.GradScaler(device.type, enabled=amp is not None),
        pool_A=ImagePool(config["pool_size"], device),
        pool_B=ImagePool(config["pool_size"], device),
        loss=config["loss"],
        conditional=conditional,
        device=device,
        amp=amp,
    )


# ------------------------------------------------------------------------------------ data


def _regions(config: Mapping[str, Any]) -> tuple[list, list, list, str]:
    """Source, target and validation regions, and the source sample kind."""
    d = config["data"]
    he_regions = split_regions(d) if d.get("he") else None

    def pick(splits: Sequence[str]) -> list[TissueRegion]:
        return [] if he_regions is None else regions_in(he_regions, splits)

    if d.get("cm_crops"):
        source, kind = load_crop_regions(d["cm_crops"], "train", "cm"), "cm"
        val = load_crop_regions(d["cm_crops"], "val", "cm")
    else:
        source, kind, val = pick(d["source_splits"]), "pseudo", pick(d["val_splits"])
    target = (
        load_crop_regions(d["he_crops"], "train")
        if d.get("he_crops")
        else pick(d["target_splits"])
    )
    check_disjoint({"source": source, "target": target, "validation": val})
    return source, target, val, kind


@dataclass
class _Data:
    """Where a run's batches and validation tiles come from."""

    sampler_A: PairedCropSampler
    sampler_B: PairedCropSampler
    val: ValidationSet


def _load_data(config: Mapping[str, Any], seed: int) -> _Data:
    source, target, val_regions, kind = _regions(config)
    d = config["data"]
    min_tissue = float(d["min_tissue"])
    val = make_validation_set(
        val_regions,
        int(d["val_tile"]),
        int(d["val_tiles"]),
        min_tissue=float(d["val_min_tissue"]),
        speckle=d.get("speckle"),
        seed=seed,
    )
    return _Data(
        PairedCropSampler(source, kind, seed, min_tissue=min_tissue, speckle=d.get("speckle")),
        PairedCropSampler(target, "he", seed + 1, min_tissue=min_tissue),
        val,
    )


# -------------------------------------------------------------------------------- training


def _end_of_epoch(
    gan: CycleGAN,
    val: ValidationSet,
    config: Mapping[str, Any],
    run: RunFolder,
    done: int,
    images: tuple[torch.Tensor, ...],
) -> dict[str, float]:
    """Validate, save the epoch's sample grid and ``G_AB.safetensors``; the metrics."""
    epoch = done // int(config["schedule"]["iters_per_epoch"])
    rows = [[tensor_image(t[0]) for t in images]]
    metrics: dict[str, float] = {}
    if len(val):
        metrics = validate(gan.G_AB, val)
        run.logs["val.csv"].write({"epoch": epoch, "iteration": done, "model": "G_AB", **metrics})
        rows += sample_rows(val, [gan.G_AB], int(config["sample_tiles"]))
    grid_png(run.out / "samples" / f"epoch_{epoch:03d}.png", rows)
    _export(run.out / "G_AB.safetensors", gan.G_AB, config, done, metrics)
    return metrics


def _train(
    gan: CycleGAN,
    data: _Data,
    config: Mapping[str, Any],
    run: RunFolder,
    start: int,
    progress: bool,
) -> tuple[int, dict[str, float]]:
    """Iterations ``start`` … ``stop_at`` or the end; the last one done and validation."""
    sched, seed = config["schedule"], int(config["seed"])
    ipe, batch = int(sched["iters_per_epoch"]), int(sched["batch_size"])
    total = ipe * int(sched["epochs"])
    stop = stop_iteration(total, config.get("stop_at"))
    lr0 = float(config["optim"]["lr"])
    for net in gan.nets().values():
        net.train()
    last_val: dict[str, float] = {}
    t0 = time.perf_counter()
    current_crop = crop_size_at(sched, start // ipe) if start < total else None
    bar = progress_bar(start, stop, total, "cyclegan", progress)
    for it in bar:
        crop = crop_size_at(sched, it // ipe)
        if crop != current_crop:  # pooled images of the old size would not stack
            gan.pool_A.images.clear()
            gan.pool_B.images.clear()
            current_crop = crop
        lr = lr0 * lr_factor(sched, it / ipe)
        set_lr([gan.opt_G, gan.opt_D], lr)
        idx = range(it * batch, (it + 1) * batch)
        batch_A = data.sampler_A.batch(idx, crop)
        real_B = data.sampler_B.batch(idx, crop)["he"].to(gan.device)
        rng = np.random.default_rng([seed, 3, it])
        images, losses = gan.step(batch_A["dscm"].to(gan.device), real_B, batch_A["f"], rng)
        done = it + 1
        if done % int(config["log_every"]) == 0 or done == total:
            values = {"iteration": done, "epoch": done / ipe, "crop": crop, "lr": lr}
            values.update({k: v.item() for k, v in losses.items()})
            values["seconds"] = time.perf_counter() - t0
            check_finite(values, done)
            run.logs["log.csv"].write(values)
            bar.set_postfix(G=f"{values['loss_G']:.3f}", D=f"{values['loss_D_B']:.3f}")
        end_of_epoch = done % ipe == 0
        if end_of_epoch:
            last_val = _end_of_epoch(gan, data.val, config, run, done, images)
        if done % int(config["checkpoint_every"]) == 0 or end_of_epoch or done == stop:
            run.save(done, gan.parts())
    return stop, last_val


def run_cyclegan(
    config: Mapping[str, Any], *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a CycleGAN stain model (see the module docstring for the recipe and outputs).

    Parameters
    ----------
    config
        See :data:`DEFAULTS`.
    resume
        Continue from ``out/state.safetensors`` if present (models, optimizers, GradScaler,
        image pools and iteration restored). Without it an existing run in ``out`` is an
        error.
    progress
        Progress bar.

    Returns
    -------
    dict
        ``{"iteration", "checkpoint", "val": last validation metrics}``.
    """
    logs = {"log.csv": LOG_FIELDS, "val.csv": VAL_FIELDS}
    run, device = start_run(config, logs, resume=resume)
    resuming = resume and run.state_path.is_file()
    gan = _build(config, device, None if resuming else config.get("init_from"))
    start = run.resume(gan.parts())
    data = _load_data(config, int(config["seed"]))
    if start == 0 and len(data.val):
        for name, m in (
            (INPUT_ROW, validate(None, data.val)),
            (TRUTH_ROW, truth_reference(data.val)),
        ):
            if m is not None:
                run.logs["val.csv"].write({"epoch": 0, "iteration": 0, "model": name, **m})
    stop, last_val = _train(gan, data, config, run, start, progress)
    total = int(config["schedule"]["iters_per_epoch"]) * int(config["schedule"]["epochs"])
    if stop < total:
        return {"iteration": stop, "stopped": True, "checkpoint": None, "val": last_val}
    final = _export(run.out / "G_AB.safetensors", gan.G_AB, config, total, last_val)
    return {"iteration": total, "checkpoint": str(final), "val": last_val}


def _export(
    path: Path, G_AB: nn.Module, config: Mapping[str, Any], iteration: int, val: Mapping
) -> Path:
    """Write ``G_AB`` as a plugin checkpoint (architecture, kwargs, recipe, metrics)."""
    d = config["data"]
    training = {
        "recipe": "CycleGAN (LSGAN), unpaired: pseudo-confocal DSCM -> H&E",
        "iteration": iteration,
        "schedule": dict(config["schedule"]),
        "loss": dict(config["loss"]),
        "optim": dict(config["optim"]),
        "pool_size": config["pool_size"],
        "seed": config["seed"],
        "generator": dict(config["generator"]),
        "discriminator": dict(config["discriminator"]),
        "data": {
            k: d.get(k)
            for k in (
                "he",
                "bands",
                "order",
                "source_splits",
                "target_splits",
                "val_splits",
                "cm_crops",
                "he_crops",
                "speckle",
            )
        },
        "val": dict(val),
    }
    return save_checkpoint(
        path,
        G_AB,
        architecture=config["generator"]["name"],
        normalization=dict(DSCM_INPUT),
        training=portable_record(training),
    )
