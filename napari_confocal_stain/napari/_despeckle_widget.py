"""The Despeckle tab: a DespeckleNN (+ 3×3 median) on the reflectance, for what is on screen.

The despeckled R is a :class:`~napari_confocal_stain.napari._live.LiveLayer` (computed in
the background, only for what is on screen); the model is loaded in a worker thread first
(:func:`~napari_confocal_stain.napari._model_choice.load_model_async`). Every failure the
user can cause is one notification plus the status line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton

from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings
from napari_confocal_stain.models.defaults import DEFAULT_DESPECKLE_MODEL
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._live import (
    LiveLayer,
    live_layer_name,
    live_layers,
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
from napari_confocal_stain.napari._widget_parts import wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["DespeckleWidget"]


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
        self.slide = ComboBox(label="Slide", choices=lambda *_: slide_names(viewer), nullable=True)
        follow_opened_slides(viewer, self.slide)
        self.model = ModelChooser("Model", "despeckle", DEFAULT_DESPECKLE_MODEL)
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
        wrap_label(self.status)
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
        slide = chosen_slide(self.slide, self._viewer)
        mosaic = slide_mosaic(self._viewer, slide) if slide else None
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

        load_model_async(
            settings.despeckle, settings.device, "despeckle", on_ok=ok, on_error=failed
        )
        return None

    def _show(self, slide: str, mosaic: Any, settings: StainSettings) -> LiveLayer:
        pipeline = StainPipeline(mosaic, settings, slide_id=str(mosaic.source))
        live = live_layers(self._viewer, "despeckled-r").get(slide)
        if live is not None:
            live.rebind(pipeline)
        else:
            r = slide_layers(self._viewer, "R").get(slide)
            live = LiveLayer(
                self._viewer,
                pipeline,
                "despeckled-r",
                slide=slide,
                role="despeckled",
                disk_root=tile_cache_dir(),
                on_status=self._set_status,
                layer_kwargs=overlay_kwargs(r, live_layer_name(slide, "despeckled"), "gray"),
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
