"""The one rectangle type every layer passes around: ``Box = (y0, y1, x0, x1)``."""

from __future__ import annotations

__all__ = ["Box", "box_shape"]

Box = tuple[int, int, int, int]
"""Rows ``y0:y1`` and columns ``x0:x1`` of one image or pyramid level, in its own pixels
(half-open, like slices)."""


def box_shape(box: Box) -> tuple[int, int]:
    """``(height, width)`` of a box.

    Parameters
    ----------
    box
        ``(y0, y1, x0, x1)``.

    Returns
    -------
    tuple of int
    """
    y0, y1, x0, x1 = box
    return y1 - y0, x1 - x0
