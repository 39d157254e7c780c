"""Measuring a stained slide: per-cell hallucination maps and their reports.

:mod:`~napari_confocal_stain.measure.slide` streams a slide through the metrics cell by
cell; :mod:`~napari_confocal_stain.measure.report` summarises, tabulates and plots the
result. The command line and the napari widgets both use them (one set of numbers).
"""

from napari_confocal_stain.measure.report import (
    cells_to_csv,
    distribution_figure,
    format_summary,
    plot_distributions,
    summarize,
)
from napari_confocal_stain.measure.slide import (
    CellBlock,
    SlideMaps,
    flag_cells,
    level_cell,
    measure_block,
    measure_box,
    measure_slide,
    slide_chunks,
)

__all__ = [
    "CellBlock",
    "SlideMaps",
    "cells_to_csv",
    "distribution_figure",
    "flag_cells",
    "format_summary",
    "level_cell",
    "measure_block",
    "measure_box",
    "measure_slide",
    "plot_distributions",
    "slide_chunks",
    "summarize",
]
