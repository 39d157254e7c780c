"""The PNG files the training commands write: crops, samples and sample grids.

Images are floats in [0, 1] (``(H, W)`` grey or ``(H, W, 3)`` RGB), rounded to 8 bits.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from napari_confocal_stain._fs import write_atomic

__all__ = ["grid_png", "png_bytes", "save_png", "tensor_image"]


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG of a float image in [0, 1] (values outside are clipped)."""
    from PIL import Image

    a = np.clip(np.asarray(image, np.float32), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((a * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Save a float image in [0, 1] (``(H, W)`` or ``(H, W, 3)``) as an 8-bit PNG, atomically."""
    return write_atomic(path, png_bytes(image))


def grid_png(path: str | Path, rows: Sequence[Sequence[np.ndarray]]) -> Path:
    """Save ``(H, W, 3)`` images as a grid, one list per row; short rows are padded white."""
    lines = [np.concatenate(r, axis=1) for r in rows]
    width = max(line.shape[1] for line in lines)
    lines = [
        np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=1)
        for line in lines
    ]
    return save_png(path, np.concatenate(lines, axis=0))


def tensor_image(t: torch.Tensor) -> np.ndarray:
    """A ``(3, H, W)`` generator tensor in [-1, 1] as an ``(H, W, 3)`` image in [0, 1]."""
    return np.clip((t.detach().float().cpu().numpy().transpose(1, 2, 0) + 1) / 2, 0, 1)
