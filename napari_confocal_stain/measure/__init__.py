"""Measuring a stained slide: per-cell hallucination maps, calibrated flags, reports.

:mod:`~napari_confocal_stain.measure.slide` streams a slide through the metrics cell by
cell; :mod:`~napari_confocal_stain.measure.flags` turns every signal into one calibrated
score per cell (:func:`flag_hallucinations`); :mod:`~napari_confocal_stain.measure.report`
summarises, tabulates and plots the result. The command line and the napari widgets both
use them (one set of numbers).
"""

from napari_confocal_stain.measure.flags import (
    SIGNALS,
    FlagCalibration,
    flag_hallucinations,
    flag_signals,
    load_calibration,
    reasons_text,
)
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
    flag_block,
    flags_measurable,
    level_cell,
    measure_block,
    measure_box,
    measure_slide,
    output_calibration,
    slide_chunks,
)

__all__ = [
    "SIGNALS",
    "CellBlock",
    "FlagCalibration",
    "SlideMaps",
    "cells_to_csv",
    "distribution_figure",
    "flag_block",
    "flag_hallucinations",
    "flag_signals",
    "flags_measurable",
    "format_summary",
    "level_cell",
    "load_calibration",
    "measure_block",
    "measure_box",
    "measure_slide",
    "output_calibration",
    "plot_distributions",
    "reasons_text",
    "slide_chunks",
    "summarize",
]
