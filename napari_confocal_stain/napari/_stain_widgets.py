"""Despeckle, GAN stain and Compare: the interactive part of the main panel.

Each is a magicgui container bound to the viewer. The expensive work happens in
:class:`~napari_confocal_stain.napari._live.LiveLayer` renderers (a background thread per
layer, only for what is on screen); loading a model file is done in a ``thread_worker`` so a
slow disk or a bad file never freezes the viewer. Every failure the user can cause is one
notification plus the status line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from napari_confocal_stain.models.defaults import DEFAULT_DESPECKLE_MODEL, DEFAULT_STAIN_MODEL
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._layers import META_KEY
from napari_confocal_stain.napari._live import (
    DEFAULT_CACHE_MB,
    LiveLayer,
    live_layer_name,
    live_layers,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

FILE_CHOICE = "Checkpoint file…"

STRATEGY_LABELS = {
    "seamless": "seamless (dense statistics, 1× work)",
    "independent": "independent tiles (thesis baseline)",
    "crop": "overlap + crop (4× work)",
    "pyramid": "pyramid blending (16× work)",
    "pyramid-flat": "pyramid, flat weights (16× work)",
}

COMPARE_ROLES = ("R", "F", "despeckled", "linear", "linear-despeckled", "gan")
"""Panel order of the side-by-side view: raw modes first, then the stains."""


def _meta(layer: Any) -> dict:
    return layer.metadata.get(META_KEY, {}) if hasattr(layer, "metadata") else {}


def _slides(viewer: napari.viewer.Viewer) -> list[str]:
    return sorted({_meta(lyr)["slide"] for lyr in viewer.layers if _meta(lyr).get("role") == "R"})


def _mosaic(viewer: napari.viewer.Viewer, slide: str) -> Any:
    for lyr in viewer.layers:
        if _meta(lyr).get("role") == "R" and _meta(lyr).get("slide") == slide:
            return lyr.metadata.get("confocal_mosaic")
    return None


def _chosen_slide(combo: ComboBox, viewer: napari.viewer.Viewer) -> str | None:
    """The combo's slide, else the only/first open slide (and show it in the combo)."""
    combo.reset_choices()
    if combo.value:
        return str(combo.value)
    slides = _slides(viewer)
    if slides:
        combo.value = slides[0]
        return slides[0]
    return None


def _r_layer(viewer: napari.viewer.Viewer, slide: str) -> Any:
    for lyr in viewer.layers:
        if _meta(lyr).get("role") == "R" and _meta(lyr).get("slide") == slide:
            return lyr
    return None


def _bundled(prefix: str) -> list[str]:
    from napari_confocal_stain.models.checkpoint import available_weights

    return [n for n in available_weights() if n.startswith(prefix)]


def _tile_cache_dir() -> str:
    from napari_confocal_stain.io.sample import cache_dir

    return str(cache_dir() / "tiles")


def _wrap(label: Label) -> None:
    label.native.setWordWrap(True)


class _ModelChooser(Container):
    """A bundled model name or a checkpoint file."""

    def __init__(self, label: str, prefix: str, default: str) -> None:
        names = _bundled(prefix)
        if default not in names:
            names.insert(0, default)
        self.bundled = ComboBox(label=label, choices=[*names, FILE_CHOICE], value=default)
        self.file = FileEdit(
            label="File",
            mode="r",
            filter="*.safetensors *.pt *.pth",
            tooltip="A .safetensors checkpoint written by `python -m training …` "
            "(or a legacy .pt state dict)",
        )
        super().__init__(widgets=[self.bundled, self.file], labels=True)
        self.margins = (0, 0, 0, 0)
        self.file.visible = False
        self.bundled.changed.connect(lambda *_: setattr(self.file, "visible", self.is_file))

    @property
    def is_file(self) -> bool:
        return self.bundled.value == FILE_CHOICE

    @property
    def choice(self) -> str | None:
        """The bundled name or the file path; None if "file" is chosen but empty."""
        if not self.is_file:
            return str(self.bundled.value)
        path = Path(self.file.value) if self.file.value else None
        return str(path) if path and path.name and path.is_file() else None


def _check_model_async(
    name_or_path: str,
    device: str,
    on_ok: Any,
    on_error: Any,
    kind: str,
    precision: str | None = None,
    warm_tile: tuple[int, int] | None = None,
) -> Any:
    """Load a model in a worker thread (cached for the renderer), then call back.

    With ``precision``, also resolve ``"auto"`` device and precision for this model (the
    one-off CPU bf16 calibration takes a few seconds) and pass ``on_ok`` a settings patch:
    cache scopes then record what actually computed the pixels. ``warm_tile`` =
    ``(tile, context)`` runs the model once on a tile as the renderer cuts it (see ``warm_up``).
    """
    from napari.qt.threading import thread_worker

    from napari_confocal_stain.engine.pipeline import get_model

    @thread_worker
    def _load() -> tuple[Any, BaseException | None]:
        # Errors are returned, not raised: a raised error would also reach napari's own
        # exception dialog (two reports for one bad file).
        try:
            model = get_model(name_or_path, device, kind)
            if precision is None:
                return model, None
            from napari_confocal_stain.inference import resolve_device, resolve_precision

            dev = resolve_device(device)
            resolved = resolve_precision(precision, dev, model)
            if warm_tile:
                from napari_confocal_stain.engine.pipeline import warm_up

                warm_up(model, tile=warm_tile[0], context=warm_tile[1], precision=resolved,
                        device=str(dev))  # fmt: skip
            return {"device": str(dev), "precision": resolved}, None
        except Exception as exc:
            return None, exc

    def done(result: tuple[Any, BaseException | None]) -> None:
        value, exc = result
        if exc is None:
            on_ok(value)
        else:
            on_error(exc)

    worker = _load()
    worker.returned.connect(done)
    worker.start()
    return worker


class DespeckleWidget(Container):
    """Despeckle the reflectance with a DespeckleNN (+ 3×3 median) for what is on screen.

    Parameters
    ----------
    viewer
        The napari viewer.
    on_change
        Called when the despeckling the stains should use changes.
    """

    def __init__(self, viewer: napari.viewer.Viewer, on_change: Any = None) -> None:
        self._viewer = viewer
        self._on_change = on_change
        self.slide = ComboBox(label="Slide", choices=lambda *_: _slides(viewer), nullable=True)
        self.model = _ModelChooser("Model", "despeckle", DEFAULT_DESPECKLE_MODEL)
        self.median = CheckBox(text="3×3 median after the network (Combalia)", value=True)
        self.for_stains = CheckBox(
            text="Stain from the despeckled reflectance",
            value=False,
            tooltip="The GAN stain and a second linear-stain layer use despeckled R",
        )
        self.run_button = PushButton(text="Despeckle")
        self.status = Label(value="")
        super().__init__(
            widgets=[
                self.slide,
                self.model,
                self.median,
                self.for_stains,
                self.run_button,
                self.status,
            ],
            labels=True,
        )
        _wrap(self.status)
        self.run_button.changed.connect(self.run)
        self.for_stains.changed.connect(self._stains_changed)
        self.median.changed.connect(self._params_changed)
        self.model.bundled.changed.connect(self._params_changed)
        self.model.file.changed.connect(self._params_changed)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)

    def despeckle_setting(self) -> tuple[str | None, bool]:
        """``(model or None, median)`` the stains should use."""
        if not self.for_stains.value:
            return None, bool(self.median.value)
        return self.model.choice, bool(self.median.value)

    def _settings(self) -> StainSettings | None:
        choice = self.model.choice
        if choice is None:
            return None
        return StainSettings(despeckle=choice, median=bool(self.median.value))

    def run(self, *_: Any) -> LiveLayer | None:
        """Add (or update) the despeckled-R layer of the chosen slide."""
        slide = _chosen_slide(self.slide, self._viewer)
        mosaic = _mosaic(self._viewer, slide) if slide else None
        if mosaic is None:
            self.status.value = "Open a slide first."
            return None
        settings = self._settings()
        if settings is None:
            self.status.value = "Choose a checkpoint file (or a bundled model)."
            return None
        self.status.value = "Loading the despeckling model…"

        def ok(_model: Any) -> None:
            self._show(slide, mosaic, settings)

        def failed(exc: BaseException) -> None:
            from napari.utils.notifications import show_error

            text = describe(exc, settings.despeckle)
            self.status.value = f"Not despeckled: {text}"
            show_error(f"Despeckle: {text}")

        _check_model_async(settings.despeckle, settings.device, ok, failed, "despeckle")
        return None

    def _show(self, slide: str, mosaic: Any, settings: StainSettings) -> LiveLayer:
        pipeline = StainPipeline(mosaic, settings, slide_id=str(mosaic.source))
        live = live_layers(self._viewer, "despeckled-r").get(slide)
        if live is not None:
            live.rebind(pipeline)
        else:
            r = _r_layer(self._viewer, slide)
            live = LiveLayer(
                self._viewer,
                pipeline,
                "despeckled-r",
                slide=slide,
                role="despeckled",
                disk_root=_tile_cache_dir(),
                on_status=self._set_status,
                layer_kwargs=_geometry(r, live_layer_name(slide, "despeckled"), "gray"),
            )
        self.status.value = f"{live.layer.name}: computing what is on screen"
        if self.for_stains.value:
            self._stains_changed()
        return live

    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _params_changed(self, *_: Any) -> None:
        slide = self.slide.value
        if slide and slide in live_layers(self._viewer, "despeckled-r"):
            self.run()
        elif self.for_stains.value:
            self._stains_changed()

    def _stains_changed(self, *_: Any) -> None:
        if self._on_change is not None:
            self._on_change()


def _geometry(ref: Any, name: str, colormap: str | None = None) -> dict:
    """Layer kwargs that place a live layer exactly over the slide's R layer."""
    kw: dict[str, Any] = {"name": name}
    if ref is not None:
        kw.update(
            scale=tuple(ref.scale),
            translate=tuple(ref.translate),
            units=tuple(str(u) for u in ref.units),
            axis_labels=tuple(ref.axis_labels),
        )
    if colormap:
        kw["colormap"] = colormap
    return kw


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
        self.slide = ComboBox(label="Slide", choices=lambda *_: _slides(viewer), nullable=True)
        self.model = _ModelChooser("Model", "stain", DEFAULT_STAIN_MODEL)
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
        buttons = Container(
            widgets=[self.start_button, self.stop_button], layout="horizontal", labels=False
        )
        buttons.margins = (0, 0, 0, 0)
        export_buttons = Container(
            widgets=[self.export_button, self.export_cancel], layout="horizontal", labels=False
        )
        export_buttons.margins = (0, 0, 0, 0)
        super().__init__(
            widgets=[
                self.slide,
                self.model,
                self.strategy,
                self.tile,
                self.device,
                self.precision,
                self.disk_cache,
                self.cache_mb,
                buttons,
                self.tiles,
                self.status,
                Label(value="<b>Export</b>"),
                self.export_what,
                self.export_path,
                export_buttons,
                self.export_progress,
                self.export_status,
            ],
            labels=True,
        )
        _wrap(self.status)
        _wrap(self.export_status)
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
        slide = slide or self.slide.value or next(iter(_slides(self._viewer)), None)
        return live_layers(self._viewer, "gan").get(slide)

    def start(self, *_: Any) -> None:
        """Start (or resume) staining what is on screen."""
        slide = _chosen_slide(self.slide, self._viewer)
        mosaic = _mosaic(self._viewer, slide) if slide else None
        if mosaic is None:
            self.status.value = "Open a slide first."
            return
        settings = self.settings()
        if settings is None:
            self.status.value = "Choose a checkpoint file (or a bundled model)."
            return
        from napari_confocal_stain.napari._live import shared_cache

        shared_cache(int(self.cache_mb.value))
        self.status.value = "Loading the model…"
        self.start_button.enabled = False

        def ok(resolved: dict) -> None:
            self.start_button.enabled = True
            self._show(slide, mosaic, replace(settings, **resolved))

        def failed(exc: BaseException, model: str) -> None:
            from napari.utils.notifications import show_error

            self.start_button.enabled = True
            text = describe(exc, model)
            self.status.value = f"Not started: {text}"
            show_error(f"GAN stain: {text}")

        from napari_confocal_stain.napari._live import GAN_MARGIN

        margin = min(GAN_MARGIN, settings.tile // 2)

        def load_stain(*_: Any) -> None:
            _check_model_async(
                settings.model, settings.device, ok, lambda e: failed(e, settings.model),
                "stain", settings.precision, warm_tile=(settings.tile, margin),
            )  # fmt: skip

        # One model after the other, so a failure is reported once and no layer appears.
        if settings.despeckle is not None:
            _check_model_async(
                settings.despeckle, settings.device, load_stain,
                lambda e: failed(e, settings.despeckle), "despeckle",
            )  # fmt: skip
        else:
            load_stain()

    def _show(self, slide: str, mosaic: Any, settings: StainSettings) -> LiveLayer:
        pipeline = StainPipeline(mosaic, settings, slide_id=str(mosaic.source))
        live = self.live(slide)
        if live is not None:
            live.rebind(pipeline)
            live.pause(False)
        else:
            r = _r_layer(self._viewer, slide)
            live = LiveLayer(
                self._viewer,
                pipeline,
                "gan",
                slide=slide,
                role="gan",
                tile=settings.tile,
                disk_root=_tile_cache_dir() if self.disk_cache.value else None,
                cache_mb=int(self.cache_mb.value),
                on_status=self._set_status,
                on_progress=self._set_progress,
                layer_kwargs=_geometry(r, live_layer_name(slide, "gan")),
            )
        return live

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
        from napari.qt.threading import thread_worker

        from napari_confocal_stain.export import export_slide

        slide = _chosen_slide(self.slide, self._viewer)
        mosaic = _mosaic(self._viewer, slide) if slide else None
        settings = self.settings()
        target = Path(out) if out is not None else Path(self.export_path.value or "")
        if mosaic is None:
            self.export_status.value = "Open a slide first."
            return None
        if settings is None:
            self.export_status.value = "Choose a checkpoint file (or a bundled model)."
            return None
        suffixes = (".ome.zarr", ".ome.tif", ".ome.tiff")
        if not target.name or not target.name.lower().endswith(suffixes):
            self.export_status.value = "Choose an output name ending in .ome.zarr or .ome.tif."
            return None
        if self._export_worker is not None:
            self.export_status.value = "An export is running; cancel it first."
            return None
        what = str(self.export_what.value)
        if what == "despeckled-r" and settings.despeckle is None:
            desp = self._despeckle.model.choice if self._despeckle is not None else None
            settings = replace(settings, despeckle=desp or DEFAULT_DESPECKLE_MODEL)
        resume = work_folder(target).exists()
        self._export_cancelled = False

        state = {"done": 0, "total": 1}  # written by the worker, read by a main-thread timer

        @thread_worker
        def _run():
            def progress(done: int, total: int) -> None:
                state.update(done=done, total=total)

            def cancel() -> bool:
                return self._export_cancelled

            # Errors are returned, not raised (one report, in our status line). The runner
            # leaves nothing behind on a failure, except what a resume can finish.
            try:
                path = export_slide(
                    mosaic,
                    target,
                    settings=settings,
                    method="linear" if what == "linear" else "gan",
                    what="despeckled-r" if what == "despeckled-r" else "stain",
                    resume=resume,
                    progress=progress,
                    cancel=cancel,
                )
                return path, None
            except Exception as exc:
                return None, exc

        worker = _run()
        self._export_worker = worker
        self.export_button.enabled = False
        self.export_cancel.enabled = True
        verb = "Resuming" if resume else "Exporting"
        self.export_status.value = f"{verb} {slide} → {target.name}…"
        self.export_progress.value = 0
        from qtpy.QtCore import QTimer

        timer = QTimer()
        timer.setInterval(500)

        def poll() -> None:
            pct = int(100 * state["done"] / max(state["total"], 1))
            self.export_status.value = f"{verb} {slide} → {target.name}: {pct} %"
            self.export_progress.value = pct

        timer.timeout.connect(poll)

        def finished(result: tuple[Any, BaseException | None]) -> None:
            from napari.utils.notifications import show_error, show_info

            timer.stop()
            self._export_worker = None
            self.export_button.enabled = True
            self.export_cancel.enabled = False
            path, exc = result
            if exc is None:
                self.export_progress.value = 100
                self.export_status.value = f"Exported {path}"
                show_info(f"Exported {slide} to {path}")
            elif self._export_cancelled:
                self.export_status.value = (
                    f"Export cancelled; export to {target.name} again to resume."
                )
            else:
                text = describe(exc, target)
                self.export_status.value = f"Export failed: {text}"
                show_error(f"Export: {text}")

        worker.returned.connect(finished)
        worker.finished.connect(lambda: setattr(self, "_export_worker", None))
        timer.start()
        worker.start()
        return worker

    def cancel_export(self) -> None:
        """Stop the running export between chunks (it can be resumed later)."""
        if self._export_worker is not None:
            self._export_cancelled = True
            self.export_status.value = "Cancelling after the current chunk…"


class CompareWidget(Container):
    """Side by side (linked pan/zoom) or overlaid: the raw modes and the stains of a slide.

    Parameters
    ----------
    viewer
        The napari viewer.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.side_button = PushButton(text="Side by side")
        self.overlay_button = PushButton(text="Overlay")
        self.status = Label(value="")
        row = Container(
            widgets=[self.side_button, self.overlay_button], layout="horizontal", labels=False
        )
        row.margins = (0, 0, 0, 0)
        super().__init__(widgets=[row, self.status], labels=False)
        self.margins = (0, 0, 0, 0)
        _wrap(self.status)
        self._hidden: list[Any] = []
        self.side_button.changed.connect(lambda *_: self.side_by_side())
        self.overlay_button.changed.connect(lambda *_: self.overlay())

    def _slide(self) -> str | None:
        active = self._viewer.layers.selection.active
        if active is not None and _meta(active).get("slide"):
            return _meta(active)["slide"]
        slides = _slides(self._viewer)
        return slides[0] if slides else None

    def panels(self, slide: str) -> list[Any]:
        """The slide's layers in panel order (R, F, despeckled R, linear, GAN)."""
        by_role: dict[str, Any] = {}
        for lyr in self._viewer.layers:
            m = _meta(lyr)
            if m.get("slide") == slide and m.get("role") in COMPARE_ROLES:
                by_role.setdefault(m["role"], lyr)
        return [by_role[r] for r in COMPARE_ROLES if r in by_role]

    def side_by_side(self, slide: str | None = None) -> list[Any]:
        """One panel per layer, linked pan/zoom (napari grid mode); returns the panels."""
        slide = slide or self._slide()
        if slide is None:
            self.status.value = "Open a slide first."
            return []
        panels = self.panels(slide)
        layers = self._viewer.layers
        # Layers that are not panels (other slides, heatmaps, points) would get cells too.
        self._hidden = [lyr for lyr in layers if lyr not in panels and lyr.visible]
        for lyr in self._hidden:
            lyr.visible = False
        for lyr in panels:
            lyr.visible = True
            lyr.opacity = 1.0
            if getattr(lyr, "blending", None) == "additive":
                lyr.blending = "translucent_no_depth"
        # napari fills the grid from the bottom of the layer list (hidden layers take no
        # cell): move the panels to the top in order, so R ends up top-left.
        for lyr in panels:
            layers.move(layers.index(lyr), len(layers))
        grid = self._viewer.canvas.grid
        grid.stride = 1
        cols = 3 if len(panels) > 4 else 2
        grid.shape = (-(-len(panels) // cols), cols)
        grid.enabled = True
        self.status.value = (
            f"{slide}: {len(panels)} panels ({', '.join(_meta(p)['role'] for p in panels)}), "
            "pan/zoom linked"
        )
        return panels

    def overlay(self, slide: str | None = None) -> list[Any]:
        """Back to one view: stains over the raw modes, the GAN stain on top."""
        slide = slide or self._slide()
        self._viewer.canvas.grid.enabled = False
        for lyr in self._hidden:
            try:
                lyr.visible = True
            except RuntimeError:  # removed meanwhile
                pass
        self._hidden = []
        if slide is None:
            return []
        panels = self.panels(slide)
        layers = self._viewer.layers
        for lyr in panels:  # R at the bottom … GAN on top
            layers.move(layers.index(lyr), len(layers))
        for lyr in panels:
            role = _meta(lyr)["role"]
            lyr.visible = role in ("R", "gan") or (
                role == "linear" and not any(_meta(p)["role"] == "gan" for p in panels)
            )
        if any(_meta(p)["role"] == "F" for p in panels):
            next(p for p in panels if _meta(p)["role"] == "F").blending = "additive"
        self.status.value = f"{slide}: overlay (toggle layers' visibility to compare)"
        return panels
