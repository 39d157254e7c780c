"""``confocal-stain metrics``: per-cell hallucination metrics of a slide's GAN stain.

::

    confocal-stain metrics SLIDE [--model M] [--strategy S ...] [--cell 512] [--level N]
        [--region y0:y1,x0:x1] [--csv OUT.csv] [--plot OUT.png] [--device D]

The measuring is :mod:`napari_confocal_stain.measure` (the same code as the napari
Heatmaps widget); this module checks the options, runs one pass per strategy and writes
the summary, the CSV and the plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_confocal_stain.cli.common import Progress, device, int_at_least
from napari_confocal_stain.core.box import Box
from napari_confocal_stain.errors import MosaicError, OutputError, UsageError
from napari_confocal_stain.measure.slide import CHUNK_PX, MIN_CELL_PX, level_cell

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.engine.pipeline import StainPipeline
    from napari_confocal_stain.io.mosaic import ConfocalMosaic

__all__ = ["add_parsers", "run"]


def add_parsers(subparsers: Any) -> None:
    """Add ``metrics`` to ``confocal-stain``'s subparsers (``set_defaults(func=run)``)."""
    from napari_confocal_stain.core.tiling import STRATEGIES
    from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

    p = subparsers.add_parser(
        "metrics",
        help="per-cell hallucination metrics (LBP χ², SSIM, nuclei) and calibrated flags of "
        "a slide's GAN stain",
        description="Stain a slide (or a region) chunk by chunk with each inference strategy "
        "and measure every grid cell against the linear stain: LBP histogram χ² distance, "
        "SSIM, nuclei preserved / erased / invented, and the model's calibrated "
        "hallucination flags (flagged, score, reasons; at levels of ≤ 1 µm/px). Prints a "
        "summary per strategy; writes a CSV of all cells and a distribution plot (thesis "
        "Fig. 4.8).",
    )
    p.add_argument("slide", type=Path, help="slide path (anything `confocal-stain info` opens)")
    p.add_argument(
        "--model",
        default=DEFAULT_STAIN_MODEL,
        help="bundled stain model name or checkpoint path (default: %(default)s)",
    )
    p.add_argument(
        "--strategy",
        action="append",
        choices=STRATEGIES,
        default=None,
        help="inference strategy; repeat to compare several (default: seamless)",
    )
    p.add_argument("--despeckle", default=None, help="despeckle R first with this model")
    p.add_argument("--cell", type=int, default=512, help="cell side in level-0 px (default 512)")
    p.add_argument(
        "--level", type=int_at_least(0), default=0, help="pyramid level to measure (default 0)"
    )
    p.add_argument("--region", type=str, default=None, help="only y0:y1,x0:x1 (level-0 pixels)")
    p.add_argument("--csv", type=Path, default=None, help="write every cell to this CSV")
    p.add_argument("--plot", type=Path, default=None, help="write the distribution plot (PNG)")
    p.add_argument("--device", type=device, default="auto", help="torch device (default: auto)")
    p.add_argument(
        "--chunk", type=int_at_least(1), default=CHUNK_PX, help="chunk side in level-0 px"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``confocal-stain metrics``: measure, print a summary per strategy, write CSV and plot."""
    from napari_confocal_stain.io.readers import open_mosaic

    if args.cell < MIN_CELL_PX or args.cell & (args.cell - 1):
        raise UsageError(f"--cell must be a power of two >= {MIN_CELL_PX}, got {args.cell}")
    for out in (args.csv, args.plot):
        if out is not None and out.is_dir():
            raise OutputError(out, "is a folder, not an output file")
    region_text = _region_syntax(args.region)
    mosaic = open_mosaic(args.slide)
    region = _region_in_slide(args, region_text, mosaic)
    pipelines = _pipelines(args, mosaic)
    results = _measure(args, mosaic, pipelines, region)
    _report(args, mosaic, results)
    return 0


def _region_syntax(text: str | None) -> Box | None:
    """``--region`` as a box, checked for its form only (the slide is not open yet)."""
    from napari_confocal_stain.export.plan import parse_region

    if text is None:
        return None
    try:
        return parse_region(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _region_in_slide(
    args: argparse.Namespace, region: Box | None, mosaic: ConfocalMosaic
) -> Box | None:
    """Check ``--level``, ``--cell`` and ``--region`` against the slide; clip the region."""
    if not 0 <= args.level < mosaic.levels:
        raise UsageError(f"--level {args.level} out of range (slide has {mosaic.levels})")
    h, w = mosaic.shape
    if region is not None:
        if region[0] >= h or region[2] >= w:
            raise MosaicError(args.slide, f"region {args.region} is outside the {h}x{w} slide")
        region = (region[0], min(region[1], h), region[2], min(region[3], w))
    try:
        level_cell(args.cell, mosaic.downsample[args.level])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return region


def _pipelines(args: argparse.Namespace, mosaic: ConfocalMosaic) -> dict[str, StainPipeline]:
    """One pipeline per strategy, its models loaded (a bad checkpoint fails before any work)."""
    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings

    strategies = list(dict.fromkeys(args.strategy or ["seamless"]))
    pipelines = {
        s: StainPipeline(
            mosaic,
            StainSettings(
                despeckle=args.despeckle, model=args.model, strategy=s, device=args.device
            ),
        )
        for s in strategies
    }
    for pipe in pipelines.values():
        pipe.stain_model()
        if args.despeckle is not None:
            pipe.despeckle_model()
    return pipelines


class _Measured:
    """One strategy's measured region: maps, flags and reasons of its cells."""

    def __init__(self, slide: Any, region: Box | None) -> None:
        sl = slide.region_cells(region)
        self.maps = {k: v[sl].copy() for k, v in slide.maps.items()}
        self.flags = {k: v[sl].copy() for k, v in slide.flags.items()}
        self.reasons = slide.reasons[sl].copy()
        self.origin = (sl[0].start, sl[1].start)


def _calibration(args: argparse.Namespace, pipeline: StainPipeline) -> Any:
    """The model's flag calibration, or None (with a warning) if it has none."""
    from napari_confocal_stain.measure.slide import output_calibration

    try:
        return output_calibration(pipeline)
    except ValueError as exc:
        print(f"warning: no hallucination flags: {exc}", file=sys.stderr)
        return None


def _measure(
    args: argparse.Namespace,
    mosaic: ConfocalMosaic,
    pipelines: dict[str, StainPipeline],
    region: Box | None,
) -> dict[str, _Measured]:
    """Measure every strategy: ``{strategy: its cells of the region}``."""
    from napari_confocal_stain.measure.slide import SlideMaps, measure_slide, slide_chunks

    first = next(iter(pipelines.values()))
    per_strategy = len(slide_chunks(first, args.level, args.cell, region, args.chunk))
    total = len(pipelines) * per_strategy
    calibration = _calibration(args, first)
    results: dict[str, _Measured] = {}
    with Progress(f"metrics {mosaic.name}", "chunk", quiet=args.quiet) as bar:
        for k, (strategy, pipe) in enumerate(pipelines.items()):
            slide = SlideMaps(mosaic.shape, args.cell)
            for done, n, block in measure_slide(
                pipe, args.level, args.cell, region=region, chunk=args.chunk,
                calibration=calibration,
            ):  # fmt: skip
                slide.add(block)
                bar.note(f"{strategy} {done}/{n}")
                bar(k * per_strategy + done, total)
            results[strategy] = _Measured(slide, region)
    return results


def _flag_line(measured: _Measured) -> str:
    flags = measured.flags
    done = np.isfinite(flags["flagged"])
    if not done.any():
        return "flags: not computed (no calibration, or pixels coarser than 1 µm: use --level 0)"
    n = int((flags["flagged"][done] == 1).sum())
    m = int((flags["tissue"][done] == 1).sum())
    return f"flags: {n} of {m} tissue cells flagged"


def _report(
    args: argparse.Namespace, mosaic: ConfocalMosaic, results: dict[str, _Measured]
) -> None:
    """Print each strategy's summary; write the CSV and the plot if asked."""
    from napari_confocal_stain.measure.report import (
        cells_to_csv,
        flag_columns,
        format_summary,
        plot_distributions,
        summarize,
    )

    for strategy, measured in results.items():
        print(f"# {mosaic.name} · {args.model} · {strategy} · cell {args.cell} px")
        print(format_summary(summarize(measured.maps)))
        print(_flag_line(measured))
    c = args.cell
    if args.csv is not None:
        columns = {}
        for strategy, measured in results.items():
            prefix = "" if len(results) == 1 else f"{strategy}."
            cells = {**measured.maps, **flag_columns(measured.flags, measured.reasons)}
            for name, m in cells.items():
                columns[f"{prefix}{name}"] = m
        h, w = mosaic.shape
        origin = next(iter(results.values())).origin
        oy, ox = origin[0] * c, origin[1] * c
        cells_to_csv(args.csv, columns, c, (oy, ox), image_shape=(h - oy, w - ox))
        print(f"wrote {args.csv}")
    if args.plot is not None:
        plot_distributions(
            args.plot,
            {strategy: measured.maps for strategy, measured in results.items()},
            title=f"{mosaic.name} · {args.model} · cell {c} px (level {args.level})",
            metrics=["lbp_chi2", "ssim", "nuclei_preserved"],
        )
        print(f"wrote {args.plot}")
