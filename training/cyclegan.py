"""CycleGAN stain training: linear stain (DSCM) ↔ H&E, unpaired (thesis §3.3, Combalia §2.2).

Faithful to the published recipe (see ``docs/training.md``):

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

Structure-preserving options (issue 8; all off by default, so the default *is* the recipe):

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
its last state continues exactly as the uninterrupted run would have.

Outputs in ``out``: ``config.json``, ``log.csv`` (losses every ``log_every`` iterations),
``val.csv`` (per epoch: SSIM / LBP χ² against the input and the true H&E, nuclei
preservation — plus reference rows for the linear stain itself and the true H&E),
``samples/epoch_NNN.png``, ``state.safetensors`` (resume) and ``G_AB.safetensors`` (a plugin
checkpoint: ``load_model(out / "G_AB.safetensors")``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from napari_confocal_stain.inference import select_device
from napari_confocal_stain.models import build_model, save_checkpoint
from napari_confocal_stain.models.registry import DSCM_INPUT
from training.data import (
    PairedCropSampler,
    TissueRegion,
    dscm_tensor,
    load_crop_regions,
    load_he_regions,
    pseudo_confocal,
    tile_grid_regions,
)
from training.evaluate import (
    aggregate_stain_metrics,
    run_generator,
    save_png,
    stain_metrics,
)
from training.runstate import (
    CsvLog,
    load_state,
    portable_paths,
    save_state,
    seed_everything,
    write_atomic,
)
from training.structure import hematoxylin_loss

__all__ = [
    "DEFAULTS",
    "ImagePool",
    "ValidationSet",
    "amp_dtype",
    "crop_size_at",
    "lr_factor",
    "make_validation_set",
    "run_cyclegan",
    "validate",
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
        "he": ["${NCS_DATA}/he/cmu_small_region.svs"],
        "pixel_size_um": None,
        "bands": 6,
        "order": ["source", "target", "heldout"],
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
VAL_FIELDS = (
    "epoch",
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
    start, total = float(schedule["decay_start"]), float(schedule["epochs"])
    if total <= start:
        return 1.0
    return max(0.0, 1.0 - max(0.0, epoch_float - start) / (total - start + 1.0))


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
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
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

    def state(self) -> list[torch.Tensor]:
        """The stored images (for the resume state)."""
        return [t.cpu() for t in self.images]

    def load(self, images: Sequence[torch.Tensor], device: torch.device) -> None:
        """Restore :meth:`state`."""
        self.images = [t.to(device) for t in images]


# ------------------------------------------------------------------------------ validation


class ValidationSet:
    """Held-out pseudo-confocal tiles with their true H&E (or confocal tiles without).

    Attributes
    ----------
    dscm
        ``(3, s, s)`` inputs in [-1, 1].
    f
        ``(s, s)`` fluorescence (for nuclei).
    truth
        ``(s, s, 3)`` true H&E in [0, 1], or None for real confocal tiles.
    """

    def __init__(self, dscm: list, f: list, truth: list | None) -> None:
        self.dscm, self.f, self.truth = dscm, f, truth

    def __len__(self) -> int:
        return len(self.dscm)


def make_validation_set(
    regions: Sequence[TissueRegion],
    size: int,
    count: int,
    *,
    min_tissue: float = 0.5,
    speckle: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ValidationSet:
    """Non-overlapping tissue tiles of held-out regions as pseudo-confocal pairs.

    Tile ``i``'s speckle uses ``default_rng([seed, 4, i])``: every epoch and every model is
    scored on the very same inputs. Confocal regions (``modes``) give tiles without truth.
    """
    dscm, fs, truth = [], [], []
    for i, (region, y, x) in enumerate(tile_grid_regions(regions, size, min_tissue, count)):
        if region.modes is not None:
            r, f = (region.modes[y : y + size, x : x + size, c] for c in (0, 1))
            truth = None
        else:
            rgb = region.rgb[y : y + size, x : x + size]
            rng = np.random.default_rng([seed, 4, i])
            r, f = pseudo_confocal(rgb, region.hed_scale, rng, speckle=speckle)
            if truth is not None:
                truth.append(rgb)
        dscm.append(dscm_tensor(r, f))
        fs.append(f)
    return ValidationSet(dscm, fs, truth)


def validate(generator: nn.Module | None, val: ValidationSet) -> dict[str, float]:
    """Aggregate stain metrics of ``generator`` on ``val`` (None: score the input itself)."""
    per_tile = []
    was_training = generator.training if generator is not None else False
    if generator is not None:
        generator.eval()
    for i, x in enumerate(val.dscm):
        dscm01 = (x.transpose(1, 2, 0) + 1.0) / 2.0
        out = dscm01 if generator is None else run_generator(generator, x)
        truth = val.truth[i] if val.truth is not None else None
        per_tile.append(stain_metrics(dscm01, out, val.f[i], truth))
    if generator is not None and was_training:
        generator.train()
    return aggregate_stain_metrics(per_tile)


def _truth_reference(val: ValidationSet) -> dict[str, float] | None:
    """Metrics of the true H&E as if it were the output: the ceiling a model can reach."""
    if val.truth is None:
        return None
    per_tile = [
        stain_metrics((x.transpose(1, 2, 0) + 1) / 2, t, f, t)
        for x, f, t in zip(val.dscm, val.f, val.truth, strict=True)
    ]
    return aggregate_stain_metrics(per_tile)


# -------------------------------------------------------------------------------- training


def _regions(config: Mapping[str, Any]) -> tuple[list, list, list, str]:
    """Source, target and validation regions, and the source sample kind."""
    d = config["data"]
    he_regions = None
    if d.get("he"):
        he_regions = load_he_regions(
            d["he"], bands=int(d["bands"]), order=d["order"], pixel_size_um=d.get("pixel_size_um")
        )

    def pick(splits: Sequence[str]) -> list[TissueRegion]:
        if he_regions is None:
            return []
        return [r for s in splits for r in he_regions[s]]

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
    boxes = [{(r.slide, r.box) for r in rs} for rs in (source, target, val)]
    shared = (boxes[0] & boxes[1]) | (boxes[0] & boxes[2]) | (boxes[1] & boxes[2])
    if shared:
        raise ValueError(f"source, target and validation regions overlap: {sorted(shared)}")
    return source, target, val, kind


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


def _grid_png(path: Path, rows: list[list[np.ndarray]]) -> None:
    """Tile HWC [0, 1] images into a grid and save it."""
    lines = [np.concatenate(r, axis=1) for r in rows]
    width = max(line.shape[1] for line in lines)
    lines = [
        np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=1)
        for line in lines
    ]
    save_png(path, np.concatenate(lines, axis=0))


def _to_img(t: torch.Tensor) -> np.ndarray:
    return np.clip((t.detach().float().cpu().numpy().transpose(1, 2, 0) + 1) / 2, 0, 1)


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
    amp = amp_dtype(config.get("amp", "auto"), device)
    use_amp = amp is not None
    sched = config["schedule"]
    lam = config["loss"]
    gen, disc = config["generator"], config["discriminator"]

    G_AB = build_model(gen["name"], **gen.get("kwargs", {})).to(device)
    G_BA = build_model(gen["name"], **gen.get("kwargs", {})).to(device)
    D_A = build_model(disc["name"], **disc.get("kwargs", {})).to(device)
    conditional = bool(disc.get("conditional", False))
    d_kwargs = dict(disc.get("kwargs", {}))
    if conditional:
        d_kwargs["in_channels"] = 6  # (DSCM, H&E) pairs
    D_B = build_model(disc["name"], **d_kwargs).to(device)
    lam_hema = float(lam.get("lambda_hema", 0.0))
    hema_window = int(lam.get("hema_window", 15))
    if config.get("init_from") and not (resume and state_path.is_file()):
        nets = {"G_AB": G_AB, "G_BA": G_BA, "D_A": D_A, "D_B": D_B}
        loaded = _init_from(config["init_from"], nets, device)
        if "G_AB" not in loaded:
            raise ValueError(f"init_from {config['init_from']}: no compatible G_AB in the file")
    betas = tuple(config["optim"]["betas"])
    lr0 = float(config["optim"]["lr"])
    opt_G = torch.optim.Adam([*G_AB.parameters(), *G_BA.parameters()], lr=lr0, betas=betas)
    opt_D = torch.optim.Adam([*D_A.parameters(), *D_B.parameters()], lr=lr0, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    pool_A, pool_B = ImagePool(config["pool_size"]), ImagePool(config["pool_size"])

    log = CsvLog(out / "log.csv", LOG_FIELDS)
    val_log = CsvLog(out / "val.csv", VAL_FIELDS)
    start = 0
    if resume and state_path.is_file():
        st = load_state(state_path)
        for net, key in ((G_AB, "G_AB"), (G_BA, "G_BA"), (D_A, "D_A"), (D_B, "D_B")):
            net.load_state_dict(st[key])
        opt_G.load_state_dict(st["opt_G"])
        opt_D.load_state_dict(st["opt_D"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        pool_A.load(st["pool_A"], device)
        pool_B.load(st["pool_B"], device)
        start = int(st["iteration"])
        log.truncate_from("iteration", start + 1)
        val_log.truncate_from("iteration", start + 1)
    else:
        for p in (out / "log.csv", out / "val.csv"):
            p.unlink(missing_ok=True)

    source, target, val_regions, kind = _regions(config)
    d = config["data"]
    min_tissue = float(d["min_tissue"])
    sampler_A = PairedCropSampler(
        source, kind, seed, min_tissue=min_tissue, speckle=d.get("speckle")
    )
    sampler_B = PairedCropSampler(target, "he", seed + 1, min_tissue=min_tissue)
    val = make_validation_set(
        val_regions,
        int(d["val_tile"]),
        int(d["val_tiles"]),
        min_tissue=float(d["val_min_tissue"]),
        speckle=d.get("speckle"),
        seed=seed,
    )
    if start == 0 and len(val):
        for name, m in (
            ("linear-stain (input)", validate(None, val)),
            ("true H&E (reference)", _truth_reference(val)),
        ):
            if m is not None:
                val_log.write({"epoch": 0, "iteration": 0, "model": name, **m})

    ipe, epochs, batch = (
        int(sched["iters_per_epoch"]),
        int(sched["epochs"]),
        int(sched["batch_size"]),
    )
    total = ipe * epochs
    # stop_at: end this process early (a time-boxed job); --resume continues the same run.
    stop = min(total, int(config.get("stop_at") or total))
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp))
        if use_amp
        else contextlib.nullcontext
    )
    l1, mse = nn.functional.l1_loss, nn.functional.mse_loss
    for net in (G_AB, G_BA, D_A, D_B):
        net.train()
    last_val: dict[str, float] = {}
    t0 = time.perf_counter()
    current_crop = crop_size_at(sched, start // ipe) if start < total else None
    bar = tqdm(
        range(start, stop),
        desc="cyclegan",
        initial=start,
        total=total,
        disable=not progress,
        mininterval=5,
    )
    for it in bar:
        epoch = it // ipe
        crop = crop_size_at(sched, epoch)
        if crop != current_crop:
            pool_A.images.clear()
            pool_B.images.clear()
            current_crop = crop
        lr = lr0 * lr_factor(sched, it / ipe)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        idx = range(it * batch, (it + 1) * batch)
        batch_A = sampler_A.batch(idx, crop)
        real_A = batch_A["dscm"].to(device)
        real_B = sampler_B.batch(idx, crop)["he"].to(device)
        rng = np.random.default_rng([seed, 3, it])

        # Generators: fool the (frozen) discriminators, cycle back, keep identity.
        _set_requires_grad([D_A, D_B], False)
        with autocast():
            fake_B = G_AB(real_A)
            rec_A = G_BA(fake_B)
            fake_A = G_BA(real_B)
            rec_B = G_AB(fake_A)
            pred_fb = D_B(torch.cat([real_A, fake_B], 1) if conditional else fake_B)
            pred_fa = D_A(fake_A)
            gan_AB = mse(pred_fb, torch.ones_like(pred_fb))
            gan_BA = mse(pred_fa, torch.ones_like(pred_fa))
            cyc_A = l1(rec_A, real_A) * float(lam["lambda_cycle"])
            cyc_B = l1(rec_B, real_B) * float(lam["lambda_cycle"])
            if float(lam["lambda_identity"]) > 0:
                idt_A = l1(G_AB(real_B), real_B) * float(lam["lambda_identity"])
                idt_B = l1(G_BA(real_A), real_A) * float(lam["lambda_identity"])
            else:
                idt_A = idt_B = torch.zeros((), device=device)
            if lam_hema > 0:
                hema = lam_hema * hematoxylin_loss(
                    fake_B, batch_A["f"].to(device), window=hema_window
                )
            else:
                hema = torch.zeros((), device=device)
            loss_G = gan_AB + gan_BA + cyc_A + cyc_B + idt_A + idt_B + hema
        opt_G.zero_grad(set_to_none=True)
        scaler.scale(loss_G).backward()
        scaler.step(opt_G)

        # Discriminators: real → 1, (pooled) fake → 0, loss halved.
        _set_requires_grad([D_A, D_B], True)
        if conditional:
            # Real pairs: (G_BA(B), B) — the DSCM that H&E "came from" by the other generator.
            pooled_B = pool_B.query(torch.cat([real_A, fake_B.float()], 1), rng)
            real_pair_B = torch.cat([fake_A.detach().float(), real_B], 1)
        else:
            pooled_B = pool_B.query(fake_B.float(), rng)
            real_pair_B = real_B
        pooled_A = pool_A.query(fake_A.float(), rng)
        with autocast():
            pr, pf = D_B(real_pair_B), D_B(pooled_B)
            loss_D_B = 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
            pr, pf = D_A(real_A), D_A(pooled_A)
            loss_D_A = 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
        opt_D.zero_grad(set_to_none=True)
        scaler.scale(loss_D_A + loss_D_B).backward()
        scaler.step(opt_D)
        scaler.update()

        done = it + 1
        if done % int(config["log_every"]) == 0 or done == total:
            values = {
                "iteration": done,
                "epoch": done / ipe,
                "crop": crop,
                "lr": lr,
                "loss_G": loss_G.item(),
                "gan_AB": gan_AB.item(),
                "gan_BA": gan_BA.item(),
                "cycle_A": cyc_A.item(),
                "cycle_B": cyc_B.item(),
                "idt_A": idt_A.item(),
                "idt_B": idt_B.item(),
                "hema": hema.item(),
                "loss_D_A": loss_D_A.item(),
                "loss_D_B": loss_D_B.item(),
                "seconds": time.perf_counter() - t0,
            }
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at iteration {done}: {values}")
            log.write(values)
            bar.set_postfix(G=f"{values['loss_G']:.3f}", D=f"{values['loss_D_B']:.3f}")
        end_of_epoch = done % ipe == 0
        if end_of_epoch:
            ep = done // ipe
            rows = [[_to_img(t[0]) for t in (real_A, fake_B, rec_A, real_B, fake_A, rec_B)]]
            if len(val):
                last_val = validate(G_AB, val)
                val_log.write({"epoch": ep, "iteration": done, "model": "G_AB", **last_val})
                G_AB.eval()
                for k in range(min(int(config["sample_tiles"]), len(val))):
                    x = val.dscm[k]
                    row = [(x.transpose(1, 2, 0) + 1) / 2, run_generator(G_AB, x)]
                    if val.truth is not None:
                        row.append(val.truth[k])
                    rows.append(row)
                G_AB.train()
            _grid_png(out / "samples" / f"epoch_{ep:03d}.png", rows)
            _export(out / "G_AB.safetensors", G_AB, config, done, last_val)
        if done % int(config["checkpoint_every"]) == 0 or end_of_epoch or done == stop:
            save_state(
                state_path,
                {
                    "iteration": done,
                    "G_AB": G_AB.state_dict(),
                    "G_BA": G_BA.state_dict(),
                    "D_A": D_A.state_dict(),
                    "D_B": D_B.state_dict(),
                    "opt_G": opt_G.state_dict(),
                    "opt_D": opt_D.state_dict(),
                    "scaler": scaler.state_dict(),
                    "pool_A": pool_A.state(),
                    "pool_B": pool_B.state(),
                },
            )
    if stop < total:
        return {"iteration": stop, "stopped": True, "checkpoint": None, "val": last_val}
    final = _export(out / "G_AB.safetensors", G_AB, config, total, last_val)
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
        training=portable_paths(json.loads(json.dumps(training, default=str))),
    )
