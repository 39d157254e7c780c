"""Despeckle reflectance of any size with a DespeckleNN: :func:`despeckle_region`.

Overlapping tiles, each read with the net's receptive radius of context and cut to its
centre, reproduce a single pass over the whole region exactly (up to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch import nn

from napari_confocal_stain.inference.device import resolve_device
from napari_confocal_stain.inference.executor import DeviceOutOfMemory, Executor, Runner
from napari_confocal_stain.inference.geometry import receptive_radius

__all__ = ["despeckle_region"]


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
    execu = Executor(model, dev, precision, runner)
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
                    y = execu.forward(execu.model("plain"), xt[:, :, a0:a1, b0:b1])
                    break
                except DeviceOutOfMemory as exc:
                    execu.fall_back(str(exc))
            out[y0:y1, x0:x1] = y[0, 0, y0 - a0 : y1 - a0, x0 - b0 : x1 - b0].numpy()
    if median:
        out = median_filter(out, size=3, mode="reflect")
    return np.clip(out, 0.0, 1.0, out=out)
