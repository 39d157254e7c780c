"""Geometry of an export: the region, its chunk grid and the output pyramid (pure functions).

An export covers a rectangle of level 0 of a slide (the whole slide or ``--region``). It is
cut into square *chunks* of ``tile`` pixels anchored at the region's corner; a chunk is the
unit of work, of resumption and of progress. Output level ``k + 1`` is the 2×2 mean of level
``k`` (odd edge row/column dropped, as the reader's lazy pyramid does), down to the first
level whose larger side is at most :data:`COARSEST_SIDE`.

Storage chunks are ``tile // 2`` pixels a side on every level, so a level-0 chunk is exactly
2×2 storage chunks and its 2×2 mean is exactly one storage chunk of level 1: both are
written whole by the task that computes the chunk, with no read-modify-write shared between
tasks (which would race between workers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from napari_confocal_stain.core.box import Box

__all__ = [
    "COARSEST_SIDE",
    "ExportPlan",
    "chunk_boxes",
    "level_shapes",
    "parse_region",
]

COARSEST_SIDE = 512
"""The output pyramid stops at the first level whose larger side is at most this (one
storage chunk at the default tile): small enough for a slide overview in QuPath."""


_REGION = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_region(text: str | None, shape: tuple[int, int] | None = None) -> Box:
    """Parse ``"y0:y1,x0:x1"`` (level-0 pixels, half-open) and check it lies in ``shape``.

    Parameters
    ----------
    text
        The region, or ``None`` for the whole slide.
    shape
        Level-0 ``(height, width)`` of the slide; ``None`` checks the text's form only
        (``text`` is then required).

    Returns
    -------
    tuple
        ``(y0, y1, x0, x1)``.

    Raises
    ------
    ValueError
        Malformed, empty, or outside the slide.
    """
    if text is None:
        if shape is None:
            raise ValueError("a region is required when the slide's shape is not given")
        return 0, shape[0], 0, shape[1]
    m = _REGION.match(text)
    if m is None:
        raise ValueError(f"region must look like y0:y1,x0:x1 (e.g. 0:4096,0:8192), got {text!r}")
    y0, y1, x0, x1 = (int(v) for v in m.groups())
    if not (y0 < y1 and x0 < x1):
        raise ValueError(f"region {text!r} is empty (need y0 < y1 and x0 < x1)")
    if shape is not None and (y1 > shape[0] or x1 > shape[1]):
        h, w = shape
        raise ValueError(f"region {text!r} extends beyond the slide of {h}x{w} px")
    return y0, y1, x0, x1


def level_shapes(shape: tuple[int, int], coarsest: int = COARSEST_SIDE) -> list[tuple[int, int]]:
    """``(H, W)`` of every output level: halved (floor) until the larger side ≤ ``coarsest``.

    Parameters
    ----------
    shape
        Level-0 ``(H, W)`` of the exported region.
    coarsest
        Stop at the first level whose larger side is at most this.

    Returns
    -------
    list of tuple
    """
    out = [(int(shape[0]), int(shape[1]))]
    while max(out[-1]) > coarsest and min(out[-1]) >= 2:
        h, w = out[-1]
        out.append((h // 2, w // 2))
    return out


def chunk_boxes(shape: tuple[int, int], tile: int) -> dict[tuple[int, int], Box]:
    """Chunks ``(i, j) → (y0, y1, x0, x1)`` of ``shape`` cut every ``tile`` px (edges cropped)."""
    h, w = shape
    return {
        (i, j): (y, min(h, y + tile), x, min(w, x + tile))
        for i, y in enumerate(range(0, h, tile))
        for j, x in enumerate(range(0, w, tile))
    }


@dataclass(frozen=True)
class ExportPlan:
    """Where an export's chunks lie.

    Attributes
    ----------
    region
        ``(y0, y1, x0, x1)`` of the slide's level 0 that is exported.
    tile
        Chunk side (px of level 0), even; storage chunks are ``tile // 2``.
    levels
        ``(H, W)`` of each output level, level 0 (the region's size) first.
    """

    region: Box
    tile: int
    levels: tuple[tuple[int, int], ...]

    @classmethod
    def make(cls, region: Box, tile: int) -> ExportPlan:
        """Plan an export of ``region`` in chunks of ``tile`` px.

        Raises
        ------
        ValueError
            ``tile`` is not an even number of at least 64.
        """
        tile = int(tile)
        if tile < 64 or tile % 64:
            raise ValueError(f"tile must be a multiple of 64 px (>= 64), got {tile}")
        y0, y1, x0, x1 = region
        return cls(tuple(region), tile, tuple(level_shapes((y1 - y0, x1 - x0))))

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 output ``(H, W)``."""
        return self.levels[0]

    @property
    def store_chunk(self) -> int:
        """Storage chunk side on every level."""
        return self.tile // 2

    def chunks(self, level: int = 0) -> dict[tuple[int, int], Box]:
        """Work chunks of an output level in that level's pixels.

        Level 0 is cut every ``tile`` px; coarser levels (built from the level above) every
        ``tile // 2`` px, one storage chunk each, reading a ``tile``² box of the level above.
        """
        return chunk_boxes(self.levels[level], self.tile if level == 0 else self.store_chunk)

    def slide_box(self, box: Box) -> Box:
        """A level-0 output box in slide pixels (shifted by the region's corner)."""
        y0, _, x0, _ = self.region
        return box[0] + y0, box[1] + y0, box[2] + x0, box[3] + x0

    def neighbours(self, ij: tuple[int, int]) -> list[tuple[int, int]]:
        """The level-0 chunks in the 3×3 block around ``ij`` (itself included) that exist."""
        h, w = self.shape
        ni, nj = -(-h // self.tile), -(-w // self.tile)
        i, j = ij
        return [
            (a, b)
            for a in range(i - 1, i + 2)
            for b in range(j - 1, j + 2)
            if 0 <= a < ni and 0 <= b < nj
        ]
