"""The Heatmaps widget: where may the network have invented or erased structure?

Adds, over a slide's stained view, one semi-transparent Image layer per metric whose pixels
are grid cells (LBP χ², SSIM and nuclei preserved fraction; bright = look here), the
calibrated hallucination flags (:func:`~napari_confocal_stain.measure.flag_hallucinations`,
with the calibration of the model that made the GAN stain) as outlines of the flagged cells,
and two Points layers with the nuclei the flags found erased (F nuclei missing from the
stain) or invented. :mod:`~napari_confocal_stain.napari._flag_review` shows the per-slide
summary and walks the flagged cells. The numbers come from
:mod:`napari_confocal_stain.measure`, the same code as the ``confocal-stain metrics``
command.

Three ways to fill the maps:

* **Live** — follow a slide's live GAN stain layer (:mod:`napari_confocal_stain.napari._live`):
  every time the engine lands a tile, the cells it covers are measured (source: the
  pipeline's linear stain as uint8; output: the displayed tile, ``renderer.read``). No
  second scheduler: what is measured is exactly what the engine chose to compute.
* **Visible region** / **whole slide** — stain with ``StainPipeline.gan`` (or read another
  RGB layer chosen as the output) chunk by chunk in a worker thread, with a progress bar
  and Cancel.

Every failure is one notification plus the status line; nothing raises into napari.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    PushButton,
    SpinBox,
)

from napari_confocal_stain.errors import UsageError
from napari_confocal_stain.measure.slide import (
    CONTEXT_PX,
    MIN_CELL_PX,
    CellBlock,
    SlideMaps,
    level_cell,
    measure_box,
    measure_slide,
    output_calibration,
    slide_chunks,
)
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._flag_review import (
    OUTLINE_COLOUR,
    FlagReview,
    outline_rectangles,
)
from napari_confocal_stain.napari._layers import META_KEY
from napari_confocal_stain.napari._live import live_layers
from napari_confocal_stain.napari._report_dock import MetricsReportWidget
from napari_confocal_stain.napari._viewer_state import (
    follow_opened_slides,
    layer_meta,
    metrics_bus,
    slide_layers,
    slide_mosaic,
)
from napari_confocal_stain.napari._widget_parts import PANEL_WIDTH, button_row, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_confocal_stain.engine.pipeline import StainPipeline

__all__ = ["HEATMAP_METRICS", "HeatmapsWidget"]

#: The metrics shown as cell layers: (title, contrast limits, low values are bad).
HEATMAP_METRICS: dict[str, tuple[str, tuple[float, float], bool]] = {
    "lbp_chi2": ("LBP χ²", (0.0, 0.2), False),
    "ssim": ("SSIM", (0.0, 1.0), True),
    "nuclei_preserved": ("nuclei preserved fraction", (0.0, 1.0), True),
}
#: What each map's colours mean, in words.
HEATMAP_MEANING = {
    "lbp_chi2": "the output's texture differs from the input's",
    "ssim": "the output's structure differs from the input's",
    "nuclei_preserved": "nuclei in the fluorescence are missing from the stain",
}
#: Points layers (the calibrated flags' nuclei): (points key, title, symbol, colour).
NUCLEI_POINTS = {
    "erased": ("flag_erased", "erased nuclei", "x", "#ff2d55"),
    "invented": ("flag_invented", "invented nuclei", "triangle_up", "#00e5ff"),
}
#: How the flags, outlines and markers read, in words.
FLAG_LEGEND = (
    f"<span style='color:{OUTLINE_COLOUR}'>■</span> yellow outline = flagged cell: the "
    "model may have invented or erased structure there (calibrated for the model). "
    "<span style='color:#ff2d55'>✕</span> red cross = a nucleus in the fluorescence the "
    "stain erased; <span style='color:#00e5ff'>▲</span> cyan triangle = a nucleus the stain "
    "invented."
)
GAN_OUTPUT = "GAN stain (model below)"
BAR_PX = 200  # legend colour bar width: fits the dock with its two range labels
HEATMAP_OPACITY = 0.7


def _colormap(metric: str) -> Any:
    """Inferno with opacity rising with suspicion: good cells stay see-through.

    Reversed for metrics where low values are bad, so bright and opaque always mean
    "look here" and the stain under well-behaved cells is not darkened.
    """
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    low_bad = HEATMAP_METRICS[metric][2]
    suspicion = np.linspace(0.0, 1.0, 64)
    colors = colormaps["inferno"](suspicion)
    # Fully transparent for the least suspicious 5 % of the range (a well-stained cell
    # must not tint the stain), opaque from 45 % on.
    colors[:, 3] = np.clip((suspicion - 0.05) * 2.5, 0.0, 1.0)
    if low_bad:
        colors = colors[::-1]
    return Colormap(colors, name=f"confocal-{metric}", display_name=f"{metric} (inferno)")


def _stain_weights() -> list[str]:
    from napari_confocal_stain.models.checkpoint import available_weights
    from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

    names = [n for n in available_weights() if not n.startswith("despeckle")]
    return names or [DEFAULT_STAIN_MODEL]


class _LegendRow(Container):
    """Name, colour bar with its range, and the values of the measured cells."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        title, (lo, hi), low_bad = HEATMAP_METRICS[metric]
        self.title = Label(value=f"<b>{title}</b> ({'low' if low_bad else 'high'} = suspicious)")
        self.bar = Label(value="")
        self.low, self.high = Label(value=f"{lo:g}"), Label(value=f"{hi:g}")
        self.meaning = Label(
            value=f"Clear = like the input; purple → orange → yellow: {HEATMAP_MEANING[metric]}"
            ", more and more."
        )
        self.values = Label(value="no cells measured")
        super().__init__(
            widgets=[
                self.title,
                button_row(self.low, self.bar, self.high),
                self.meaning,
                self.values,
            ],
            labels=False,
        )
        self.margins = (0, 0, 0, 0)
        wrap_label(self.meaning)
        wrap_label(self.values)
        self._paint_bar()

    def _paint_bar(self) -> None:
        from qtpy.QtGui import QImage, QPixmap

        rgba = _colormap(self.metric).map(np.linspace(0.0, 1.0, BAR_PX))
        strip = (np.clip(rgba, 0, 1) * 255).astype(np.uint8)
        strip = np.ascontiguousarray(np.repeat(strip[None], 12, axis=0))
        image = QImage(strip.data, BAR_PX, 12, BAR_PX * 4, QImage.Format.Format_RGBA8888).copy()
        self.bar.native.setPixmap(QPixmap.fromImage(image))
        self.bar.native.setScaledContents(False)

    def show_values(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            self.values.value = "no cells measured"
            return
        self.values.value = (
            f"{v.size} cells: min {v.min():.3f} · mean {v.mean():.3f} · max {v.max():.3f}"
        )


class HeatmapsWidget(Container):
    """Cell-grid heatmaps of LBP χ², SSIM and nuclei preservation over a slide.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        fields = [*self._measure_fields(), *self._action_fields()]
        self.review = FlagReview(viewer)
        self.flag_legend = Label(value=FLAG_LEGEND)
        self.legend = {m: _LegendRow(m) for m in HEATMAP_METRICS}
        self.status = Label(value="")
        # The fields in a labelled form; the lines of text below span the whole width.
        form = Container(widgets=fields, labels=True)
        form.margins = (0, 0, 0, 0)
        super().__init__(
            widgets=[form, self.status, self.review, self.flag_legend, *self.legend.values()],
            labels=False,
        )
        wrap_label(self.status)
        wrap_label(self.flag_legend)
        self.max_width = PANEL_WIDTH
        self._results: dict[tuple[str, str], SlideMaps] = {}
        # Why a measured output has no flags (e.g. a checkpoint without a calibration).
        self._flag_notes: dict[tuple[str, str], str] = {}
        self._worker: Any = None
        self._pbar: Any = None
        self._cancel = threading.Event()
        self._error_shown = False
        # Live mode: the engine's landed tiles, measured in order by one consumer.
        self._live: Any = None
        self._queue: collections.deque = collections.deque()
        self._queued: set = set()
        self._consumer: Any = None
        self._connect(viewer)
        self._show_model_fields()

    def _measure_fields(self) -> list[Any]:
        """What to measure and how: slide, output, model, cell, level."""
        from napari_confocal_stain.core.tiling import STRATEGIES
        from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

        self.slide = ComboBox(label="Slide", choices=self._slide_choices, nullable=False)
        follow_opened_slides(self._viewer, self.slide)
        self.output = ComboBox(
            label="Output",
            choices=self._output_choices,
            tooltip="What to measure against the linear stain: the GAN stain, or any RGB "
            "layer of the slide's size (e.g. an exported stain opened from disk).",
        )
        weights = _stain_weights()
        self.model = ComboBox(
            label="Model",
            choices=weights,
            value=DEFAULT_STAIN_MODEL if DEFAULT_STAIN_MODEL in weights else weights[0],
        )
        self.checkpoint = FileEdit(
            label="or checkpoint", mode="r", filter="*.safetensors *.pt", value=""
        )
        self.strategy = ComboBox(label="Strategy", choices=list(STRATEGIES), value="seamless")
        self.cell = ComboBox(label="Cell (px)", choices=[128, 256, 512, 1024], value=512)
        self.level = SpinBox(label="Whole-slide level", value=0, min=0, max=12)
        return [
            self.slide,
            self.output,
            self.model,
            self.checkpoint,
            self.strategy,
            self.cell,
            self.level,
        ]

    def _action_fields(self) -> list[Any]:
        """Live mode, the measure / cancel buttons and the report button."""
        self.live = CheckBox(text="Follow the GAN stain (measure tiles as they land)")
        self.region_button = PushButton(text="Measure visible region")
        self.slide_button = PushButton(text="Measure whole slide")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.report_button = PushButton(text="Open the report dock")
        return [
            self.live,
            self.region_button,
            self.slide_button,
            self.cancel_button,
            self.report_button,
        ]

    def _connect(self, viewer: napari.viewer.Viewer) -> None:
        self.region_button.changed.connect(lambda *_: self.measure_visible())
        self.slide_button.changed.connect(lambda *_: self.measure_slide())
        self.cancel_button.changed.connect(self.cancel)
        self.report_button.changed.connect(self.open_report)
        self.live.changed.connect(self._on_live_toggled)
        self.slide.changed.connect(self._on_slide_changed)
        self.output.changed.connect(self._show_model_fields)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)

    # ------------------------------------------------------------------ choices

    def _slide_choices(self, _widget: Any = None) -> list[str]:
        return list(slide_layers(self._viewer, "R"))

    def _output_choices(self, _widget: Any = None) -> list[str]:
        """GAN, then the RGB layers of the chosen slide's size that are not ours."""
        choices = [GAN_OUTPUT]
        slide = getattr(getattr(self, "slide", None), "value", None)
        mosaic = slide_mosaic(self._viewer, slide) if slide else None
        if mosaic is None:
            return choices
        for layer in self._viewer.layers:
            # Only layers from elsewhere: ours are the source, the heatmaps, or the live GAN
            # layer (whose uncomputed tiles show the linear stain: it is measured live).
            if layer_meta(layer).get("role") or not getattr(layer, "rgb", False):
                continue
            data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
            if tuple(data.shape[:2]) == mosaic.shape:
                choices.append(layer.name)
        return choices

    def _on_layers_changed(self, *_: Any) -> None:
        self.reset_choices()
        if not self.live.value:
            return
        current = self._live_layers().get(self.slide.value)
        if current is not self._live:  # the GAN layer was replaced (new settings) or removed
            self._disconnect_live()
            self._connect_live()

    def _on_slide_changed(self, *_: Any) -> None:
        self.output.reset_choices()
        if self.live.value:
            self._disconnect_live()
            self._connect_live()
        self._refresh_legend()

    def _show_model_fields(self, *_: Any) -> None:
        gan = self.output.value == GAN_OUTPUT
        for w in (self.model, self.checkpoint, self.strategy):
            w.visible = gan

    # ------------------------------------------------------------------ messages

    def _say(self, text: str) -> None:
        self.status.value = text

    def _fail(self, text: str) -> None:
        """One notification per run, and the status line."""
        self._say(text)
        if not self._error_shown:
            self._error_shown = True
            from napari.utils.notifications import show_error

            show_error(text)

    # ------------------------------------------------------------------ what to measure

    def _model_name(self) -> str:
        path = self.checkpoint.value
        if path and str(path) not in ("", ".") and Path(path).is_file():
            return str(path)
        return str(self.model.value)

    def _pipeline(self, slide: str) -> StainPipeline:
        """The live GAN layer's pipeline if there is one, else one from the fields."""
        from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings

        live = self._live_layers().get(slide)
        if live is not None and self.output.value == GAN_OUTPUT:
            return live.pipeline
        mosaic = slide_mosaic(self._viewer, slide)
        if mosaic is None:
            raise UsageError("Open a slide first (File ▸ Open, or the sample slide).")
        settings = StainSettings(model=self._model_name(), strategy=str(self.strategy.value))
        return StainPipeline(mosaic, settings)

    def _output_label(self, pipeline: StainPipeline) -> str:
        if self.output.value != GAN_OUTPUT:
            return str(self.output.value)
        s = pipeline.settings
        return f"{Path(s.model).stem} · {s.strategy}"

    def _output_reader(self, shape: tuple[int, int] | None = None) -> Any:
        """None for the GAN; else a reader of the chosen RGB layer's pixels.

        ``shape`` is the slide's level-0 ``(H, W)``; a layer of another size is refused.
        """
        if self.output.value == GAN_OUTPUT:
            return None
        try:
            layer = self._viewer.layers[self.output.value]
        except KeyError:
            raise UsageError(f"the layer {self.output.value!r} is no longer open") from None
        levels = list(layer.data) if layer.multiscale else [layer.data]
        size = tuple(int(n) for n in levels[0].shape[:2])
        if shape is not None and size != tuple(shape):
            raise UsageError(
                f"the layer {layer.name!r} is {size[0]}x{size[1]} px but the slide is "
                f"{shape[0]}x{shape[1]}: choose a layer of the slide"
            )

        def read(level: int, box: tuple[int, int, int, int]) -> np.ndarray:
            if level >= len(levels):
                raise UsageError(
                    f"layer {layer.name!r} has no pyramid level {level}; measure level 0"
                )
            y0, y1, x0, x1 = box
            return np.asarray(levels[level][y0:y1, x0:x1])[..., :3]

        return read

    def results(self, slide: str | None = None) -> dict[tuple[str, str], SlideMaps]:
        """Measured maps by ``(slide, label)`` (label: model · strategy, or output layer)."""
        return {k: v for k, v in self._results.items() if slide is None or k[0] == slide}

    # ------------------------------------------------------------------ region / slide

    def visible_region(self) -> tuple[int, tuple[int, int, int, int]] | None:
        """``(level, level-0 box)`` of what napari shows of the chosen slide, or None.

        From the live GAN layer's last draw if there is one (its box is what is on screen),
        else from napari's ``data_level`` / ``corner_pixels`` of a visible slide layer
        (which may overstate the view: napari expands them to chunk boundaries).
        """
        slide = self.slide.value
        if not slide:
            return None
        mosaic = slide_mosaic(self._viewer, slide)
        live = self._live_layers().get(slide)
        if live is not None and live.layer.visible and live.layer.live_view is not None:
            level, (y0, y1, x0, x1) = live.layer.live_view
        else:
            candidates = [slide_layers(self._viewer, role).get(slide) for role in ("linear", "R")]
            shown = [lyr for lyr in candidates if lyr is not None and lyr.visible]
            if not shown or mosaic is None:
                return None
            layer = shown[0]
            level = int(layer.data_level) if layer.multiscale else 0
            (y0, x0), (y1, x1) = np.asarray(layer.corner_pixels)[:, :2].astype(int)
            y1, x1 = y1 + 1, x1 + 1
        ds = float(mosaic.downsample[level])
        box = (int(y0 * ds), int(y1 * ds), int(x0 * ds), int(x1 * ds))
        return int(level), box

    def measure_visible(self) -> Any:
        """Measure the cells in view (at the level napari shows), in a worker thread."""
        view = self.visible_region()
        if view is None:
            self._error_shown = False
            self._fail("Heatmaps: open a slide and show it first (File ▸ Open, or the sample).")
            return None
        level, region = view
        mosaic = slide_mosaic(self._viewer, self.slide.value)
        # The finest level at which the cell is still measurable, no finer than shown.
        while level > 0:
            try:
                level_cell(int(self.cell.value), mosaic.downsample[level])
                break
            except ValueError:
                level -= 1
        return self._start(level, region)

    def measure_slide(self, level: int | None = None) -> Any:
        """Measure every cell of the slide at ``level`` (default: the widget's)."""
        return self._start(int(self.level.value if level is None else level), None)

    def _start(self, level: int, region: tuple[int, int, int, int] | None) -> Any:
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        self._error_shown = False
        if self._worker is not None:
            self._fail("Heatmaps: a measurement is running; cancel it first.")
            return None
        slide = self.slide.value
        try:
            if not slide:
                raise UsageError("open a slide first (File ▸ Open, or the sample slide)")
            pipeline = self._pipeline(slide)
            if not 0 <= level < pipeline.mosaic.levels:
                raise UsageError(
                    f"level {level} out of range (slide has {pipeline.mosaic.levels})"
                )
            cell = int(self.cell.value)
            try:
                boxes = slide_chunks(pipeline, level, cell, region)
            except ValueError as exc:  # the cell is too small at this level
                raise UsageError(str(exc)) from None
            output = self._output_reader(pipeline.level_shapes[0])
        except Exception as exc:
            self._fail(f"Heatmaps: {describe(exc, slide)}")
            return None
        label = self._output_label(pipeline)
        calibration = self._calibration((slide, label), pipeline, output is None)
        self._cancel.clear()
        cancel = self._cancel.is_set

        @thread_worker
        def run() -> Any:
            # Errors the user can cause end the run as a value, not as a raised exception
            # (which superqt would also print as a traceback).
            try:
                if output is None:
                    pipeline.stain_model()  # a bad checkpoint fails here, before any work
                yield from measure_slide(
                    pipeline, level, cell, region=region, output=output,
                    calibration=calibration, cancel=cancel,
                )  # fmt: skip
            except Exception as exc:
                yield exc

        what = "visible region" if region is not None else "whole slide"
        self._pbar = progress(total=len(boxes), desc=f"Heatmaps of {slide} ({what})")
        worker = run()
        self._worker = worker
        key = (slide, label)
        worker.yielded.connect(lambda item: self._on_chunk(key, cell, item))
        worker.finished.connect(self._on_finished)
        self.cancel_button.enabled = True
        self._say(f"Measuring the {what} of {slide} at level {level} ({len(boxes)} chunks)…")
        worker.start()
        return worker

    def _calibration(self, key: tuple[str, str], pipeline: StainPipeline, gan: bool) -> Any:
        """The flag calibration of the output's model (None, with a note, if it has none)."""
        try:
            calibration = output_calibration(pipeline, gan)
        except Exception as exc:  # no calibration in the checkpoint, or an unreadable one
            name = Path(str(pipeline.settings.model)).name if gan else "the default model"
            self._flag_notes[key] = f"No flags for {name}: {describe(exc)}"
            return None
        self._flag_notes.pop(key, None)
        return calibration

    def _on_chunk(self, key: tuple[str, str], cell: int, item: Any) -> None:
        if isinstance(item, BaseException):
            self._on_error(item)
            return
        done, total, block = item
        if self._pbar is not None:
            self._pbar.n = done
            self._pbar.refresh()
        self.show_block(key[0], key[1], cell, block)
        self._say(f"{key[0]} · {key[1]}: {done}/{total} chunks measured")

    def _on_error(self, exc: BaseException) -> None:
        from napari_confocal_stain.inference import Cancelled

        if isinstance(exc, Cancelled):
            self._say("Measurement cancelled; the cells done so far are shown.")
            return
        self._fail(f"Heatmaps stopped: {describe(exc, self.slide.value)}")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._worker = None
        self.cancel_button.enabled = False
        if self._cancel.is_set() and not self.status.value.startswith("Measurement cancelled"):
            self._say("Measurement cancelled; the cells done so far are shown.")

    @property
    def running(self) -> bool:
        """Whether a visible-region or whole-slide measurement is running."""
        return self._worker is not None

    def cancel(self, *_: Any) -> None:
        """Stop the running measurement at the next chunk (or GAN block)."""
        self._cancel.set()
        if self._worker is not None:
            self._worker.quit()

    # ------------------------------------------------------------------ layers

    def show_block(self, slide: str, label: str, cell: int, block: CellBlock) -> None:
        """Paste a measured block into the slide's maps and update the layers in place."""
        mosaic = slide_mosaic(self._viewer, slide)
        if mosaic is None:
            return
        key = (slide, label)
        maps = self._results.get(key)
        if maps is None or maps.cell != cell:
            maps = self._results[key] = SlideMaps(mosaic.shape, cell)
        maps.add(block)
        self._update_layers(slide, label, maps, float(mosaic.pixel_size_um))
        self._refresh_legend()
        metrics_bus.updated.emit(slide)

    def _find(self, slide: str, label: str, kind: str) -> Any:
        for layer in self._viewer.layers:
            m = layer_meta(layer)
            if m.get("slide") == slide and m.get("label") == label and m.get("kind") == kind:
                return layer
        return None

    def _update_layers(self, slide: str, label: str, maps: SlideMaps, px: float) -> None:
        cell = maps.cell
        scale = (cell * px, cell * px)
        # Cell i covers slide pixels [i·cell, (i+1)·cell): its centre sits at
        # ((cell − 1) / 2) slide pixels from the cell's first pixel centre.
        translate = ((cell - 1) / 2 * px, (cell - 1) / 2 * px)
        created = None
        for metric, (title, limits, _) in HEATMAP_METRICS.items():
            data = maps.maps[metric].astype(np.float32)
            layer = self._find(slide, label, metric)
            if layer is not None and layer_meta(layer).get("cell") == cell:
                layer.data[...] = data
                layer.refresh()
                continue
            if layer is not None:
                self._viewer.layers.remove(layer)
            layer = self._viewer.add_image(
                data,
                name=f"{slide} · {title} per {cell}-px cell ({label})",
                scale=scale,
                translate=translate,
                units=("um", "um"),
                axis_labels=("y", "x"),
                colormap=_colormap(metric),
                contrast_limits=limits,
                opacity=HEATMAP_OPACITY,
                blending="translucent_no_depth",
                interpolation2d="nearest",
                metadata={
                    META_KEY: {
                        "role": "heatmap",
                        "slide": slide,
                        "label": label,
                        "kind": metric,
                        "metric": metric,
                        "cell": cell,
                    },
                    "confocal_stain_cells": maps,
                },
            )
            created = created or layer
        for kind, (key, title, symbol, colour) in NUCLEI_POINTS.items():
            pts = maps.points[key]
            layer = self._find(slide, label, kind)
            if layer is not None:
                layer.data = pts
                continue
            self._viewer.add_points(
                pts,
                name=f"{slide} · {title} ({label})",
                scale=(px, px),
                units=("um", "um"),
                symbol=symbol,
                face_color=colour,
                border_color=colour,
                size=24,
                border_width=0.1,
                metadata={
                    META_KEY: {"role": "nuclei", "slide": slide, "label": label, "kind": kind}
                },
            )
        self._update_outlines(slide, label, maps, px)
        if created is not None:
            # napari's status bar shows "layer name: value" under the cursor for every
            # selected layer: select the three cell grids so hovering a cell reads all its
            # metrics, each named, at once.
            grids = [self._find(slide, label, metric) for metric in HEATMAP_METRICS]
            selection = self._viewer.layers.selection
            selection.clear()
            selection.update([g for g in grids if g is not None])

    def _update_outlines(self, slide: str, label: str, maps: SlideMaps, px: float) -> None:
        """The flagged cells' outlines: one Shapes layer of rectangles per slide and output."""
        rects = outline_rectangles(maps)
        width = max(2.0, maps.cell / 48)  # level-0 pixels: visible from a whole-slide view
        layer = self._find(slide, label, "flagged")
        if layer is None:
            layer = self._viewer.add_shapes(
                None,
                ndim=2,
                name=f"{slide} · flagged cells ({label})",
                scale=(px, px),
                units=("um", "um"),
                opacity=1.0,
                blending="translucent_no_depth",
                metadata={
                    META_KEY: {"role": "flags", "slide": slide, "label": label, "kind": "flagged"}
                },
            )
        if layer.nshapes:
            layer.data = []
        if rects:
            layer.add_rectangles(
                rects, edge_width=width, edge_color=OUTLINE_COLOUR, face_color="transparent"
            )

    def _refresh_legend(self, *_: Any) -> None:
        slide = self.slide.value
        found = [(k, v) for k, v in self._results.items() if k[0] == slide]
        if not found:
            for row in self.legend.values():
                row.show_values(np.empty(0))
            self.review.show(slide or "", None)
            return
        key, maps = found[-1]
        for metric, row in self.legend.items():
            row.show_values(maps.maps[metric])
        r_layer = slide_layers(self._viewer, "R").get(slide)
        self.review.show(slide, maps, r_layer, self._flag_notes.get(key, ""))

    def flagged(self, slide: str, label: str) -> np.ndarray:
        """Cells the calibrated flags flagged for a measured slide/label (bool map)."""
        return self._results[(slide, label)].flagged

    def open_report(self, *_: Any) -> Any:
        """Dock the report widget (summary, distribution plot, Save PNG / CSV)."""
        widget = MetricsReportWidget(self._viewer)
        window = getattr(self._viewer, "window", None)
        if window is not None:
            window.add_dock_widget(widget, name="Metrics report", area="right")
        return widget

    # ------------------------------------------------------------------ live mode

    def _live_layers(self) -> dict[str, Any]:
        return live_layers(self._viewer, "gan")

    def _on_live_toggled(self, on: bool) -> None:
        self._error_shown = False
        if on:
            if not self._connect_live():
                self._say(
                    "No live GAN stain layer for this slide yet: the heatmaps will follow it "
                    "as soon as one is shown."
                )
        else:
            self._disconnect_live()
            self._say("Live heatmaps off.")

    def _connect_live(self) -> bool:
        live = self._live_layers().get(self.slide.value)
        if live is None:
            return False
        self._live = live
        live.tile_done.connect(self.on_tile_done)
        renderer = live.renderer
        # Tiles already on screen and done are measured now.
        for key in sorted(renderer.visible):
            if renderer.is_done(*key):
                self.on_tile_done(*key)
        self._say(f"Following {live.layer.name}: cells are measured as tiles land.")
        return True

    def _disconnect_live(self) -> None:
        if self._live is not None:
            try:
                self._live.tile_done.disconnect(self.on_tile_done)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._live = None
        self._queue.clear()
        self._queued.clear()

    def _live_box(self, level: int, ty: int, tx: int) -> tuple | None:
        """The cell-aligned box a landed tile completes, or None (not measurable yet)."""
        live = self._live
        renderer = live.renderer
        mosaic = live.pipeline.mosaic
        try:
            cell_px = level_cell(int(self.cell.value), mosaic.downsample[level])
        except ValueError:
            self._say(
                f"Level {level} is too coarse for {self.cell.value}-px cells "
                f"(< {MIN_CELL_PX} px): zoom in to measure."
            )
            return None
        y0, y1, x0, x1 = renderer.tile_box(level, ty, tx)
        h, w = renderer.level_shapes[level]
        # Whole cells: a tile holds several cells, or a cell spans several tiles.
        y0, x0 = y0 // cell_px * cell_px, x0 // cell_px * cell_px
        y1, x1 = min(h, -(-y1 // cell_px) * cell_px), min(w, -(-x1 // cell_px) * cell_px)
        box = (y0, y1, x0, x1)
        if not all(renderer.is_done(level, *t) for t in renderer.tiles_in(level, box)):
            return None
        return box

    def on_tile_done(self, level: int, ty: int, tx: int) -> None:
        """The engine landed a GAN tile: queue its cells for measuring (main thread)."""
        live = self._live
        if live is None or not self.live.value:
            return
        box = self._live_box(level, ty, tx)
        if box is None:
            return
        key = (level, box)
        if key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
        if self._consumer is None:
            self._start_consumer()

    def _start_consumer(self) -> None:
        from napari.qt.threading import thread_worker

        live = self._live
        slide, cell = live.slide, int(self.cell.value)
        label = f"{Path(live.pipeline.settings.model).stem} · {live.pipeline.settings.strategy}"
        renderer, pipeline = live.renderer, live.pipeline
        queue, queued = self._queue, self._queued
        calibration = self._calibration((slide, label), pipeline, True)

        def read(level: int, box: tuple[int, int, int, int]) -> np.ndarray:
            return renderer.read(level, box)  # display pixels: done tiles, cross-faded

        @thread_worker
        def consume() -> Any:
            while queue:
                key = queue.popleft()
                queued.discard(key)
                level, box = key
                try:  # one bad tile must not stop the others, nor print a traceback each
                    yield measure_box(
                        pipeline, level, box, cell, output=read, context=CONTEXT_PX,
                        calibration=calibration, workers=1,
                    )  # fmt: skip
                except Exception as exc:
                    yield exc

        def landed(item: Any) -> None:
            if isinstance(item, BaseException):
                # One notification, then the status line.
                self._fail(f"Live heatmaps: {describe(item, slide)}")
            else:
                self.show_block(slide, label, cell, item)

        worker = consume()
        self._consumer = worker
        worker.yielded.connect(landed)

        def finished() -> None:
            self._consumer = None
            if self._queue and self._live is not None:
                self._start_consumer()  # tiles that landed as the last one finished

        worker.finished.connect(finished)
        worker.start()

    def wait_live(self, timeout: float = 60.0) -> bool:
        """Process events until the live queue is empty (for scripts and tests)."""
        import time

        from qtpy.QtWidgets import QApplication

        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            QApplication.processEvents()
            if self._consumer is None and not self._queue:
                return True
            time.sleep(0.01)
        return False
