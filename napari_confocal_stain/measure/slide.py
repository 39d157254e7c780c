"""Hallucination metrics of a slide, cell by cell: the (Qt-free) measuring engine.

``confocal-stain metrics`` (:mod:`napari_confocal_stain.cli.metrics`) and the napari
Heatmaps widget both measure through this module, so a cell gets the same numbers in the
viewer and on the command line:

* :func:`measure_block` — pure arrays: the per-cell LBP χ², SSIM and nuclei maps of a
  region, given its linear stain (source), its stained output and its fluorescence.
* :func:`measure_box` — one box of one pyramid level of a slide through a
  :class:`~napari_confocal_stain.engine.pipeline.StainPipeline` (or any other output).
* :func:`measure_slide` — a whole slide (or a region) streamed chunk by chunk.
* :class:`SlideMaps` — the slide-wide cell grid the blocks are pasted into.

Conventions
    The cell grid is anchored at level-0 pixel (0, 0) with ``cell`` level-0 pixels a side.
    At pyramid level ``k`` (downsample ``2**k``) the same cells are measured from that
    level's own pixels, ``cell / 2**k`` a side, so the maps of every level share one grid
    (coarse levels are a quick overview; the thesis measured full resolution). Both images
    are compared as the viewer shows them: uint8 RGB (``to_uint8``), luminance per
    :func:`~napari_confocal_stain.core.metrics.luminance`. Nuclei are only counted where a
    pixel is at most :data:`NUCLEI_MAX_PIXEL_UM` (LoG detection of 5 µm nuclei needs a few
    pixels per nucleus); elsewhere the nuclei maps are NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.engine.pipeline import StainPipeline

__all__ = [
    "CHUNK_PX",
    "CONTEXT_PX",
    "DEFAULT_THRESHOLDS",
    "MAP_NAMES",
    "MIN_CELL_PX",
    "NUCLEI_MAX_PIXEL_UM",
    "CellBlock",
    "OutputReader",
    "SlideMaps",
    "chunk_boxes",
    "flag_cells",
    "level_cell",
    "measure_block",
    "measure_box",
    "measure_slide",
    "nuclei_maps",
    "slide_chunks",
]


#: Per-cell maps, in order: texture and structure (thesis §3.5), then nuclei.
MAP_NAMES = ("lbp_chi2", "ssim", "nuclei_preserved", "nuclei_erased", "nuclei_invented")
#: Smallest cell side (pixels of the measured level): SSIM's 11-px window plus its border.
MIN_CELL_PX = 32
#: Nuclei are detected only at levels with pixels at most this size (µm).
NUCLEI_MAX_PIXEL_UM = 1.0
#: Context (pixels) read around a box for the nuclei detectors and the GAN.
CONTEXT_PX = 64
#: Default level-0 chunk side of :func:`measure_slide` (rounded to whole cells).
CHUNK_PX = 2048
#: When a cell is flagged as a likely hallucination: ``metric: (">" or "<", value)``.
#: χ²: the thesis's models average 0.018 (U-Net) and 0.033 (ResNet) on real slides;
#: SSIM: 0.56 and 0.50. A cell well outside those, or with an erased or invented nucleus,
#: deserves a look.
DEFAULT_THRESHOLDS: dict[str, tuple[str, float]] = {
    "lbp_chi2": (">", 0.08),
    "ssim": ("<", 0.3),
    "nuclei_erased": (">", 0.5),
    "nuclei_invented": (">", 0.5),
}


# ----------------------------------------------------------------------------- geometry


def level_cell(cell: int, downsample: float) -> int:
    """Cell side in pixels of a level with the given downsample factor.

    Parameters
    ----------
    cell
        Level-0 cell side in pixels.
    downsample
        Level-0 size / level size (1, 2, 4, …).

    Returns
    -------
    int
        ``cell / downsample``.

    Raises
    ------
    ValueError
        The cell does not divide into whole pixels at that level, or is smaller than
        :data:`MIN_CELL_PX` there.
    """
    cell = int(cell)
    ds = float(downsample)
    size = cell / ds
    if abs(size - round(size)) > 1e-6:
        raise ValueError(
            f"a {cell}-px cell is not a whole number of pixels at downsample {ds:g}; "
            "use a power-of-two cell"
        )
    size = round(size)
    if size < MIN_CELL_PX:
        raise ValueError(
            f"a {cell}-px cell is only {size} px at downsample {ds:g} (minimum {MIN_CELL_PX}); "
            "use a finer level or a bigger cell"
        )
    return size


def chunk_boxes(shape: tuple[int, int], cell_px: int, region: Box | None, chunk: int) -> list[Box]:
    """Cut a level (or a region of it) into cell-aligned boxes of about ``chunk`` pixels.

    Parameters
    ----------
    shape
        ``(H, W)`` of the level.
    cell_px
        Cell side at this level.
    region
        ``(y0, y1, x0, x1)`` in this level's pixels (snapped outwards to the cell grid),
        or None for the whole level.
    chunk
        Wanted chunk side in pixels (rounded to whole cells, at least one).

    Returns
    -------
    list of (y0, y1, x0, x1)
        Row-major boxes clipped to the level; every box starts on a cell corner.
    """
    h, w = (int(v) for v in shape)
    if region is None:
        region = (0, h, 0, w)
    y0, y1, x0, x1 = (int(v) for v in region)
    y0, x0 = max(0, y0) // cell_px * cell_px, max(0, x0) // cell_px * cell_px
    y1, x1 = min(h, -(-y1 // cell_px) * cell_px), min(w, -(-x1 // cell_px) * cell_px)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"region {region} does not overlap the level of shape {(h, w)}")
    step = max(1, round(chunk / cell_px)) * cell_px
    return [
        (a, min(y1, a + step), b, min(x1, b + step))
        for a in range(y0, y1, step)
        for b in range(x0, x1, step)
    ]


# ----------------------------------------------------------------------------- measuring


def _cell_index(points: np.ndarray, cell: int, grid: tuple[int, int]) -> np.ndarray:
    """Flat cell index of each ``(y, x)`` (the cell of pixel ``round(y), round(x)``)."""
    iy = np.clip(np.floor(points[:, 0] + 0.5).astype(np.intp) // cell, 0, grid[0] - 1)
    ix = np.clip(np.floor(points[:, 1] + 0.5).astype(np.intp) // cell, 0, grid[1] - 1)
    return iy * grid[1] + ix


def _inside(points: np.ndarray, box: Box) -> np.ndarray:
    y = np.floor(points[:, 0] + 0.5)
    x = np.floor(points[:, 1] + 0.5)
    return (y >= box[0]) & (y < box[1]) & (x >= box[2]) & (x < box[3])


def measure_block(
    source: np.ndarray,
    output: np.ndarray,
    f: np.ndarray | None,
    cell_px: int,
    *,
    inner: Box | None = None,
    pixel_size_um: float = 0.75,
    workers: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-cell metrics of one region from its source stain, output stain and F.

    Parameters
    ----------
    source, output
        ``(H, W, 3)`` linear stain and stained output (uint8 or floats in [0, 1]), read
        with some context around the measured region.
    f
        ``(H, W)`` fluorescence in [0, 1] of the same pixels, or None to skip nuclei.
    cell_px
        Cell side in pixels of these arrays.
    inner
        ``(y0, y1, x0, x1)`` of the measured region inside the arrays (default: all of
        them); cell (0, 0) starts at its corner. The rest is context: LBP and SSIM never
        look across a cell border, the nuclei detectors use it so a nucleus on the
        region's edge is found as in the whole slide.
    pixel_size_um
        Pixel size of these arrays (for the nuclear diameters).
    workers
        Threads for the metrics (default one per CPU).

    Returns
    -------
    maps : dict
        ``{name: (ny, nx) float64}`` for every name of :data:`MAP_NAMES` (nuclei maps NaN
        when ``f`` is None; ``nuclei_preserved`` NaN in cells without F nuclei).
    points : dict
        ``{"erased", "invented", "preserved"}`` → ``(K, 2)`` ``(y, x)`` relative to the
        corner of ``inner``; erased and preserved are F centres, invented output centres.
    """
    from napari_confocal_stain.core.metrics import cell_grid_shape, hallucination_maps

    h, w = source.shape[:2]
    if inner is None:
        inner = (0, h, 0, w)
    y0, y1, x0, x1 = inner
    grid = cell_grid_shape((y1 - y0, x1 - x0), cell_px)
    maps = hallucination_maps(source[y0:y1, x0:x1], output[y0:y1, x0:x1], cell_px, workers=workers)
    maps = {k: np.asarray(v, np.float64) for k, v in maps.items()}
    if f is None:
        empty = np.empty((0, 2))
        for name in MAP_NAMES[2:]:
            maps[name] = np.full(grid, np.nan)
        return maps, {"erased": empty, "invented": empty, "preserved": empty}
    nuclei, points = nuclei_maps(output, f, cell_px, inner, pixel_size_um, workers)
    maps.update(nuclei)
    return maps, points


def nuclei_maps(
    output: np.ndarray,
    f: np.ndarray,
    cell_px: int,
    inner: Box,
    pixel_size_um: float,
    workers: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-cell nuclei preserved / erased / invented of a region (see :func:`measure_block`).

    Nuclei are detected in all of ``f`` and ``output`` (the context included, so a nucleus
    on the region's edge is found as in the whole slide) and counted in the cell of their
    centre inside ``inner``.

    Returns
    -------
    maps : dict
        ``nuclei_preserved`` (NaN in cells without F nuclei), ``nuclei_erased``,
        ``nuclei_invented``, each ``(ny, nx)`` float64.
    points : dict
        ``{"erased", "invented", "preserved"}`` → ``(K, 2)`` ``(y, x)`` relative to the
        corner of ``inner``.
    """
    from napari_confocal_stain.core.metrics import cell_grid_shape
    from napari_confocal_stain.core.nuclei import (
        detect_nuclei_fluorescence,
        detect_nuclei_he,
        match_nuclei,
    )

    y0, y1, x0, x1 = inner
    grid = cell_grid_shape((y1 - y0, x1 - x0), cell_px)
    diameter = (5.0, 14.0)
    src = detect_nuclei_fluorescence(f, pixel_size_um, diameter, workers=workers)
    out = detect_nuclei_he(output, pixel_size_um, diameter, workers=workers)
    match = match_nuclei(src, out, diameter[0] / pixel_size_um)
    offset = np.array([y0, x0], np.float64)
    sets = {
        "preserved": src[match.pairs[:, 0], :2],
        "erased": src[match.unmatched_a, :2],
        "invented": out[match.unmatched_b, :2],
    }
    points, counts = {}, {}
    for name, pts in sets.items():
        pts = pts[_inside(pts, inner)] - offset if len(pts) else np.empty((0, 2))
        points[name] = pts
        flat = _cell_index(pts, cell_px, grid) if len(pts) else np.empty(0, np.intp)
        counts[name] = np.bincount(flat, minlength=grid[0] * grid[1]).reshape(grid)
    n_src = counts["preserved"] + counts["erased"]
    with np.errstate(invalid="ignore", divide="ignore"):
        preserved = np.where(n_src > 0, counts["preserved"] / np.maximum(n_src, 1), np.nan)
    maps = {
        "nuclei_preserved": preserved,
        "nuclei_erased": counts["erased"].astype(np.float64),
        "nuclei_invented": counts["invented"].astype(np.float64),
    }
    return maps, points


@dataclass
class CellBlock:
    """The measured cells of one box of one level, in slide (level-0) terms."""

    #: Pyramid level measured.
    level: int
    #: Slide-grid index ``(iy, ix)`` of the block's first cell.
    origin: tuple[int, int]
    #: ``{name: (ny, nx)}`` maps (see :data:`MAP_NAMES`).
    maps: dict[str, np.ndarray]
    #: ``{"erased", "invented", "preserved"}`` → ``(K, 2)`` level-0 pixel ``(y, x)``.
    points: dict[str, np.ndarray]


OutputReader = Callable[[int, Box], np.ndarray]
"""``output(level, box) -> uint8 (h, w, 3)``: the stained output to measure."""


def _uint8(image: np.ndarray) -> np.ndarray:
    from napari_confocal_stain.engine.pipeline import to_uint8

    image = np.asarray(image)
    return image if image.dtype == np.uint8 else to_uint8(image)


def measure_box(
    pipeline: StainPipeline,
    level: int,
    box: Box,
    cell: int,
    *,
    output: OutputReader | None = None,
    context: int = CONTEXT_PX,
    nuclei: bool | None = None,
    cancel: Callable[[], bool] | None = None,
    workers: int | None = None,
) -> CellBlock:
    """Measure the cells of one box of a slide level.

    Parameters
    ----------
    pipeline
        The slide and its stain settings; the source is ``pipeline.linear`` (the GAN's
        input) as uint8.
    level
        Pyramid level.
    box
        ``(y0, y1, x0, x1)`` in the level's pixels, starting on a cell corner.
    cell
        Level-0 cell side in pixels.
    output
        Reader of the stained output; default: ``pipeline.gan`` with ``context`` pixels.
    context
        Pixels read around the box (GAN context and nuclei halo).
    nuclei
        Count nuclei (default: when the level's pixel is ≤ :data:`NUCLEI_MAX_PIXEL_UM`).
    cancel
        Polled by the GAN; returning True raises
        :class:`~napari_confocal_stain.inference.Cancelled`.
    workers
        Threads for the metrics.

    Returns
    -------
    CellBlock
        The box's cells; points in level-0 pixels.

    Raises
    ------
    ValueError
        A box off the cell grid, or a cell too small at this level.
    """
    ds = float(pipeline.mosaic.downsample[level])
    cell_px = level_cell(cell, ds)
    h, w = pipeline.level_shapes[level]
    y0, y1, x0, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"box {box} is not inside level {level} of shape {(h, w)}")
    if y0 % cell_px or x0 % cell_px:
        raise ValueError(f"box {box} does not start on the {cell_px}-px cell grid")
    px = float(pipeline.mosaic.pixel_size_um) * ds
    if nuclei is None:
        nuclei = px <= NUCLEI_MAX_PIXEL_UM
    grown = pipeline.grown(level, box, context)
    source = _uint8(pipeline.linear(level, grown))
    if output is None:
        out = _uint8(pipeline.gan(level, box, context=context, cancel=cancel))
    else:
        out = _uint8(output(level, grown))
    if out.shape != source.shape:
        raise UsageError(
            f"the output's pixels at {grown} have shape {out.shape}, the slide's "
            f"{source.shape}: measure an output of the slide's size"
        )
    f = pipeline.raw(level, grown)[1] if nuclei else None
    gy0, _, gx0, _ = grown
    inner = (y0 - gy0, y1 - gy0, x0 - gx0, x1 - gx0)
    maps, pts = measure_block(
        source, out, f, cell_px, inner=inner, pixel_size_um=px, workers=workers
    )
    origin = np.array([y0, x0], np.float64)
    points = {k: (v + origin) * ds for k, v in pts.items()}
    return CellBlock(int(level), (y0 // cell_px, x0 // cell_px), maps, points)


@dataclass
class SlideMaps:
    """The per-cell maps of a whole slide, filled block by block.

    A cell keeps the measurement of the finest level that measured it (a coarse overview
    never overwrites a full-resolution value); points are replaced per cell likewise.

    Parameters
    ----------
    shape
        Level-0 ``(H, W)`` of the slide.
    cell
        Level-0 cell side in pixels.
    """

    shape: tuple[int, int]
    cell: int
    maps: dict[str, np.ndarray] = field(init=False)
    #: Level each cell was measured at (a large number where not measured).
    levels: np.ndarray = field(init=False)
    points: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.grid = (-(-int(self.shape[0]) // self.cell), -(-int(self.shape[1]) // self.cell))
        self.maps = {name: np.full(self.grid, np.nan) for name in MAP_NAMES}
        self.levels = np.full(self.grid, 255, np.int16)
        self.points = {k: np.empty((0, 2)) for k in ("erased", "invented", "preserved")}

    def add(self, block: CellBlock) -> tuple[slice, slice]:
        """Paste a block; returns the slide-grid slices it covered."""
        iy, ix = block.origin
        ny, nx = next(iter(block.maps.values())).shape
        ny, nx = min(ny, self.grid[0] - iy), min(nx, self.grid[1] - ix)
        sl = (slice(iy, iy + ny), slice(ix, ix + nx))
        take = self.levels[sl] >= block.level  # finer or equal levels replace
        for name in MAP_NAMES:
            self.maps[name][sl][take] = block.maps[name][:ny, :nx][take]
        self.levels[sl][take] = block.level
        replaced = np.zeros(self.grid, bool)
        replaced[sl] = take
        for name, pts in self.points.items():
            if len(pts):
                pts = pts[~replaced.ravel()[_cell_index(pts, self.cell, self.grid)]]
            new = block.points[name]
            if len(new):
                new = new[replaced.ravel()[_cell_index(new, self.cell, self.grid)]]
                pts = np.concatenate([pts, new])
            self.points[name] = pts
        return sl

    @property
    def measured(self) -> np.ndarray:
        """Boolean map of the cells measured at any level."""
        return self.levels < 255

    def crop(self, region: Box | None) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """The maps of the cells of a level-0 region, and its first cell's index."""
        if region is None:
            return {k: v.copy() for k, v in self.maps.items()}, (0, 0)
        y0, y1, x0, x1 = region
        c = self.cell
        sl = (slice(y0 // c, -(-y1 // c)), slice(x0 // c, -(-x1 // c)))
        return {k: v[sl].copy() for k, v in self.maps.items()}, (sl[0].start, sl[1].start)


def flag_cells(
    maps: Mapping[str, np.ndarray],
    thresholds: Mapping[str, tuple[str, float]] = DEFAULT_THRESHOLDS,
) -> np.ndarray:
    """Cells where any metric is beyond its threshold (likely hallucination).

    Parameters
    ----------
    maps
        ``{name: (ny, nx)}`` per-cell maps.
    thresholds
        ``{name: (">" or "<", value)}``; metrics missing from ``maps`` are ignored and NaN
        never counts as beyond.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` bool.
    """
    flagged = None
    for name, (op, value) in thresholds.items():
        if name not in maps:
            continue
        m = np.asarray(maps[name], np.float64)
        with np.errstate(invalid="ignore"):
            hit = m > value if op == ">" else m < value
        flagged = hit if flagged is None else flagged | hit
    if flagged is None:
        raise ValueError(f"none of the thresholded metrics {list(thresholds)} is in the maps")
    return flagged


def slide_chunks(
    pipeline: StainPipeline,
    level: int,
    cell: int,
    region: Box | None = None,
    chunk: int = CHUNK_PX,
) -> list[Box]:
    """The boxes :func:`measure_slide` measures, in the level's pixels.

    Parameters
    ----------
    pipeline, level, cell, region, chunk
        As for :func:`measure_slide` (``region`` in level-0 pixels).

    Returns
    -------
    list of (y0, y1, x0, x1)
        Cell-aligned boxes of the level, row-major.
    """
    ds = float(pipeline.mosaic.downsample[level])
    cell_px = level_cell(cell, ds)
    if region is not None:  # level-0 pixels -> this level's, outwards
        y0, y1, x0, x1 = region
        region = (int(y0 // ds), int(-(-y1 // ds)), int(x0 // ds), int(-(-x1 // ds)))
    side = max(cell_px, int(chunk / ds))
    return chunk_boxes(pipeline.level_shapes[level], cell_px, region, side)


def measure_slide(
    pipeline: StainPipeline,
    level: int,
    cell: int,
    *,
    region: Box | None = None,
    output: OutputReader | None = None,
    chunk: int = CHUNK_PX,
    context: int = CONTEXT_PX,
    nuclei: bool | None = None,
    cancel: Callable[[], bool] | None = None,
    workers: int | None = None,
) -> Iterator[tuple[int, int, CellBlock]]:
    """Stream a slide (or a region) through :func:`measure_box`, chunk by chunk.

    Parameters
    ----------
    pipeline, level, cell, output, context, nuclei, cancel, workers
        As for :func:`measure_box`.
    region
        ``(y0, y1, x0, x1)`` in **level-0** pixels (snapped outwards to the cell grid);
        None for the whole slide.
    chunk
        Level-0 chunk side (rounded to whole cells); memory is a few chunks.

    Yields
    ------
    (done, total, CellBlock)
        After each chunk.
    """
    boxes = slide_chunks(pipeline, level, cell, region, chunk)
    for i, box in enumerate(boxes):
        block = measure_box(
            pipeline, level, box, cell, output=output, context=context, nuclei=nuclei,
            cancel=cancel, workers=workers,
        )  # fmt: skip
        yield i + 1, len(boxes), block
