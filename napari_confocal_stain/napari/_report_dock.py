"""The metrics report dock: per-slide summary, distribution plot, Save PNG / Save CSV.

It reads what the Heatmaps widget measured (the cell maps kept with its heatmap layers), so
it works for any slide and any number of models / inference strategies: one box per
strategy and metric, like the thesis's Fig. 4.8
(:func:`~napari_confocal_stain.measure.report.distribution_figure`, the same drawing the
``confocal-stain metrics --plot`` file gets).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, Label, PushButton, Table

from napari_confocal_stain.errors import UsageError
from napari_confocal_stain.measure.report import (
    STATISTICS,
    cells_to_csv,
    distribution_figure,
    plot_distributions,
    summarize,
)
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._viewer_state import heatmap_layers, layer_meta, metrics_bus
from napari_confocal_stain.napari._widget_parts import button_row, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_confocal_stain.measure.slide import SlideMaps

__all__ = ["PLOT_METRICS", "MetricsReportWidget"]

#: Metrics in the distribution plot (counts of erased/invented nuclei go to the CSV).
PLOT_METRICS = ("lbp_chi2", "ssim", "nuclei_preserved")
REFRESH_MS = 400  # live heatmaps update often: redraw the plot at most this often


class MetricsReportWidget(Container):
    """Summary table and distribution plot of a slide's measured cells.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from qtpy.QtCore import QTimer

        self._viewer = viewer
        self.slide = ComboBox(label="Slide", choices=self._slide_choices, nullable=False)
        self.table = Table(value={"data": [], "index": [], "columns": list(STATISTICS)})
        self.save_png_button = PushButton(text="Save PNG…")
        self.save_csv_button = PushButton(text="Save CSV…")
        self.status = Label(value="")
        buttons = button_row(self.save_png_button, self.save_csv_button)
        super().__init__(widgets=[self.slide, self.table, buttons, self.status], labels=False)
        wrap_label(self.status)
        self.figure = Figure(figsize=(5.0, 3.2), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        # The canvas is Qt; magicgui containers take Qt widgets through their layout.
        self.native.layout().insertWidget(2, self.canvas)
        self.table.min_height = 140
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        self.slide.changed.connect(self.refresh)
        self.save_png_button.changed.connect(self._ask_png)
        self.save_csv_button.changed.connect(self._ask_csv)
        metrics_bus.updated.connect(self._on_updated)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self.refresh()

    # ------------------------------------------------------------------ data

    def _slide_choices(self, _widget: Any = None) -> list[str]:
        slides = (layer_meta(lyr)["slide"] for lyr in heatmap_layers(self._viewer))
        return list(dict.fromkeys(slides))

    def measured(self, slide: str | None = None) -> dict[str, SlideMaps]:
        """``{label: SlideMaps}`` of a slide (default: the chosen one), in layer order."""
        slide = self.slide.value if slide is None else slide
        out: dict[str, SlideMaps] = {}
        if slide is None:
            return out
        for layer in heatmap_layers(self._viewer, slide):
            label = layer_meta(layer)["label"]
            maps = layer.metadata.get("confocal_stain_cells")
            if maps is not None and label not in out:
                out[label] = maps
        return out

    def _measured_values(self) -> dict[str, dict[str, Any]]:
        return {
            label: {m: maps.maps[m][maps.measured] for m in maps.maps}
            for label, maps in self.measured().items()
        }

    # ------------------------------------------------------------------ view

    def _on_updated(self, slide: str) -> None:
        if slide == self.slide.value or self.slide.value is None:
            self._timer.start()

    def _on_layers_changed(self, *_: Any) -> None:
        self.slide.reset_choices()
        self._timer.start()

    def refresh(self, *_: Any) -> None:
        """Recompute the summary table and redraw the plot for the chosen slide."""
        data = self._measured_values()
        rows, index = [], []
        for label, maps in data.items():
            for metric, stats in summarize(maps).items():
                index.append(f"{label} · {metric}")
                rows.append(
                    [int(stats["n"])] + [round(float(stats[s]), 4) for s in STATISTICS[1:]]
                )
        self.table.value = {"data": rows, "index": index, "columns": list(STATISTICS)}
        if not data:
            self.figure.clear()
            self.canvas.draw_idle()
            self.status.value = "Nothing measured yet: use the Heatmaps widget."
            return
        distribution_figure(
            data, metrics=list(PLOT_METRICS), title=str(self.slide.value), figure=self.figure
        )
        self.canvas.draw_idle()
        n = sum(int(next(iter(m.values())).size) for m in data.values())
        self.status.value = f"{self.slide.value}: {n} cells over {len(data)} output(s)."

    # ------------------------------------------------------------------ saving

    def save_png(self, path: str | Path) -> Path:
        """Write the distribution plot of the chosen slide (atomically).

        Raises
        ------
        UsageError
            Nothing measured for the slide.
        """
        data = self._measured_values()
        if not data:
            raise UsageError("nothing measured for this slide yet")
        return plot_distributions(
            path, data, metrics=list(PLOT_METRICS), title=str(self.slide.value)
        )

    def save_csv(self, path: str | Path) -> Path:
        """Write every cell of the chosen slide (all maps, every output) to a CSV (atomically).

        Columns are ``label.metric`` when several outputs were measured; unmeasured cells
        are ``nan``.

        Raises
        ------
        UsageError
            Nothing measured for the slide.
        """
        measured = self.measured()
        if not measured:
            raise UsageError("nothing measured for this slide yet")
        first = next(iter(measured.values()))
        columns = {}
        for label, maps in measured.items():
            if maps.cell != first.cell:
                continue  # one grid per file
            for name, values in maps.maps.items():
                columns[name if len(measured) == 1 else f"{label}.{name}"] = values
        return cells_to_csv(path, columns, first.cell, image_shape=first.shape)

    def _ask(self, title: str, filter_: str, save: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, title, "", filter_)
        if path:
            self.save(path, save)

    def save(self, path: str | Path, save: Any) -> Path | None:
        """Run ``save(path)``; a failure is one notification and the status line.

        The file is written atomically, so a failed save leaves nothing at ``path``.
        """
        from napari.utils.notifications import show_error

        try:
            out = save(path)
        except Exception as exc:
            text = describe(exc, path)
            self.status.value = f"Not saved: {text}"
            show_error(f"Metrics report: {text}")
            return None
        self.status.value = f"Saved {out}"
        return out

    def _ask_png(self, *_: Any) -> None:
        self._ask("Save the distribution plot", "PNG image (*.png)", self.save_png)

    def _ask_csv(self, *_: Any) -> None:
        self._ask("Save every cell", "CSV table (*.csv)", self.save_csv)
