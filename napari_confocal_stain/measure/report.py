"""Per-slide reports of the hallucination metrics: summary, CSV of all cells, plots.

* :func:`summarize` — mean, median and quantiles of each per-cell metric.
* :func:`cells_to_csv` — one row per grid cell: its index, pixel bounds and every metric.
* :func:`plot_distributions` — one panel per metric, one box plot per inference strategy
  (and slide), like the thesis's Fig. 4.8, saved as PNG.

Files are written atomically (a temporary file next to the destination, renamed over it
once complete), so an error never leaves a partial report behind. Plotting uses
matplotlib's object-oriented API with the Agg canvas: no GUI, no pyplot global state, safe
from worker threads.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_confocal_stain._fs import write_atomic

__all__ = [
    "METRIC_LABELS",
    "REASON_WORDS",
    "STATISTICS",
    "cells_to_csv",
    "distribution_figure",
    "flag_columns",
    "format_summary",
    "plot_distributions",
    "reasons_in_words",
    "reasons_label",
    "summarize",
]

#: Statistics :func:`summarize` reports, in order.
STATISTICS = ("n", "mean", "median", "q05", "q25", "q75", "q95")
#: Axis labels of the known metrics (others are labelled by their name).
METRIC_LABELS = {
    "lbp_chi2": "LBP histogram χ² distance (lower is better)",
    "ssim": "SSIM (higher is better)",
    "nuclei_preserved": "nuclei preserved fraction (higher is better)",
    "nuclei_erased": "erased nuclei per cell (lower is better)",
    "nuclei_invented": "invented nuclei per cell (lower is better)",
}
#: What each hallucination-flag signal says about a cell, in words (for reviewers).
REASON_WORDS = {
    "lbp_chi2": "texture differs from the input (LBP χ²)",
    "ssim": "structure differs from the input (SSIM)",
    "structure": "a patch whose structure is not the input's",
    "colour": "colours unusual for this model",
    "texture": "texture the input does not explain",
    "detail_loss": "the input's detail is lost (smeared or flattened)",
    "periodic": "a checkerboard pattern (upsampling artefact)",
    "erased_nuclei": "a nucleus in the fluorescence is missing from the stain",
    "invented_nuclei": "a nucleus in the stain has none in the fluorescence",
}
_TITLES = {"lbp_chi2": "LBP χ²", "ssim": "SSIM", "nuclei_preserved": "Nuclei preserved"}


def _finite(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(
            f"metric {name!r} must be numeric values, got {type(values).__name__}"
        ) from None
    return arr[np.isfinite(arr)]


def summarize(cells: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Summary statistics of per-cell metric values.

    Parameters
    ----------
    cells
        ``{metric: values}``; values are any array (e.g. a per-cell map). NaN and
        infinite values (cells without a value, such as an edge cell too small for
        SSIM) are left out.

    Returns
    -------
    dict
        ``{metric: {"n", "mean", "median", "q05", "q25", "q75", "q95"}}``; ``n`` is the
        number of finite values, the others are NaN when ``n == 0``. Quantiles use
        numpy's default (linear) interpolation.

    Raises
    ------
    ValueError
        If a metric's values are not numeric.
    """
    out = {}
    for name, values in cells.items():
        v = _finite(values, name)
        if v.size == 0:
            stats = dict.fromkeys(STATISTICS, math.nan)
            stats["n"] = 0
        else:
            q05, q25, q50, q75, q95 = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            stats = {
                "n": int(v.size),
                "mean": float(v.mean()),
                "median": float(q50),
                "q05": float(q05),
                "q25": float(q25),
                "q75": float(q75),
                "q95": float(q95),
            }
        out[str(name)] = stats
    return out


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of :func:`summarize`'s output (one line per metric).

    Parameters
    ----------
    summary
        The result of :func:`summarize`.

    Returns
    -------
    str
        Header line and one line per metric.
    """
    width = max([len("metric"), *(len(k) for k in summary)])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{s:>8}" for s in STATISTICS)]
    for name, stats in summary.items():
        cells = [f"{int(stats['n']):>8d}"] + [f"{stats[s]:>8.4f}" for s in STATISTICS[1:]]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def cells_to_csv(
    path: str | os.PathLike,
    maps: Mapping[str, Any],
    cell: int,
    origin: tuple[int, int] = (0, 0),
    *,
    image_shape: tuple[int, int] | None = None,
) -> Path:
    """Write every grid cell's metrics to a CSV file.

    Parameters
    ----------
    path
        Destination ``.csv`` (parent folders are created).
    maps
        ``{metric: (ny, nx) array}``, all the same shape (numpy, or dask — computed).
        Object or string arrays are text columns, written as they are (e.g. the flags'
        ``reasons``).
    cell
        Cell side in pixels.
    origin
        ``(y, x)`` pixel of cell ``(0, 0)``'s corner in slide coordinates (for a
        region of a slide).
    image_shape
        ``(H, W)`` of the measured image, to clip the last row/column of cells to it;
        default: full cells.

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    Columns: ``cell_y, cell_x, y0, x0, y1, x1`` (half-open pixel bounds ``[y0, y1)``,
    ``[x0, x1)``) then one column per metric in the order given; row-major order of
    cells; numbers written with ``repr`` precision, NaN as ``nan``.

    Raises
    ------
    ValueError
        Maps missing, not 2-D, of different shapes, or a bad ``cell``.
    """
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 1:
        raise ValueError(f"cell must be a positive integer number of pixels, got {cell!r}")
    if not maps:
        raise ValueError("cells_to_csv needs at least one metric map")
    arrays = {str(k): _column(v) for k, v in maps.items()}
    shapes = {k: a.shape for k, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"metric maps must be 2-D and of one shape, got {shapes}")
    for reserved in ("cell_y", "cell_x", "y0", "x0", "y1", "x1"):
        if reserved in arrays:
            raise ValueError(f"metric name {reserved!r} clashes with a CSV column")
    ny, nx = first
    oy, ox = (int(v) for v in origin)
    if image_shape is None:
        limit_y, limit_x = ny * cell, nx * cell
    else:
        limit_y, limit_x = (int(v) for v in image_shape[:2])
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cell_y", "cell_x", "y0", "x0", "y1", "x1", *arrays])
    columns = list(arrays.values())
    for i in range(ny):
        y0, y1 = i * cell, min((i + 1) * cell, limit_y)
        for j in range(nx):
            x0, x1 = j * cell, min((j + 1) * cell, limit_x)
            writer.writerow(
                [
                    i,
                    j,
                    oy + y0,
                    ox + x0,
                    oy + y1,
                    ox + x1,
                    *(
                        str(c[i, j]) if c.dtype == object else repr(float(c[i, j]))
                        for c in columns
                    ),
                ]
            )
    return write_atomic(path, buf.getvalue().encode("utf-8"))


def _column(values: Any) -> np.ndarray:
    """A CSV column: text (object) for object or string arrays, float64 otherwise."""
    arr = np.asarray(values)
    if arr.dtype == object or arr.dtype.kind in "US":
        return arr.astype(object)
    return arr.astype(np.float64)


def flag_columns(flags: Mapping[str, np.ndarray], reasons: np.ndarray) -> dict[str, np.ndarray]:
    """The calibrated flags of cells as CSV text columns ``flagged``, ``score``, ``reasons``.

    Parameters
    ----------
    flags
        ``{"flagged", "score"}`` → ``(ny, nx)`` float (NaN where not computed), as in
        :class:`~napari_confocal_stain.measure.slide.SlideMaps`.
    reasons
        ``(ny, nx)`` object array of signal-name tuples.

    Returns
    -------
    dict
        ``flagged`` ``"1"``/``"0"``, ``score`` as ``%.3f``, ``reasons`` the signal names
        joined by ``+`` (e.g. ``"erased_nuclei+ssim"``, empty when not flagged); all three
        empty where the flags were not computed.
    """
    flagged = np.asarray(flags["flagged"], np.float64)
    score = np.asarray(flags["score"], np.float64)
    out = {name: np.empty(flagged.shape, object) for name in ("flagged", "score", "reasons")}
    for idx, value in np.ndenumerate(flagged):
        done = np.isfinite(value)
        out["flagged"][idx] = str(int(value)) if done else ""
        out["score"][idx] = f"{score[idx]:.3f}" if done else ""
        out["reasons"][idx] = reasons_label(reasons[idx]) if done else ""
    return out


def reasons_in_words(names: Any) -> str:
    """Signal names as a reviewer reads them, ``"; "``-separated (see :data:`REASON_WORDS`)."""
    return "; ".join(REASON_WORDS.get(str(n), str(n)) for n in (names or ()))


def reasons_label(names: Any) -> str:
    """Signal names as one short token, e.g. ``"erased_nuclei+ssim"`` (``""`` for none)."""
    return "+".join(str(n) for n in (names or ()))


def distribution_figure(
    data: Mapping[str, Mapping[str, Any]],
    *,
    title: str | None = None,
    metrics: Sequence[str] | None = None,
    dpi: int = 120,
    figure: Any = None,
) -> Any:
    """Draw the box plots of :func:`plot_distributions` into a matplotlib figure.

    Parameters
    ----------
    data, title, metrics, dpi
        As for :func:`plot_distributions`.
    figure
        A :class:`matplotlib.figure.Figure` to clear and draw into (e.g. the figure of a
        Qt canvas in a dock widget); default: a new figure with an Agg canvas.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn.

    Raises
    ------
    ValueError
        No strategies, no metrics, or non-numeric values.
    """
    if not data:
        raise ValueError("plot_distributions needs at least one strategy")
    if metrics is None:
        metrics = list(dict.fromkeys(m for per in data.values() for m in per))
    metrics = [str(m) for m in metrics]
    if not metrics:
        raise ValueError("plot_distributions needs at least one metric")
    strategies = [str(s) for s in data]
    values = {
        (s, m): _finite(per.get(m, ()), m)
        for s, per in zip(strategies, data.values(), strict=True)
        for m in metrics
    }

    if figure is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        width = max(4.0, 1.1 * len(strategies) + 1.5)
        fig = Figure(figsize=(width * len(metrics), 4.2), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
    else:
        fig = figure
        fig.clear()
        fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        _metric_panel(ax, metric, strategies, [values[(s, metric)] for s in strategies])
    if title:
        fig.suptitle(title)
    return fig


def _metric_panel(ax: Any, metric: str, strategies: list[str], series: list[np.ndarray]) -> None:
    """One metric's box per strategy (5–95 % whiskers, mean as a white dot) on ``ax``."""
    colours = [f"C{i % 10}" for i in range(len(strategies))]
    present = [k for k, v in enumerate(series) if v.size]
    if present:
        box = ax.boxplot(
            [series[k] for k in present],
            positions=[k + 1 for k in present],
            whis=(5, 95),
            showfliers=False,
            showmeans=True,
            widths=0.6,
            patch_artist=True,
            meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "k"},
            medianprops={"color": "k"},
        )
        for patch, k in zip(box["boxes"], present, strict=True):
            patch.set_facecolor(colours[k])
            patch.set_alpha(0.75)
    ax.set_xticks(
        range(1, len(strategies) + 1),
        [f"{s}\n(n={series[k].size})" for k, s in enumerate(strategies)],
    )
    ax.set_xlim(0.4, len(strategies) + 0.6)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(_TITLES.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # "+1" offsets confuse fractions


def plot_distributions(
    path: str | os.PathLike,
    data: Mapping[str, Mapping[str, Any]],
    *,
    title: str | None = None,
    metrics: Sequence[str] | None = None,
    dpi: int = 120,
) -> Path:
    """Box plots of per-cell metric distributions per inference strategy, as PNG.

    Like the thesis's Fig. 4.8: one panel per metric (e.g. LBP χ², SSIM), one box per
    strategy (or per slide × strategy: any label), whiskers at the 5th/95th
    percentiles, the mean as a white dot, the number of cells under each label.

    Parameters
    ----------
    path
        Destination ``.png`` (parent folders are created).
    data
        ``{strategy: {metric: values}}``; NaN values are left out.
    title
        Figure title.
    metrics
        Metrics to plot, in order (default: every metric, in first-seen order).
    dpi
        Resolution.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        No strategies, no metrics, or non-numeric values.
    """
    fig = distribution_figure(data, title=title, metrics=metrics, dpi=dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())
