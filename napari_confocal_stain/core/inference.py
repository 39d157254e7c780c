"""Run the stain generator and the despeckling net on regions of any size.

numpy in, numpy out. :func:`stain_region` maps a Gareau linear stain (DSCM, ``(H, W, 3)`` in
[0, 1]) through a generator (input and output in [-1, 1]) to an H&E-like ``(H, W, 3)`` image in
[0, 1], with one of the tiling strategies of :mod:`napari_confocal_stain.core.tiling`
(``independent``, ``crop``, ``pyramid``, ``pyramid-flat``, the thesis's) or the default
``seamless`` (:mod:`napari_confocal_stain.core.seamless`). :func:`despeckle_region` runs a
DespeckleNN on reflectance with overlapping tiles that reproduce a single pass exactly.

Model requirements (model-agnostic): any ``nn.Module`` mapping ``(B, C, h, w) → (B, C', h, w)``.
The engine reads ``model.size_multiple`` (else ``2**model.n_down``, else 1) for the multiple
that ``h`` and ``w`` must be, ``model.min_size`` (else the multiple) for their minimum, and, for
despeckling, ``model.halo`` (else a measured receptive field) for the tile overlap.

Execution: every generator strategy runs the engine's copy of the model
(:func:`~napari_confocal_stain.core.seamless.make_seamless`: shares the parameters, instance
norms replaced by a layout-friendly implementation that is plain instance norm unless a
statistics grid is set), channels-last. That makes ``independent`` ≈ 1.4× faster than calling
the model as built on this CPU, and keeps the strategies' times comparable.

Devices and precision: ``device="auto"`` picks CUDA, then Apple MPS, then the CPU. Work runs
under ``torch.inference_mode``. ``precision="auto"`` is bf16 (else fp16) autocast on CUDA,
fp32 on MPS, and on the CPU bf16 only if a one-off calibration per model (:func:`cpu_precision`)
finds it both faster and within tolerance of fp32. CUDA/MPS out-of-memory halves the batch (or
the seamless block) and retries; at a batch of one the run moves to the CPU with a warning.

Background: a window whose DSCM is nearly white (:func:`is_background`) is not run; it is filled
with the model's response to a uniform white window, computed once per model and window size,
so skipped and computed background look the same. ``seamless`` skips a block only if all of
its tiles are background, and fills it with the constant the model gives deep inside a uniform
white region.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.seamless import (
    SUBDIVISIONS,
    SeamlessModel,
    default_margin,
    make_seamless,
    plan_blocks,
    run_region,
)
from napari_confocal_stain.core.tiling import (
    STRATEGIES,
    pad_reflect,
    plan_tiles,
    round_up,
)
from napari_confocal_stain.errors import ConfocalStainError

Runner = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``runner(model, batch) -> output``: the one place a model is called (a test seam)."""

BACKGROUND_DARKNESS = 0.05
"""A pixel is tissue if some DSCM channel is below ``1 − BACKGROUND_DARKNESS``."""

BACKGROUND_TISSUE_FRACTION = 0.002
"""A window is background if at most this fraction of its pixels is tissue."""

CPU_BF16_TOLERANCE = {"mean_abs": 0.01, "max_abs": 0.06}
"""bf16 on the CPU must stay this close to fp32 (output in [0, 1]) to be chosen by ``auto``."""

CPU_BF16_MIN_SPEEDUP = 1.10
"""…and be at least this much faster."""


class Cancelled(ConfocalStainError):
    """The caller's ``cancel()`` returned True; the region was not finished."""


# ----------------------------------------------------------------------------------------------
# Model geometry


def size_multiple(model: nn.Module) -> int:
    """Height/width multiple a model needs: ``size_multiple``, else ``2**n_down``, else 1."""
    mult = getattr(model, "size_multiple", None)
    if mult is None and getattr(model, "n_down", None) is not None:
        mult = 2 ** int(model.n_down)
    return max(1, int(mult or 1))


def min_size(model: nn.Module) -> int:
    """Smallest height/width a model accepts: ``model.min_size``, else its size multiple."""
    return max(int(getattr(model, "min_size", 0) or 0), size_multiple(model))


def _param(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def _model_device(model: nn.Module) -> torch.device:
    p = _param(model)
    return p.device if p is not None else torch.device("cpu")


def _version(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter is updated in place (invalidates derived copies)."""
    return tuple(p._version for p in model.parameters())


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            return int(m.in_channels)
    return 3


# ----------------------------------------------------------------------------------------------
# Devices, precision, memory


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA, then MPS, then CPU; strings and devices are checked to exist.

    Uses :func:`napari_confocal_stain.models.device.select_device` (falls back to the CPU with
    a warning when an accelerator is named but absent). ``"meta"`` is passed through (tests).
    """
    if isinstance(device, torch.device | str) and str(device) == "meta":
        return torch.device("meta")
    from napari_confocal_stain.models.device import select_device

    return select_device(device, fallback=True)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or device.type == "meta":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_CALIBRATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_precision(model: nn.Module, *, size: int = 96, repeats: int = 2) -> dict[str, Any]:
    """Decide once per model whether bf16 autocast beats fp32 on this CPU (cached).

    Runs the engine's copy of the model (channels-last, as :func:`stain_region` does) on a fixed
    smooth test image of ``size²`` (rounded to the model's multiple) in fp32 and under bf16
    autocast, ``repeats`` times each after a warm-up, and picks bf16 only if it is
    :data:`CPU_BF16_MIN_SPEEDUP` × faster and within :data:`CPU_BF16_TOLERANCE`. A bf16 warm-up
    over 3× slower than fp32 (bf16 emulated on a CPU without bf16 units: 20× slower here)
    ends the timing early. About 2 s once per model for a base-64 U-Net on this machine.

    Parameters
    ----------
    model
        The generator (on the CPU).
    size
        Side of the calibration image.
    repeats
        Timed runs per precision (the median is used).

    Returns
    -------
    dict
        ``precision`` ("fp32" or "bf16"), ``fp32_s``, ``bf16_s``, ``mean_abs``, ``max_abs``.
    """
    key = _version(model)
    hit = _CALIBRATION.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    side = max(round_up(size, size_multiple(model)), min_size(model))
    yy, xx = np.mgrid[0:side, 0:side] / side
    chans = _in_channels(model)
    img = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(chans)])
    x = torch.as_tensor(img[None], dtype=torch.float32).to(_model_device(model))
    net = make_seamless(model)  # what the engine runs: its copy, channels-last
    if chans > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    outs: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16"):
            with _autocast(torch.device("cpu"), prec):
                t0 = time.perf_counter()
                y = net(x)  # warm-up
                runs = [time.perf_counter() - t0]
                # bf16 emulated on a CPU without bf16 units is many times slower: one run
                # (even with its warm-up overhead) already says so, skip the rest.
                if prec == "fp32" or runs[0] < 3 * times["fp32"]:
                    runs = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        y = net(x)
                        runs.append(time.perf_counter() - t0)
            outs[prec] = y.float()
            times[prec] = float(np.median(runs))
    diff = (outs["fp32"] - outs["bf16"]).abs() / 2.0  # [-1, 1] → [0, 1] scale
    result = {
        "fp32_s": times["fp32"],
        "bf16_s": times["bf16"],
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
    }
    ok = (
        result["mean_abs"] <= CPU_BF16_TOLERANCE["mean_abs"]
        and result["max_abs"] <= CPU_BF16_TOLERANCE["max_abs"]
        and times["fp32"] >= CPU_BF16_MIN_SPEEDUP * times["bf16"]
    )
    result["precision"] = "bf16" if ok else "fp32"
    _CALIBRATION[model] = (key, result)
    return result


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """The precision actually used: "fp32", "bf16" or "fp16" (see the module docstring).

    Explicit "fp16" on the CPU falls back to fp32 with a warning (CPU fp16 convolutions are
    emulated and slow on most CPUs); explicit "bf16" on the CPU is honoured.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if device.type == "mps":
        if precision == "bf16":
            warnings.warn("bf16 is not used on MPS; running in fp32", RuntimeWarning, stacklevel=3)
            return "fp32"
        return "fp32" if precision == "auto" else precision
    if device.type == "cpu":
        if precision == "fp16":
            warnings.warn(
                "fp16 is not supported for CPU inference; running in fp32 instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return "fp32"
        if precision == "auto":
            return cpu_precision(model)["precision"] if model is not None else "fp32"
        return precision
    return "fp32"


def _available_bytes(device: torch.device) -> float:
    """Memory the engine may use on ``device`` (a conservative share of what is free)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    if device.type == "mps":
        try:
            limit = torch.mps.recommended_max_memory()
            return 0.6 * max(limit - torch.mps.driver_allocated_memory(), 0)
        except (AttributeError, RuntimeError):
            return 2e9
    avail = None
    try:
        import psutil  # optional: the test/bench extras have it

        avail = psutil.virtual_memory().available
    except ImportError:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4e9
    return 0.4 * avail  # the machine is shared with the viewer and other work


_BYTES_PER_PIXEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bytes_per_pixel(model: nn.Module) -> float:
    """Estimated peak activation memory per input pixel of one forward pass (cached).

    Measured by summing every leaf module's output size on a small probe image; the peak of an
    inference pass (where finished activations are freed) is well below that sum for the
    generators here (measured: U-Net base 64, sum 3.8 kB/px; peak RSS of a 1024² seamless
    pass 1.3 kB/px), so 0.4 × the sum is used.
    """
    hit = _BYTES_PER_PIXEL.get(model)
    if hit is not None:
        return hit
    side = max(min_size(model), round_up(64, size_multiple(model)))
    total = 0

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, _in_channels(model), side, side), device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
    value = max(0.4 * total / (side * side), 64.0)
    _BYTES_PER_PIXEL[model] = value
    return value


# ----------------------------------------------------------------------------------------------
# Execution with OOM handling


def default_runner(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call the model (the engine wraps this in inference mode and autocast)."""
    return model(x)


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom | torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate" in msg)


class _OOM(Exception):
    """Internal: the current device ran out of memory at the current batch/block size."""


_DEVICE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Executor:
    """Runs batches on a device with autocast; on OOM the caller shrinks, then we move to CPU."""

    def __init__(
        self, model: nn.Module, device: torch.device, precision: str, runner: Runner | None
    ) -> None:
        self.source = model
        self.requested_precision = precision
        self.runner = runner or default_runner
        self._set_device(device)

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        probe = self._model("plain") if device.type == "cpu" else None
        self.precision = resolve_precision(self.requested_precision, device, probe)

    def _model(self, kind: str) -> nn.Module:
        """The source model on ``self.device`` ("plain") or the engine's copy ("engine").

        The engine copy (:func:`~napari_confocal_stain.core.seamless.make_seamless`) shares
        the parameters; with no statistics grid set its norms are plain instance norms, so the
        tiled strategies run the same model through the same (channels-last friendly) code.
        """
        src = self.source
        if _model_device(src) == self.device or _param(src) is None:
            base = src
        else:
            copies = _DEVICE_COPIES.setdefault(src, {})
            hit = copies.get(str(self.device))
            if hit is None or hit[0] != _version(src):
                import copy

                hit = (_version(src), copy.deepcopy(src).to(self.device).eval())
                copies[str(self.device)] = hit
            base = hit[1]
        if kind == "plain":
            return base
        copies = _DEVICE_COPIES.setdefault(base, {})
        hit = copies.get("engine")
        if hit is None:
            hit = (None, make_seamless(base))
            copies["engine"] = hit
        return hit[1]

    def forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``net`` on ``x`` (CPU float32) on the device; return float32 on the CPU.

        The engine copy runs channels-last (NHWC): oneDNN's convolutions, and above all its
        transposed convolutions, are faster in that layout (measured: a base-64 U-Net tile
        ≈ 1.4× faster on this CPU), and :class:`DenseInstanceNorm2d` keeps the layout.
        """
        try:
            with torch.inference_mode(), _autocast(self.device, self.precision):
                x = x.to(self.device, non_blocking=True)
                if isinstance(net, SeamlessModel) and x.shape[1] > 1:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.runner(net, x)
                return y.float().cpu().contiguous()
        except Exception as exc:
            if _is_oom(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise _OOM(str(exc)) from exc
            raise

    def fall_back(self, why: str) -> None:
        """Move to the CPU (warns); re-raises if already there."""
        if self.device.type == "cpu":
            raise MemoryError(f"out of memory on the CPU even with the smallest batch: {why}")
        warnings.warn(
            f"out of memory on {self.device} even with a batch of one; continuing on the CPU",
            RuntimeWarning,
            stacklevel=4,
        )
        self._set_device(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Background


def is_background(dscm: np.ndarray) -> bool:
    """Whether a DSCM window is tissue-free ("nearly white").

    The test: a pixel counts as tissue if its darkest channel is below
    ``1 − BACKGROUND_DARKNESS`` (0.95); the window is background if at most
    ``BACKGROUND_TISSUE_FRACTION`` (0.2 %) of its pixels are tissue. In the Gareau stain white is
    exactly "no fluorescence and no reflectance", and both stains darken at least one channel
    (nuclei red/green, eosin green), so the darkest channel is the right test.

    Parameters
    ----------
    dscm
        ``(h, w, 3)`` in [0, 1].
    """
    tissue = dscm.min(axis=-1) < 1.0 - BACKGROUND_DARKNESS
    return float(tissue.mean()) <= BACKGROUND_TISSUE_FRACTION


_FILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def background_response(
    model: nn.Module,
    window: tuple[int, int],
    *,
    kind: str = "tile",
    execu: _Executor | None = None,
) -> np.ndarray:
    """The model's output (in [0, 1], ``(h, w, C')``) for a uniform white window (cached).

    ``kind="tile"`` is the full window output (what ``independent``/``crop``/pyramids would
    compute for it); ``kind="constant"`` is the per-channel median of its central half, the
    value deep inside a uniform background that the ``seamless`` strategy fills with.
    """
    execu = execu or _Executor(model, _model_device(model), "fp32", None)
    key = (tuple(window), kind, execu.device.type, execu.precision, _version(model))
    cache = _FILLS.setdefault(model, {})
    if key not in cache:
        x = torch.ones((1, _in_channels(model), *window))
        y = execu.forward(execu._model("engine"), x)[0]
        y = ((y + 1.0) / 2.0).clamp_(0.0, 1.0).permute(1, 2, 0).numpy()
        if kind == "constant":
            h, w = window
            y = np.median(y[h // 4 : h - h // 4, w // 4 : w - w // 4], axis=(0, 1))
        cache[key] = y.astype(np.float32)
    return cache[key]


# ----------------------------------------------------------------------------------------------
# stain_region


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


def _auto_batch(model: nn.Module, window: tuple[int, int], device: torch.device) -> int:
    per = bytes_per_pixel(model) * window[0] * window[1]
    cap = 4 if device.type == "cpu" else 64  # CPU gains nothing from bigger batches
    return int(max(1, min(cap, _available_bytes(device) // max(per, 1.0))))


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
    img = _check_rgb(linear_rgb, _in_channels(model))
    dev = resolve_device(device)
    execu = _Executor(model, dev, precision, runner)
    tile = int(tile)
    info: dict[str, Any] = {"strategy": strategy, "tile": tile}
    if strategy == "seamless":
        out = _stain_seamless(
            img, model, execu, tile, origin, skip_background, progress, cancel, info,
            max_block_pixels, subdivisions,
        )  # fmt: skip
    else:
        out = _stain_tiled(
            img, model, execu, strategy, tile, origin, batch_size, skip_background, progress,
            cancel, info,
        )  # fmt: skip
    info.update(device=str(execu.device), precision=execu.precision)
    info["work"] = info["model_pixels"] / float(img.shape[0] * img.shape[1])
    if report is not None:
        report.update(info)
    return out


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("stain_region was cancelled")


def _stain_tiled(
    img: np.ndarray,
    model: nn.Module,
    execu: _Executor,
    strategy: str,
    tile: int,
    origin: tuple[int, int],
    batch_size: int | str,
    skip_background: bool,
    progress: Callable[[int, int], None] | None,
    cancel: Callable[[], bool] | None,
    info: dict[str, Any],
) -> np.ndarray:
    mult, mins = size_multiple(model), min_size(model)
    plan = plan_tiles(strategy, img.shape[:2], tile, multiple=mult, min_size=mins, origin=origin)
    padded = pad_reflect(img, plan.pad)
    wh, ww = plan.window
    y0, y1, x0, x1 = plan.crop
    weight = None if plan.weight is None else plan.weight.astype(np.float32)[..., None]
    starts = [tuple(map(int, s)) for s in plan.starts]
    background = [skip_background and is_background(padded[y : y + wh, x : x + ww])
                  for y, x in starts]  # fmt: skip
    todo = [k for k, bg in enumerate(background) if not bg]
    if batch_size == "auto":
        bs = _auto_batch(model, plan.window, execu.device)
    else:
        bs = int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be ≥ 1 or 'auto', got {batch_size!r}")
    canvas: np.ndarray | None = None

    def place(k: int, out_hwc: np.ndarray) -> None:
        nonlocal canvas
        if canvas is None:
            canvas = np.zeros((*plan.padded_shape, out_hwc.shape[-1]), dtype=np.float32)
        y, x = starts[k]
        part = out_hwc[y0:y1, x0:x1]
        dst = canvas[y + y0 : y + y1, x + x0 : x + x1]
        if weight is None:
            dst[...] = part
        else:
            dst += weight * part

    total = len(starts)  # progress counts windows (batches may shrink on OOM)
    done = 0
    if len(todo) < len(starts):
        _check_cancel(cancel)
        fill = background_response(model, plan.window, execu=execu)
        for k, bg in enumerate(background):
            if bg:
                place(k, fill)
        done += len(starts) - len(todo)
        if progress is not None:
            progress(done, total)
    xt = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))).mul_(2.0).sub_(1.0)
    i = 0
    while i < len(todo):
        _check_cancel(cancel)
        chunk = todo[i : i + bs]
        batch = torch.stack([xt[:, y : y + wh, x : x + ww] for y, x in (starts[k] for k in chunk)])
        try:
            out = execu.forward(execu._model("engine"), batch)
        except _OOM as exc:
            if bs > 1:
                bs = max(1, bs // 2)
            else:
                execu.fall_back(str(exc))
            continue
        out = ((out + 1.0) / 2.0).clamp_(0.0, 1.0).permute(0, 2, 3, 1).numpy()
        for k, o in zip(chunk, out, strict=True):
            place(k, o)
        i += len(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    assert canvas is not None
    (t, _), (left, _) = plan.pad
    h, w = plan.shape
    info.update(
        model_pixels=len(todo) * wh * ww,
        windows=len(starts),
        skipped=len(starts) - len(todo),
        batch_size=bs,
    )
    return np.clip(canvas[t : t + h, left : left + w], 0.0, 1.0)


def _stain_seamless(
    img: np.ndarray,
    model: nn.Module,
    execu: _Executor,
    tile: int,
    origin: tuple[int, int],
    skip_background: bool,
    progress: Callable[[int, int], None] | None,
    cancel: Callable[[], bool] | None,
    info: dict[str, Any],
    max_block_pixels: float | None,
    subdivisions: int,
) -> np.ndarray:
    mult, mins = size_multiple(model), min_size(model)
    if tile < mins or tile % mult:
        raise ValueError(
            f"tile {tile} must be a multiple of the model's size multiple {mult} and ≥ {mins}"
        )
    h, w = img.shape[:2]
    hp, wp = max(round_up(h, mult), mins), max(round_up(w, mult), mins)
    padded = pad_reflect(img, ((0, hp - h), (0, wp - w)))
    margin = default_margin(tile, mult)
    while True:
        budget = max_block_pixels
        if budget is None:
            budget = _available_bytes(execu.device) / bytes_per_pixel(model)
        blocks = plan_blocks(
            (hp, wp), tile, origin, max_pixels=budget, margin=margin, multiple=mult
        )
        try:
            out = _seamless_blocks(padded, model, execu, tile, origin, blocks, skip_background,
                                   progress, cancel, subdivisions)  # fmt: skip
            break
        except _OOM as exc:
            # Halve the block area and start again (blocks are cheap to re-plan); at one tile
            # per block there is nothing left to shrink.
            smallest = (tile + 2 * margin) ** 2
            if min(b.pixels for b in blocks) <= smallest:
                execu.fall_back(str(exc))
                max_block_pixels = None
            else:
                max_block_pixels = max(smallest, max(b.pixels for b in blocks) / 2)
    out_img, model_pixels, skipped = out
    info.update(model_pixels=model_pixels, windows=len(blocks), skipped=skipped,
                blocks=len(blocks), margin=margin)  # fmt: skip
    return out_img[:h, :w]


def _seamless_blocks(
    padded: np.ndarray,
    model: nn.Module,
    execu: _Executor,
    tile: int,
    origin: tuple[int, int],
    blocks: list,
    skip_background: bool,
    progress: Callable[[int, int], None] | None,
    cancel: Callable[[], bool] | None,
    subdivisions: int,
) -> tuple[np.ndarray, int, int]:
    net = execu._model("engine")
    assert isinstance(net, SeamlessModel)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None].mul_(2.0).sub_(1.0)
    hp, wp = padded.shape[:2]
    todo, skipped = [], []
    for blk in blocks:
        if skip_background and _all_tiles_background(
            padded[blk.y0 : blk.y1, blk.x0 : blk.x1], tile, origin, (blk.y0, blk.x0)
        ):
            skipped.append(blk)
        else:
            todo.append(blk)
    total = len(blocks)
    state = {"done": 0}

    def on_block(_k: int) -> None:
        state["done"] += 1
        if progress is not None:
            progress(state["done"], total)

    result: torch.Tensor | None = None
    if todo:

        def forward(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
            _check_cancel(cancel)  # before every block
            return execu.forward(m, t)

        result = run_region(x, net, tile, origin, todo, forward=forward, on_block=on_block,
                            subdivisions=subdivisions)  # fmt: skip
    if skipped:
        fill = background_response(model, (tile, tile), kind="constant", execu=execu)
        if result is None:
            result = torch.zeros((1, len(fill), hp, wp))
        fill_t = torch.as_tensor(fill * 2.0 - 1.0).view(1, -1, 1, 1)
        for blk in skipped:
            wgt = torch.as_tensor(np.outer(blk.wy, blk.wx), dtype=torch.float32)
            if len(blocks) == 1:
                result[...] = fill_t
            else:
                result[:, :, blk.y0 : blk.y1, blk.x0 : blk.x1] += wgt * fill_t
            on_block(0)
    assert result is not None
    out = ((result[0] + 1.0) / 2.0).clamp_(0.0, 1.0).permute(1, 2, 0).numpy()
    if skip_background and todo:
        _fill_background_cells(padded, out, model, execu, tile, origin)
    return out, sum(b.pixels for b in todo), len(skipped)


def _fill_background_cells(
    padded: np.ndarray,
    out: np.ndarray,
    model: nn.Module,
    execu: _Executor,
    tile: int,
    origin: tuple[int, int],
) -> None:
    """Give tissue-free statistics cells of computed blocks the background fill.

    Instance norm divides by the standard deviation of its window; on a tissue-free window
    that is the faint noise of the background, which the generator then amplifies into
    coloured texture. ``independent`` never runs such windows (it fills them), and the
    viewer's tiles skip them too; a large block with some tissue would otherwise run them.
    Filling them here makes every strategy and every block size show the same background.
    """
    h, w = padded.shape[:2]
    ys = sorted({0, h, *range(origin[0] % tile, h, tile)})
    xs = sorted({0, w, *range(origin[1] % tile, w, tile)})
    fill = None
    for a, b in itertools.pairwise(ys):
        for c, d in itertools.pairwise(xs):
            if b > a and d > c and is_background(padded[a:b, c:d]):
                if fill is None:
                    fill = background_response(model, (tile, tile), kind="constant", execu=execu)
                out[a:b, c:d] = fill


def _all_tiles_background(
    part: np.ndarray, tile: int, origin: tuple[int, int], offset: tuple[int, int]
) -> bool:
    """Whether every statistics tile (grid cell) overlapping ``part`` is background."""
    h, w = part.shape[:2]
    fy = (origin[0] - offset[0]) % tile
    fx = (origin[1] - offset[1]) % tile
    ys = sorted({0, h, *range(fy, h, tile)})
    xs = sorted({0, w, *range(fx, w, tile)})
    return all(
        is_background(part[a:b, c:d])
        for a, b in itertools.pairwise(ys)
        for c, d in itertools.pairwise(xs)
        if b > a and d > c
    )


# ----------------------------------------------------------------------------------------------
# despeckle_region


def receptive_radius(model: nn.Module, *, channels: int = 1) -> int:
    """Context (pixels each side) a fully convolutional model's output depends on.

    ``model.halo`` if it has one; otherwise measured by perturbing the centre pixel of a
    random probe image and finding how far the output changes.
    """
    halo = getattr(model, "halo", None)
    if halo is not None:
        return int(halo)
    side = 129
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, channels, side, side), generator=gen) * 0.8 + 0.1
    x2 = x.clone()
    x2[..., side // 2, side // 2] += 0.05
    dev = _model_device(model)
    with torch.inference_mode():
        diff = (model(x.to(dev)) - model(x2.to(dev))).abs().sum(dim=(0, 1)).cpu().numpy()
    ys, xs = np.nonzero(diff > 0)
    if len(ys) == 0:
        return 0
    radius = int(max(np.abs(ys - side // 2).max(), np.abs(xs - side // 2).max()))
    if radius >= side // 2 - 1:
        raise ValueError("despeckle model's receptive field is too large to tile safely")
    return radius


def despeckle_region(
    r: np.ndarray,
    model: nn.Module,
    *,
    median: bool = True,
    tile: int = 1024,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    runner: Runner | None = None,
) -> np.ndarray:
    """Despeckle a reflectance region with overlapping tiles, then an optional 3×3 median.

    Each tile is read with a context of the net's receptive radius on every side (clipped at
    the image edges, where the net pads exactly as it would on the whole image), and only its
    centre is kept, so the result equals one pass over the whole region up to float rounding.

    Parameters
    ----------
    r
        ``(H, W)`` reflectance in [0, 1].
    model
        A DespeckleNN-like net: ``(B, 1, h, w) → (B, 1, h, w)``, any ``h, w``.
    median
        Apply ``scipy.ndimage.median_filter(size=3, mode="reflect")`` afterwards (Combalia).
    tile
        Output tile side.
    device, precision
        As for :func:`stain_region` (default fp32: despeckling feeds a log/exp skip).
    runner
        Test seam, as for :func:`stain_region`.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 in [0, 1].
    """
    arr = np.asarray(r)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"despeckle_region expects an (H, W) reflectance array, got {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if tile < 1:
        raise ValueError(f"despeckle_region: tile must be ≥ 1, got {tile}")
    dev = resolve_device(device)
    execu = _Executor(model, dev, precision, runner)
    halo = receptive_radius(model)
    h, w = arr.shape
    out = np.empty((h, w), dtype=np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            y0, y1 = ty, min(h, ty + tile)
            x0, x1 = tx, min(w, tx + tile)
            a0, a1 = max(0, y0 - halo), min(h, y1 + halo)
            b0, b1 = max(0, x0 - halo), min(w, x1 + halo)
            while True:
                try:
                    y = execu.forward(execu._model("plain"), xt[:, :, a0:a1, b0:b1])
                    break
                except _OOM as exc:
                    execu.fall_back(str(exc))
            out[y0:y1, x0:x1] = y[0, 0, y0 - a0 : y1 - a0, x0 - b0 : x1 - b0].numpy()
    if median:
        from scipy.ndimage import median_filter

        out = median_filter(out, size=3, mode="reflect")
    return np.clip(out, 0.0, 1.0, out=out)


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
    from napari_confocal_stain.core.seams import seam_index
    from napari_confocal_stain.core.tiling import seam_period

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


__all__ = [
    "BACKGROUND_DARKNESS",
    "BACKGROUND_TISSUE_FRACTION",
    "Cancelled",
    "background_response",
    "bytes_per_pixel",
    "cpu_precision",
    "default_runner",
    "despeckle_region",
    "is_background",
    "measure_seam_index",
    "min_size",
    "receptive_radius",
    "resolve_device",
    "resolve_precision",
    "size_multiple",
    "stain_region",
]
