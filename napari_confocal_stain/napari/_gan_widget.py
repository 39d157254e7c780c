"""The GAN stain tab: stain what is on screen, tile by tile, and export the whole slide.

The stain is a :class:`~napari_confocal_stain.napari._live.LiveLayer` (a background thread
computes only what is on screen); the models are loaded in a worker thread first. The
export runs :func:`~napari_confocal_stain.export.export_slide` in a worker thread with
progress and cancel. Every failure the user can cause is one notification plus the status
line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_confocal_stain._fs import work_folder
from napari_confocal_stain.core.tiling import STRATEGIES
from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings
from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.export import export_slide, output_format
from napari_confocal_stain.models.defaults import DEFAULT_DESPECKLE_MODEL, DEFAULT_STAIN_MODEL
from napari_confocal_stain.napari._despeckle_widget import DespeckleWidget
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._live import (
    DEFAULT_CACHE_MB,
    GAN_MARGIN,
    LiveLayer,
    live_layer_name,
    live_layers,
    shared_cache,
    tile_cache_dir,
)
from napari_confocal_stain.napari._model_choice import ModelChooser, load_model_async
from napari_confocal_stain.napari._viewer_state import (
    chosen_slide,
    follow_opened_slides,
    overlay_kwargs,
    slide_layers,
    slide_mosaic,
    slide_names,
)
from napari_confocal_stain.napari._widget_parts import button_row, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["STRATEGY_LABELS", "GanStainWidget"]

STRATEGY_LABELS = {
    "seamless": "seamless (dense statistics, 1× work)",
    "independent": "independent tiles (thesis baseline)",
    "crop": "overlap + crop (4× work)",
    "pyramid": "pyramid blending (16× work)",
    "pyramid-flat": "pyramid, flat weights (16× work)",
}


class _ExportOrder(NamedTuple):
    """What the Export button exports, and where."""

    slide: str
    mosaic: Any
    settings: StainSettings
    product: str
    target: Path


class GanStainWidget(Container):
    """Stain what is on screen with the GAN generator, tile by tile, in the background.

    Parameters
    ----------
    viewer
        The napari viewer.
    despeckle
        The panel's despeckle widget (its "stain from despeckled R" choice is followed).
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, despeckle: DespeckleWidget | None = None
    ) -> None:
        self._viewer = viewer
        self._despeckle = despeckle
        view = self._view_fields(viewer)
        export = self._export_fields()
        super().__init__(widgets=[*view, Label(value="<b>Export</b>"), *export], labels=True)
        wrap_label(self.status)
        wrap_label(self.limits)
        self._limits_told: set[str] = set()
        wrap_label(self.export_status)
        self._export_worker: Any = None
        self._export_cancelled = False
        self.export_button.changed.connect(lambda *_: self.export())
        self.export_cancel.changed.connect(lambda *_: self.cancel_export())
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        for w in (
            self.model.bundled,
            self.model.file,
            self.strategy,
            self.tile,
            self.device,
            self.precision,
        ):
            w.changed.connect(self._params_changed)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)

    def _view_fields(self, viewer: napari.viewer.Viewer) -> list[Any]:
        """The live view's fields, in panel order: what to stain, how, Start/Stop, status."""
        self.slide = ComboBox(label="Slide", choices=lambda *_: slide_names(viewer), nullable=True)
        follow_opened_slides(viewer, self.slide)
        self.model = ModelChooser("Model", "stain", DEFAULT_STAIN_MODEL)
        self.strategy = ComboBox(
            label="Strategy",
            choices=[(STRATEGY_LABELS.get(s, s), s) for s in STRATEGIES],
            value="seamless",
        )
        self.tile = ComboBox(
            label="Tile size",
            choices=[256, 512, 1024],
            value=512,
            tooltip="Statistics tile of the strategy and display tile (px)",
        )
        self.device = ComboBox(
            label="Device",
            choices=["auto", "cpu", "cuda", "mps"],
            value="auto",
            tooltip="auto: CUDA, then Apple MPS, then CPU",
        )
        self.precision = ComboBox(
            label="Precision",
            choices=["auto", "fp32", "bf16", "fp16"],
            value="auto",
            tooltip="auto: bf16/fp16 on GPUs; on the CPU bf16 only where it is faster",
        )
        self.disk_cache = CheckBox(text="Keep tiles on disk (reopening is instant)", value=True)
        self.cache_mb = SpinBox(
            label="Memory (MB)",
            value=DEFAULT_CACHE_MB,
            min=64,
            max=65536,
            step=64,
            tooltip="In-memory tile cache budget",
        )
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop")
        self.tiles = ProgressBar(label="On screen", value=0, max=1, tooltip="tiles done / needed")
        self.status = Label(value="")
        # The model card's known limits (tissue it does not stain faithfully), shown from the
        # moment the model loads: a pathologist should not have to open the card to learn them.
        self.limits = Label(value="", visible=False)
        return [
            self.slide,
            self.model,
            self.strategy,
            self.tile,
            self.device,
            self.precision,
            self.disk_cache,
            self.cache_mb,
            button_row(self.start_button, self.stop_button),
            self.tiles,
            self.status,
            self.limits,
        ]

    def _export_fields(self) -> list[Any]:
        """The export section's fields, in panel order."""
        self.export_path = FileEdit(
            label="Export to",
            mode="w",
            filter="*.ome.zarr *.ome.tif",
            tooltip="Pyramidal OME-Zarr (folder *.ome.zarr) or tiled OME-TIFF (*.ome.tif), "
            "readable by QuPath; refused inside the slide's own folder",
        )
        self.export_what = ComboBox(
            label="Export",
            choices=[
                ("GAN stain", "gan"),
                ("Linear stain", "linear"),
                ("Despeckled R", "despeckled-r"),
            ],
            value="gan",
        )
        self.export_button = PushButton(text="Export whole slide")
        self.export_progress = ProgressBar(label="Exported", value=0, max=100)
        self.export_cancel = PushButton(text="Cancel export", enabled=False)
        self.export_status = Label(value="")
        return [
            self.export_what,
            self.export_path,
            button_row(self.export_button, self.export_cancel),
            self.export_progress,
            self.export_status,
        ]

    def settings(self) -> StainSettings | None:
        """The settings the widget shows (None if a file is chosen but missing)."""
        choice = self.model.choice
        if choice is None:
            return None
        desp, median = (
            (None, True) if self._despeckle is None else (self._despeckle.despeckle_setting())
        )
        return StainSettings(
            despeckle=desp,
            median=median,
            model=choice,
            strategy=str(self.strategy.value),
            tile=int(self.tile.value),
            device=str(self.device.value),
            precision=str(self.precision.value),
        )

    def live(self, slide: str | None = None) -> LiveLayer | None:
        """The GAN live layer of ``slide`` (default: the chosen slide)."""
        slide = slide or self.slide.value or next(iter(slide_names(self._viewer)), None)
        return live_layers(self._viewer, "gan").get(slide)

    def start(self, *_: Any) -> None:
        """Start (or resume) staining what is on screen."""
        slide = chosen_slide(self.slide, self._viewer)
        mosaic = slide_mosaic(self._viewer, slide) if slide else None
        if mosaic is None:
            self.status.value = "Open a slide first."
            return
        settings = self.settings()
        if settings is None:
            self.status.value = "Choose a checkpoint file (or a bundled model)."
            return
        shared_cache(int(self.cache_mb.value))
        self.status.value = "Loading the model…"
        self.start_button.enabled = False

        def ok(resolved: dict) -> None:
            self.start_button.enabled = True
            self._show(slide, mosaic, replace(settings, **resolved))
            self._show_limits(settings)

        def failed(exc: BaseException, model: str) -> None:
            from napari.utils.notifications import show_error

            self.start_button.enabled = True
            text = describe(exc, model)
            self.status.value = f"Not started: {text}"
            show_error(f"GAN stain: {text}")

        margin = min(GAN_MARGIN, settings.tile // 2)

        def load_stain(*_: Any) -> None:
            load_model_async(
                settings.model,
                settings.device,
                "stain",
                on_ok=ok,
                on_error=lambda e: failed(e, settings.model),
                precision=settings.precision,
                warm_tile=(settings.tile, margin),
            )

        # One model after the other, so a failure is reported once and no layer appears.
        if settings.despeckle is not None:
            load_model_async(
                settings.despeckle,
                settings.device,
                "despeckle",
                on_ok=load_stain,
                on_error=lambda e: failed(e, settings.despeckle),
            )
        else:
            load_stain()

    def _show(self, slide: str, mosaic: Any, settings: StainSettings) -> LiveLayer:
        pipeline = StainPipeline(mosaic, settings, slide_id=str(mosaic.source))
        live = self.live(slide)
        if live is not None:
            live.rebind(pipeline)
            live.pause(False)
        else:
            r = slide_layers(self._viewer, "R").get(slide)
            live = LiveLayer(
                self._viewer,
                pipeline,
                "gan",
                slide=slide,
                role="gan",
                tile=settings.tile,
                disk_root=tile_cache_dir() if self.disk_cache.value else None,
                cache_mb=int(self.cache_mb.value),
                on_status=self._set_status,
                on_progress=self._set_progress,
                layer_kwargs=overlay_kwargs(r, live_layer_name(slide, "gan")),
            )
        return live

    def _show_limits(self, settings: StainSettings) -> None:
        """Show the loaded model's known limits under the status (and once as a notification)."""
        from napari_confocal_stain.engine.pipeline import get_model
        from napari_confocal_stain.models import known_limits

        limits = known_limits(get_model(settings.model, settings.device, "stain"))
        self.limits.value = "Known limits of this model: " + " ".join(limits) if limits else ""
        self.limits.visible = bool(limits)
        if limits and settings.model not in self._limits_told:
            from napari.utils.notifications import show_info

            self._limits_told.add(settings.model)
            show_info(f"{settings.model}: " + " ".join(limits))

    def stop(self, *_: Any) -> None:
        """Stop computing tiles (what is done stays on screen; Start resumes)."""
        live = self.live()
        if live is not None:
            live.pause(True)
            self.status.value = f"Stopped. {live.status_text()}"

    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _set_progress(self, done: int, needed: int) -> None:
        self.tiles.max = max(needed, 1)
        self.tiles.value = min(done, max(needed, 1))

    def _params_changed(self, *_: Any) -> None:
        # Live update: an existing layer switches to the new settings in place.
        if self.live() is not None:
            self.start()

    def despeckle_changed(self) -> None:
        """Follow the despeckle widget's choice (called by the panel)."""
        self._params_changed()

    # -- export ------------------------------------------------------------------------
    def export(self, out: str | Path | None = None) -> Any:
        """Export the whole slide in the background (resumes an interrupted export).

        Same settings as the view (model, strategy, device, despeckling); the result is a
        pyramidal OME-Zarr or OME-TIFF (see ``docs/export.md``). Returns the worker.
        """
        order = self._export_order(out)
        if order is None:
            return None
        resume = work_folder(order.target).exists()
        self._export_cancelled = False
        state = {"done": 0, "total": 1}  # written by the worker, read by a main-thread timer
        worker = self._export_worker_for(order, resume, state)
        verb = "Resuming" if resume else "Exporting"
        self._watch_export(worker, order, f"{verb} {order.slide} → {order.target.name}", state)
        return worker

    def _export_order(self, out: str | Path | None) -> _ExportOrder | None:
        """What to export where, or None (the reason is in the export status line)."""
        slide = chosen_slide(self.slide, self._viewer)
        mosaic = slide_mosaic(self._viewer, slide) if slide else None
        settings = self.settings()
        target = Path(out) if out is not None else Path(self.export_path.value or "")
        if mosaic is None:
            self.export_status.value = "Open a slide first."
            return None
        if settings is None:
            self.export_status.value = "Choose a checkpoint file (or a bundled model)."
            return None
        try:
            output_format(target)
        except MosaicError:
            self.export_status.value = "Choose an output name ending in .ome.zarr or .ome.tif."
            return None
        if self._export_worker is not None:
            self.export_status.value = "An export is running; cancel it first."
            return None
        product = str(self.export_what.value)
        if product == "despeckled-r" and settings.despeckle is None:
            desp = self._despeckle.model.choice if self._despeckle is not None else None
            settings = replace(settings, despeckle=desp or DEFAULT_DESPECKLE_MODEL)
        return _ExportOrder(slide, mosaic, settings, product, target)

    def _export_worker_for(self, order: _ExportOrder, resume: bool, state: dict) -> Any:
        """A worker thread running :func:`export_slide`; it returns ``(path, error)``."""
        from napari.qt.threading import thread_worker

        @thread_worker
        def run() -> tuple[Path | None, BaseException | None]:
            def progress(done: int, total: int) -> None:
                state.update(done=done, total=total)

            def cancel() -> bool:
                return self._export_cancelled

            # Errors are returned, not raised (one report, in our status line). The export
            # leaves nothing behind on a failure, except what a resume can finish.
            try:
                path = export_slide(
                    order.mosaic, order.target, settings=order.settings,
                    product=order.product, resume=resume, progress=progress, cancel=cancel,
                )  # fmt: skip
                return path, None
            except Exception as exc:
                return None, exc

        return run()

    def _watch_export(self, worker: Any, order: _ExportOrder, doing: str, state: dict) -> None:
        """Start ``worker``; show its progress (polled every 500 ms) and then its outcome."""
        from qtpy.QtCore import QTimer

        self._export_worker = worker
        self.export_button.enabled = False
        self.export_cancel.enabled = True
        self.export_status.value = f"{doing}…"
        self.export_progress.value = 0
        timer = QTimer()
        timer.setInterval(500)

        def poll() -> None:
            pct = int(100 * state["done"] / max(state["total"], 1))
            self.export_status.value = f"{doing}: {pct} %"
            self.export_progress.value = pct

        def finished(result: tuple[Any, BaseException | None]) -> None:
            timer.stop()
            self._export_worker = None
            self.export_button.enabled = True
            self.export_cancel.enabled = False
            self._export_done(order, *result)

        timer.timeout.connect(poll)
        worker.returned.connect(finished)
        worker.finished.connect(lambda: setattr(self, "_export_worker", None))
        timer.start()
        worker.start()

    def _export_done(self, order: _ExportOrder, path: Any, exc: BaseException | None) -> None:
        from napari.utils.notifications import show_error, show_info

        if exc is None:
            self.export_progress.value = 100
            self.export_status.value = f"Exported {path}"
            show_info(f"Exported {order.slide} to {path}")
        elif self._export_cancelled:
            self.export_status.value = (
                f"Export cancelled; export to {order.target.name} again to resume."
            )
        else:
            text = describe(exc, order.target)
            self.export_status.value = f"Export failed: {text}"
            show_error(f"Export: {text}")

    def cancel_export(self) -> None:
        """Stop the running export between chunks (it can be resumed later)."""
        if self._export_worker is not None:
            self._export_cancelled = True
            self.export_status.value = "Cancelling after the current chunk…"
