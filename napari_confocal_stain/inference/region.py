"""Stain a region of any size with a generator: :func:`stain_region`.

numpy in, numpy out. :func:`stain_region` maps a Gareau linear stain (DSCM, ``(H, W, 3)`` in
[0, 1]) through a generator (input and output in [-1, 1]) to an H&E-like ``(H, W, 3)`` image in
[0, 1], with one of the tiling strategies of :mod:`napari_confocal_stain.core.tiling`
(``independent``, ``crop``, ``pyramid``, ``pyramid-flat``, the thesis's) or the default
``seamless`` (:mod:`napari_confocal_stain.inference.seamless`).

Model requirements: see :mod:`napari_confocal_stain.inference.geometry`.

Execution: every generator strategy runs the engine's copy of the model
(:func:`~napari_confocal_stain.inference.dense_norm.make_seamless`: shares the parameters, instance
norms replaced by a layout-friendly implementation that is plain instance norm unless a
statistics grid is set), channels-last. That makes ``independent`` ≈ 1.4× faster than calling
the model as built on this CPU, and keeps the strategies' times comparable.

Devices and precision: ``device="auto"`` picks CUDA, then Apple MPS, then the CPU
(:mod:`~napari_confocal_stain.inference.device`); ``precision="auto"`` is bf16/fp16 autocast
on GPUs and on the CPU only where a one-off calibration finds it faster
(:mod:`~napari_confocal_stain.inference.precision`). CUDA/MPS out-of-memory halves the batch
(or the seamless block) and retries; at a batch of one the run moves to the CPU with a
warning (:mod:`~napari_confocal_stain.inference.executor`).

Background: tissue-free windows are not run but filled with the model's background response
(:mod:`~napari_confocal_stain.inference.background`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.seams import seam_index
from napari_confocal_stain.core.tiling import STRATEGIES, round_up, seam_period
from napari_confocal_stain.inference.dense_norm import SUBDIVISIONS
from napari_confocal_stain.inference.device import resolve_device
from napari_confocal_stain.inference.executor import Executor, RegionRun, Runner
from napari_confocal_stain.inference.geometry import in_channels, size_multiple
from napari_confocal_stain.inference.seamless import stain_seamless
from napari_confocal_stain.inference.tiled import stain_tiled

__all__ = ["measure_seam_index", "stain_region"]


def _check_rgb(linear_rgb: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(linear_rgb)
    if arr.ndim != 3 or arr.shape[-1] != channels or min(arr.shape[:2]) < 1:
        raise ValueError(
            f"stain_region expects an (H, W, {channels}) DSCM array, got shape {arr.shape}"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("stain_region: the DSCM contains NaN or infinite values")
    return arr


def stain_region(
    linear_rgb: np.ndarray,
    model: nn.Module,
    *,
    strategy: str = "seamless",
    tile: int = 512,
    batch_size: int | str = "auto",
    device: str | torch.device = "auto",
    precision: str = "auto",
    skip_background: bool = True,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    origin: tuple[int, int] = (0, 0),
    runner: Runner | None = None,
    report: dict | None = None,
    max_block_pixels: float | None = None,
    subdivisions: int = SUBDIVISIONS,
) -> np.ndarray:
    """Stain a DSCM region with a generator, tile by tile or seamlessly.

    Parameters
    ----------
    linear_rgb
        ``(H, W, 3)`` Gareau linear stain (DSCM) in [0, 1]; any ``H, W ≥ 1``.
    model
        Generator mapping ``(B, 3, h, w)`` in [-1, 1] to ``(B, C', h, w)`` in [-1, 1].
    strategy
        ``"seamless"`` (default), ``"independent"``, ``"crop"``, ``"pyramid"`` or
        ``"pyramid-flat"`` (see :mod:`napari_confocal_stain.core.tiling`).
    tile
        Window / statistics-tile size ``N`` (a multiple of the model's size multiple; of 4 times
        it for the overlapping strategies).
    batch_size
        Windows per forward pass, or ``"auto"`` (from free memory; at most 4 on the CPU).
    device
        ``"auto"``, a device name or a ``torch.device``.
    precision
        ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
    skip_background
        Fill tissue-free windows (``seamless``: blocks whose every tile is tissue-free) with the
        cached background response instead of running the model.
    progress
        Called as ``progress(done, total)`` after each batch (counting windows) or block.
    cancel
        Polled before each batch or block; returning True raises :class:`Cancelled`.
    origin
        Image coordinates of a tile-grid line; shifting it by half a
        :func:`~napari_confocal_stain.core.tiling.seam_period` gives the seam index's
        reference run. Viewers stitching regions should pass the region's global offset so
        neighbouring regions share a grid.
    runner
        ``runner(model, batch) -> output``; the default calls the model. A test seam for the
        out-of-memory path.
    report
        If a dict is given it is filled with what happened: ``model_pixels``, ``windows``,
        ``skipped``, ``device``, ``precision``, ``batch_size`` / ``blocks``.
    max_block_pixels
        ``seamless`` only: largest block in model input pixels (default: from free memory).
    subdivisions
        ``seamless`` only: lattice cells per tile (``K``; 1 = KIN-style per-tile statistics).

    Returns
    -------
    numpy.ndarray
        ``(H, W, C')`` float32 in [0, 1].
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    img = _check_rgb(linear_rgb, in_channels(model))
    execu = Executor(model, resolve_device(device), precision, runner)
    run = RegionRun(
        image=img,
        model=model,
        executor=execu,
        tile=int(tile),
        origin=origin,
        skip_background=skip_background,
        progress=progress,
        cancel=cancel,
        info={"strategy": strategy, "tile": int(tile)},
    )
    if strategy == "seamless":
        out = stain_seamless(run, max_block_pixels, subdivisions)
    else:
        out = stain_tiled(run, strategy, batch_size)
    info = run.info
    info.update(device=str(execu.device), precision=execu.precision)
    info["work"] = info["model_pixels"] / float(img.shape[0] * img.shape[1])
    if report is not None:
        report.update(info)
    return out


def measure_seam_index(
    linear_rgb: np.ndarray,
    model: nn.Module,
    *,
    strategy: str = "seamless",
    tile: int = 512,
    origin: tuple[int, int] = (0, 0),
    **kwargs: Any,
) -> float:
    """Seam index of a strategy on an image: run it at ``origin`` and half a period further.

    See :func:`napari_confocal_stain.core.seams.seam_index`. ``kwargs`` go to
    :func:`stain_region` (both runs).
    """
    period = seam_period(strategy, tile)
    shift = period // 2
    if strategy == "seamless":
        shift = round_up(shift, size_multiple(model))
    a = stain_region(linear_rgb, model, strategy=strategy, tile=tile, origin=origin, **kwargs)
    b = stain_region(
        linear_rgb,
        model,
        strategy=strategy,
        tile=tile,
        origin=(origin[0] + shift, origin[1] + shift),
        **kwargs,
    )
    return seam_index(a, b, period, origin=origin)
