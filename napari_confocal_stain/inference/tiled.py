"""The thesis's tiling strategies: windows run one by one (in batches) and blended.

``independent``, ``crop``, ``pyramid`` and ``pyramid-flat`` (thesis §3.4) place windows as
:func:`napari_confocal_stain.core.tiling.plan_tiles` says, run each through the engine's copy
of the model, and crop or blend them into the canvas. Tissue-free windows are filled with
the model's background response instead of being run.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_confocal_stain.core.tiling import pad_reflect, plan_tiles
from napari_confocal_stain.inference.background import background_response, is_background
from napari_confocal_stain.inference.executor import DeviceOutOfMemory, RegionRun, auto_batch

__all__ = ["stain_tiled"]


def stain_tiled(run: RegionRun, strategy: str, batch_size: int | str) -> np.ndarray:
    """Stain ``run.image`` with one of the windowed strategies.

    Parameters
    ----------
    run
        The region, model, executor and callbacks.
    strategy
        ``"independent"``, ``"crop"``, ``"pyramid"`` or ``"pyramid-flat"``.
    batch_size
        Windows per forward pass, or ``"auto"`` (from free memory).

    Returns
    -------
    numpy.ndarray
        ``(H, W, C')`` float32 in [0, 1]; ``run.info`` gets ``model_pixels``, ``windows``,
        ``skipped`` and ``batch_size``.
    """
    img, model, execu = run.image, run.model, run.executor
    plan = plan_tiles(strategy, img.shape[:2], run.tile, multiple=run.multiple,
                      min_size=run.min_size, origin=run.origin)  # fmt: skip
    padded = pad_reflect(img, plan.pad)
    wh, ww = plan.window
    starts = [tuple(map(int, s)) for s in plan.starts]
    background = [run.skip_background and is_background(padded[y : y + wh, x : x + ww])
                  for y, x in starts]  # fmt: skip
    todo = [k for k, bg in enumerate(background) if not bg]
    if batch_size == "auto":
        bs = auto_batch(model, plan.window, execu.device)
    else:
        bs = int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be ≥ 1 or 'auto', got {batch_size!r}")
    canvas = _Canvas(plan)
    total = len(starts)  # progress counts windows (batches may shrink on OOM)
    done = 0
    if len(todo) < len(starts):
        run.check_cancel()
        fill = background_response(model, plan.window, execu=execu)
        for k, bg in enumerate(background):
            if bg:
                canvas.place(starts[k], fill)
        done += len(starts) - len(todo)
        run.report(done, total)
    xt = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))).mul_(2.0).sub_(1.0)
    i = 0
    while i < len(todo):
        run.check_cancel()
        chunk = todo[i : i + bs]
        batch = torch.stack([xt[:, y : y + wh, x : x + ww] for y, x in (starts[k] for k in chunk)])
        try:
            out = execu.forward(execu.model("engine"), batch)
        except DeviceOutOfMemory as exc:
            if bs > 1:
                bs = max(1, bs // 2)
            else:
                execu.fall_back(str(exc))
            continue
        out = ((out + 1.0) / 2.0).clamp_(0.0, 1.0).permute(0, 2, 3, 1).numpy()
        for k, o in zip(chunk, out, strict=True):
            canvas.place(starts[k], o)
        i += len(chunk)
        done += len(chunk)
        run.report(done, total)
    run.info.update(
        model_pixels=len(todo) * wh * ww,
        windows=len(starts),
        skipped=len(starts) - len(todo),
        batch_size=bs,
    )
    return canvas.result()


class _Canvas:
    """The padded output: each window's kept part written (or blended) at its place."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.weight = None if plan.weight is None else plan.weight.astype(np.float32)[..., None]
        self.data: np.ndarray | None = None

    def place(self, start: tuple[int, int], out_hwc: np.ndarray) -> None:
        if self.data is None:
            shape = (*self.plan.padded_shape, out_hwc.shape[-1])
            self.data = np.zeros(shape, dtype=np.float32)
        y, x = start
        y0, y1, x0, x1 = self.plan.crop
        part = out_hwc[y0:y1, x0:x1]
        dst = self.data[y + y0 : y + y1, x + x0 : x + x1]
        if self.weight is None:
            dst[...] = part
        else:
            dst += self.weight * part

    def result(self) -> np.ndarray:
        assert self.data is not None
        (t, _), (left, _) = self.plan.pad
        h, w = self.plan.shape
        return np.clip(self.data[t : t + h, left : left + w], 0.0, 1.0)
