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
* :func:`flag_block` — the calibrated hallucination flags
  (:func:`~napari_confocal_stain.measure.flags.flag_hallucinations`) of a region read with
  context; :func:`measure_box` adds them to every block when given a calibration
  (:func:`output_calibration`).

Conventions
    The cell grid is anchored at level-0 pixel (0, 0) with ``cell`` level-0 pixels a side.
    At pyramid level ``k`` (downsample ``2**k``) the same cells are measured from that
    level's own pixels, ``cell / 2**k`` a side, so the maps of every level share one grid
    (coarse levels are a quick overview; the thesis measured full resolution). Both images
    are compared as the viewer shows them: uint8 RGB (``to_uint8``), luminance per
    :func:`~napari_confocal_stain.core.metrics.luminance`. Nuclei are only counted where a
    pixel is at most :data:`NUCLEI_MAX_PIXEL_UM` (LoG detection of 5 µm nuclei needs a few
    pixels per nucleus); elsewhere the nuclei maps are NaN. The calibrated flags are
    computed at the same levels (and for cells of 64 to 1024 pixels there); elsewhere the
    flag maps are NaN and no cell is flagged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.engine.pipeline import StainPipeline

__all__ = [
    "CHUNK_PX",
    "CONTEXT_PX",
    "FLAG_CONTEXT_PX",
    "FLAG_NAMES",
    "FLAG_POINTS",
    "MAP_NAMES",
    "MIN_CELL_PX",
    "NUCLEI_MAX_PIXEL_UM",
    "CellBlock",
    "OutputReader",
    "SlideMaps",
    "chunk_boxes",
    "flag_block",
    "flags_measurable",
    "level_cell",
    "measure_block",
    "measure_box",
    "measure_slide",
    "nuclei_maps",
    "output_calibration",
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
#: Context (pixels) the calibrated flags read around a box: their local windows reach about
#: 70 px (three σ of the 12 µm window at 0.75 µm/px, plus the widest detail band).
FLAG_CONTEXT_PX = 96
#: Per-cell flag maps: calibrated score, flagged (1/0) and tissue cell (1/0); NaN where
#: the flags were not computed.
FLAG_NAMES = ("score", "flagged", "tissue")
#: Points of the flags: F nuclei missing from the stain and stain nuclei F does not have,
#: each strong enough to flag its cell on its own (level-0 pixels).
FLAG_POINTS = ("flag_erased", "flag_invented")
POINT_NAMES = ("erased", "invented", "preserved", *FLAG_POINTS)


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
    #: ``{"erased", "invented", "preserved"}`` (and, with flags, :data:`FLAG_POINTS`)
    #: → ``(K, 2)`` level-0 pixel ``(y, x)``.
    points: dict[str, np.ndarray]
    #: ``{name: (ny, nx)}`` for :data:`FLAG_NAMES` (empty when not flagged).
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``(ny, nx)`` object array of signal-name tuples (None when not flagged).
    reasons: np.ndarray | None = None


def flags_measurable(cell_px: int, pixel_size_um: float) -> bool:
    """Whether the calibrated flags are computed for cells of a level.

    Parameters
    ----------
    cell_px
        Cell side in the level's pixels.
    pixel_size_um
        The level's pixel size (µm).

    Returns
    -------
    bool
        True for cells of 64 to 1024 pixels at ≤ :data:`NUCLEI_MAX_PIXEL_UM` µm/px: the
        flags' nuclei signals need a few pixels per nucleus, as the nuclei maps do.
    """
    from napari_confocal_stain.measure.flags import MAX_CELL, MIN_CELL

    return MIN_CELL <= int(cell_px) <= MAX_CELL and float(pixel_size_um) <= NUCLEI_MAX_PIXEL_UM


def output_calibration(pipeline: StainPipeline | None, gan: bool = True) -> Any:
    """The flag calibration that fits an output.

    Parameters
    ----------
    pipeline
        The slide's pipeline (its ``settings.model`` stained the GAN output), or None.
    gan
        True when the measured output is that pipeline's GAN stain; otherwise (another
        RGB layer, made by an unknown model) the default model's calibration is used.

    Returns
    -------
    FlagCalibration

    Raises
    ------
    ValueError
        The model's checkpoint holds no (or a malformed) flag calibration.
    CheckpointError
        The checkpoint cannot be read.
    """
    from napari_confocal_stain.measure.flags import load_calibration

    model = pipeline.settings.model if gan and pipeline is not None else None
    return load_calibration(model)


def flag_block(
    r: np.ndarray,
    f: np.ndarray,
    output: np.ndarray,
    cell_px: int,
    *,
    inner: Box,
    calibration: Any,
    pixel_size_um: float,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Calibrated hallucination flags of the cells of ``inner``, from arrays with context.

    Parameters
    ----------
    r, f
        ``(H, W)`` reflectance and fluorescence in [0, 1], read with context (at least
        :data:`FLAG_CONTEXT_PX` pixels where the slide has them).
    output
        ``(H, W, 3)`` stained output of the same pixels, uint8 or floats in [0, 1].
    cell_px
        Cell side in pixels (64 to 1024).
    inner
        ``(y0, y1, x0, x1)`` of the measured region in the arrays; cell (0, 0) starts at
        its corner. Its corner must be a multiple of ``cell_px`` from the arrays' corner
        or at least :data:`FLAG_CONTEXT_PX` pixels inside them.
    calibration
        Passed to :func:`~napari_confocal_stain.measure.flags.flag_hallucinations` as
        ``model`` (a :class:`~napari_confocal_stain.measure.flags.FlagCalibration`, a
        model name or a path).
    pixel_size_um
        Pixel size of the arrays.

    Returns
    -------
    flags : dict
        ``{name: (ny, nx) float64}`` for :data:`FLAG_NAMES`.
    reasons : numpy.ndarray
        ``(ny, nx)`` object array of signal-name tuples (empty where not flagged).
    points : dict
        :data:`FLAG_POINTS` → ``(K, 2)`` ``(y, x)`` relative to the corner of ``inner``.
    """
    from napari_confocal_stain.core.metrics import cell_grid_shape
    from napari_confocal_stain.measure.flags import flag_hallucinations

    y0, y1, x0, x1 = inner
    h, w = r.shape
    # The flags' grid starts at the image corner. Padding the top and left with glass
    # (no tissue: never flagged) puts a cell corner on inner's corner; the padding is
    # farther from the inner cells than any of the flags' windows reach.
    top, left = (-y0) % cell_px, (-x0) % cell_px
    bottom, right = max(0, cell_px - top - h), max(0, cell_px - left - w)
    pad = ((top, bottom), (left, right))
    stained = np.asarray(output)
    stained = stained / 255.0 if stained.dtype == np.uint8 else stained
    res = flag_hallucinations(
        np.pad(np.asarray(r, np.float32), pad),
        np.pad(np.asarray(f, np.float32), pad),
        np.pad(np.asarray(stained, np.float32), (*pad, (0, 0)), constant_values=1.0),
        cell=int(cell_px),
        model=calibration,
        pixel_size_um=pixel_size_um,
    )
    grid = cell_grid_shape((y1 - y0, x1 - x0), cell_px)
    iy, ix = (top + y0) // cell_px, (left + x0) // cell_px
    sl = (slice(iy, iy + grid[0]), slice(ix, ix + grid[1]))
    flags = {
        "score": np.asarray(res["score"][sl], np.float64),
        "flagged": res["flagged"][sl].astype(np.float64),
        "tissue": res["tissue"][sl].astype(np.float64),
    }
    corner = np.array([top + y0, left + x0], np.float64)
    points = {}
    for name, key in zip(FLAG_POINTS, ("erased_points", "invented_points"), strict=True):
        pts = np.asarray(res[key], np.float64).reshape(-1, 2) - corner
        points[name] = pts[_inside(pts, (0, y1 - y0, 0, x1 - x0))]
    return flags, res["reasons"][sl], points


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
    calibration: Any = None,
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
        Pixels read around the box (GAN context and nuclei halo); at least
        :data:`FLAG_CONTEXT_PX` when flagging.
    nuclei
        Count nuclei (default: when the level's pixel is ≤ :data:`NUCLEI_MAX_PIXEL_UM`).
    calibration
        Flag calibration (:func:`output_calibration`) to also compute the calibrated
        flags (:func:`flag_block`) where :func:`flags_measurable`; None: no flags.
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
    flagging = calibration is not None and flags_measurable(cell_px, px)
    if flagging:
        context = max(int(context), FLAG_CONTEXT_PX)
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
    r, f = pipeline.raw(level, grown) if (nuclei or flagging) else (None, None)
    gy0, _, gx0, _ = grown
    inner = (y0 - gy0, y1 - gy0, x0 - gx0, x1 - gx0)
    maps, pts = measure_block(
        source, out, f if nuclei else None, cell_px, inner=inner, pixel_size_um=px,
        workers=workers,
    )  # fmt: skip
    flags, reasons = {}, None
    if flagging:
        flags, reasons, flag_pts = flag_block(
            r, f, out, cell_px, inner=inner, calibration=calibration, pixel_size_um=px
        )
        pts.update(flag_pts)
    origin = np.array([y0, x0], np.float64)
    points = {k: (v + origin) * ds for k, v in pts.items()}
    return CellBlock(int(level), (y0 // cell_px, x0 // cell_px), maps, points, flags, reasons)


@dataclass
class SlideMaps:
    """The per-cell maps of a whole slide, filled block by block.

    A cell keeps the measurement of the finest level that measured it (a coarse overview
    never overwrites a full-resolution value); points, flags and reasons are replaced per
    cell likewise.

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
    #: :data:`FLAG_NAMES` → ``(ny, nx)``, NaN where the flags were not computed.
    flags: dict[str, np.ndarray] = field(init=False)
    #: ``(ny, nx)`` object array: the signal names that flagged each cell.
    reasons: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.grid = (-(-int(self.shape[0]) // self.cell), -(-int(self.shape[1]) // self.cell))
        self.maps = {name: np.full(self.grid, np.nan) for name in MAP_NAMES}
        self.levels = np.full(self.grid, 255, np.int16)
        self.points = {k: np.empty((0, 2)) for k in POINT_NAMES}
        self.flags = {name: np.full(self.grid, np.nan) for name in FLAG_NAMES}
        self.reasons = np.empty(self.grid, object)
        self.reasons.fill(())

    def add(self, block: CellBlock) -> tuple[slice, slice]:
        """Paste a block; returns the slide-grid slices it covered."""
        iy, ix = block.origin
        ny, nx = next(iter(block.maps.values())).shape
        ny, nx = min(ny, self.grid[0] - iy), min(nx, self.grid[1] - ix)
        sl = (slice(iy, iy + ny), slice(ix, ix + nx))
        take = self.levels[sl] >= block.level  # finer or equal levels replace
        for name in MAP_NAMES:
            self.maps[name][sl][take] = block.maps[name][:ny, :nx][take]
        for name in FLAG_NAMES:
            new = block.flags.get(name)
            self.flags[name][sl][take] = np.nan if new is None else new[:ny, :nx][take]
        if block.reasons is None:
            reasons = np.empty((ny, nx), object)
            reasons.fill(())
        else:
            reasons = block.reasons[:ny, :nx]
        self.reasons[sl][take] = reasons[take]
        self.levels[sl][take] = block.level
        replaced = np.zeros(self.grid, bool)
        replaced[sl] = take
        for name, pts in self.points.items():
            if len(pts):
                pts = pts[~replaced.ravel()[_cell_index(pts, self.cell, self.grid)]]
            new = block.points.get(name, np.empty((0, 2)))
            if len(new):
                new = new[replaced.ravel()[_cell_index(new, self.cell, self.grid)]]
                pts = np.concatenate([pts, new])
            self.points[name] = pts
        return sl

    @property
    def measured(self) -> np.ndarray:
        """Boolean map of the cells measured at any level."""
        return self.levels < 255

    @property
    def flagged(self) -> np.ndarray:
        """Boolean map of the cells the calibrated flags flagged (never a background cell)."""
        return self.flags["flagged"] == 1

    def flag_summary(self) -> tuple[int, int, int]:
        """``(flagged, tissue cells, measured cells without flags)`` of the slide so far."""
        done = np.isfinite(self.flags["flagged"])
        tissue = int((self.flags["tissue"][done] == 1).sum())
        return int(self.flagged.sum()), tissue, int((self.measured & ~done).sum())

    def region_cells(self, region: Box | None) -> tuple[slice, slice]:
        """The slide-grid slices of the cells of a level-0 region (all for None)."""
        if region is None:
            return slice(0, self.grid[0]), slice(0, self.grid[1])
        y0, y1, x0, x1 = region
        c = self.cell
        return slice(y0 // c, -(-y1 // c)), slice(x0 // c, -(-x1 // c))

    def crop(self, region: Box | None) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """The maps of the cells of a level-0 region, and its first cell's index."""
        sl = self.region_cells(region)
        return {k: v[sl].copy() for k, v in self.maps.items()}, (sl[0].start, sl[1].start)


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
    calibration: Any = None,
    cancel: Callable[[], bool] | None = None,
    workers: int | None = None,
) -> Iterator[tuple[int, int, CellBlock]]:
    """Stream a slide (or a region) through :func:`measure_box`, chunk by chunk.

    Parameters
    ----------
    pipeline, level, cell, output, context, nuclei, calibration, cancel, workers
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
            calibration=calibration, cancel=cancel, workers=workers,
        )  # fmt: skip
        yield i + 1, len(boxes), block
