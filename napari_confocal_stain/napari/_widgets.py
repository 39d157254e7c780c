"""Dock widgets: the main "Confocal stain" panel and the "Linear stain" widget.

They are magicgui containers (no Qt code of our own) driven by a napari viewer. Every
failure the user can cause is reported as one notification and in the widget's status
line; nothing here raises into napari's event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
)

from napari_confocal_stain.core.linear_stain import (
    BEER_LAMBERT_DEFAULTS,
    GAREAU_DEFAULTS,
)
from napari_confocal_stain.engine.linear_view import LinearStainView
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._layers import META_KEY, layer_name

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_confocal_stain.io.mosaic import ConfocalMosaic

PLUGIN = "napari-confocal-stain"

METHOD_LABELS = {"gareau": "Gareau (affine)", "beer-lambert": "Beer–Lambert (Giacomelli)"}


PANEL_WIDTH = 440


def _wrap(label: Label) -> None:
    """Let a status label wrap instead of widening the dock."""
    label.native.setWordWrap(True)


def _meta(layer: Any) -> dict:
    return layer.metadata.get(META_KEY, {}) if hasattr(layer, "metadata") else {}


def slide_layers(viewer: napari.viewer.Viewer, role: str = "R") -> dict[str, Any]:
    """Map slide name -> the layer of the given role (``"R"``, ``"F"``, ``"linear"``)."""
    return {_meta(lyr)["slide"]: lyr for lyr in viewer.layers if _meta(lyr).get("role") == role}


def slide_mosaic(viewer: napari.viewer.Viewer, slide: str) -> ConfocalMosaic | None:
    """The ConfocalMosaic behind a slide's R layer, or None if it was removed."""
    layer = slide_layers(viewer, "R").get(slide)
    return None if layer is None else layer.metadata.get("confocal_mosaic")


class _Vector(Container):
    """Three spin boxes for an RGB vector, in one row."""

    def __init__(self, label: str, value: Sequence[float], maximum: float, tooltip: str) -> None:
        self._boxes = [
            FloatSpinBox(value=v, min=0.0, max=maximum, step=0.01, tooltip=f"{tooltip} ({c})")
            for v, c in zip(value, "RGB", strict=True)
        ]
        super().__init__(widgets=self._boxes, layout="horizontal", label=label, labels=False)
        self.margins = (0, 0, 0, 0)
        for box in self._boxes:
            box.min_width = 60  # three in a row must fit a narrow dock

    @property
    def vector(self) -> tuple[float, float, float]:
        return tuple(float(b.value) for b in self._boxes)  # type: ignore[return-value]

    @vector.setter
    def vector(self, value: Sequence[float]) -> None:
        for box, v in zip(self._boxes, value, strict=True):
            box.value = float(v)


class LinearStainWidget(Container):
    """Stain a slide with the Gareau or Beer–Lambert mapping and show it as an RGB layer.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.slide = ComboBox(label="Slide", choices=self._slide_choices, nullable=False)
        self.method = ComboBox(
            label="Method",
            choices=[(lbl, key) for key, lbl in METHOD_LABELS.items()],
            value="gareau",
            tooltip="Gareau: 1 − F·(1 − H) − R·(1 − E). "
            "Beer–Lambert: exp(−β_F k_F F − β_R k_R R).",
        )
        self.h = _Vector("Hematoxylin H", GAREAU_DEFAULTS["h"], 1.0, "colour of nuclei")
        self.e = _Vector("Eosin E", GAREAU_DEFAULTS["e"], 1.0, "colour of cytoplasm/collagen")
        bl = BEER_LAMBERT_DEFAULTS
        self.beta_nuclear = _Vector("β nuclear", bl["beta_nuclear"], 5.0, "attenuation of F")
        self.beta_cyto = _Vector("β cytoplasm", bl["beta_cyto"], 5.0, "attenuation of R")
        self.k_f = FloatSpinBox(label="k F", value=bl["k_f"], min=0.0, max=100.0, step=0.5)
        self.k_r = FloatSpinBox(label="k R", value=bl["k_r"], min=0.0, max=100.0, step=0.5)
        self.live = CheckBox(text="Update the stain layer as I edit", value=True)
        self.apply_button = PushButton(text="Stain slide")
        self.reset_button = PushButton(text="Reset to published values")
        self.status = Label(value="")
        super().__init__(
            widgets=[
                self.slide,
                self.method,
                self.h,
                self.e,
                self.beta_nuclear,
                self.beta_cyto,
                self.k_f,
                self.k_r,
                self.live,
                self.apply_button,
                self.reset_button,
                self.status,
            ],
            labels=True,
        )
        _wrap(self.status)
        self._show_method_params()
        self.apply_button.changed.connect(self.apply)
        self.reset_button.changed.connect(self.reset)
        self.method.changed.connect(self._show_method_params)
        for w in (
            self.method,
            self.h,
            self.e,
            self.beta_nuclear,
            self.beta_cyto,
            self.k_f,
            self.k_r,
        ):
            w.changed.connect(self._on_param_changed)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)

    # -- parameters -------------------------------------------------------------------
    def _slide_choices(self, _widget: Any = None) -> list[str]:
        return list(slide_layers(self._viewer, "R"))

    def _show_method_params(self, *_: Any) -> None:
        gareau = self.method.value == "gareau"
        for w in (self.h, self.e):
            w.visible = gareau
        for w in (self.beta_nuclear, self.beta_cyto, self.k_f, self.k_r):
            w.visible = not gareau

    def coefficients(self) -> dict[str, Any]:
        """The current method's coefficients, as :func:`linear_stain` takes them."""
        if self.method.value == "gareau":
            return {"h": self.h.vector, "e": self.e.vector}
        return {
            "beta_nuclear": self.beta_nuclear.vector,
            "beta_cyto": self.beta_cyto.vector,
            "k_f": float(self.k_f.value),
            "k_r": float(self.k_r.value),
        }

    def reset(self, *_: Any) -> None:
        """Restore the published coefficients of both methods."""
        with self.changed.blocked():
            self.h.vector = GAREAU_DEFAULTS["h"]
            self.e.vector = GAREAU_DEFAULTS["e"]
            bl = BEER_LAMBERT_DEFAULTS
            self.beta_nuclear.vector = bl["beta_nuclear"]
            self.beta_cyto.vector = bl["beta_cyto"]
            self.k_f.value = bl["k_f"]
            self.k_r.value = bl["k_r"]
        self._on_param_changed()

    def _on_param_changed(self, *_: Any) -> None:
        if self.live.value and self.slide.value in slide_layers(self._viewer, "linear"):
            self.apply()

    # -- action -----------------------------------------------------------------------
    def apply(self, *_: Any) -> Any:
        """Add (or update in place) the linear-stain layer of the chosen slide.

        Returns
        -------
        napari.layers.Image or None
            The stain layer, or None if nothing could be stained (see the status line).
        """
        from napari.utils.notifications import show_error

        slide = self.slide.value
        mosaic = slide_mosaic(self._viewer, slide) if slide else None
        if mosaic is None:
            self.status.value = "Open a slide first (File ▸ Open, or the sample slide)."
            return None
        method = self.method.value
        try:
            # uint8 views read on slicing (a quarter of a float texture): only the file
            # tiles under the view, stained by table lookup for 8-bit slides.
            levels = LinearStainView(mosaic, method, self.coefficients()).levels()
        except Exception as exc:
            text = describe(exc, mosaic.source)
            self.status.value = f"Not stained: {text}"
            show_error(f"Linear stain: {text}")
            return None
        meta = {
            META_KEY: {
                "role": "linear",
                "slide": slide,
                "method": method,
                "coefficients": self.coefficients(),
            },
            "confocal_mosaic": mosaic,
        }
        name = layer_name(slide, "linear", METHOD_LABELS[method])
        layer = slide_layers(self._viewer, "linear").get(slide)
        if layer is None:
            px = float(mosaic.pixel_size_um)
            layer = self._viewer.add_image(
                levels,
                rgb=True,
                multiscale=True,
                contrast_limits=(0, 255),
                scale=(px, px),
                units=("um", "um"),
                axis_labels=("y", "x"),
                name=name,
                metadata=meta,
            )
        else:
            layer.data = levels
            layer.name = name
            layer.metadata = meta
        self.status.value = f"{name}: {len(levels)} levels, {mosaic.shape[1]}×{mosaic.shape[0]} px"
        return layer


class ConfocalStainWidget(Container):
    """The plugin's main panel: open a slide (or the sample) and stain it.

    This is the widget ``napari -w napari-confocal-stain`` docks: slide, compare (side by
    side / overlay), and the GAN stain, linear stain, despeckle and heatmaps tools as tabs.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.sample_button = PushButton(text="Open the sample slide")
        self.path = FileEdit(
            label="Slide",
            mode="d",
            tooltip="A Vivascope mosaic folder, an OME-Zarr, or a folder with *_R.tif / *_F.tif",
        )
        self.open_button = PushButton(text="Open slide")
        self.stain_on_open = CheckBox(text="Show the linear stain when a slide opens", value=True)
        self.info = Label(value="No slide open.")
        self.linear = LinearStainWidget(viewer)
        from napari_confocal_stain.napari._stain_widgets import (
            CompareWidget,
            DespeckleWidget,
            GanStainWidget,
        )

        self.despeckle = DespeckleWidget(viewer, on_change=lambda: self.gan.despeckle_changed())
        self.gan = GanStainWidget(viewer, despeckle=self.despeckle)
        self.compare = CompareWidget(viewer)
        from napari_confocal_stain.napari._heatmaps import HeatmapsWidget

        self.heatmaps = HeatmapsWidget(viewer)
        self._auto_stained: set[str] = set()
        super().__init__(
            widgets=[
                Label(value="<b>Slide</b>"),
                self.sample_button,
                self.path,
                self.open_button,
                self.stain_on_open,
                self.info,
                Label(value="<b>Compare</b>"),
                self.compare,
            ],
            labels=False,
        )
        self._add_tabs(
            [
                ("GAN stain", self.gan),
                ("Linear stain", self.linear),
                ("Despeckle", self.despeckle),
                ("Heatmaps", self.heatmaps),
            ]
        )
        _wrap(self.info)
        self.max_width = PANEL_WIDTH  # leave the canvas most of the window
        self.sample_button.changed.connect(self.open_sample)
        self.open_button.changed.connect(lambda *_: self.open_path(self.path.value))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        # Slides opened before the panel (e.g. `napari SLIDE -w napari-confocal-stain`).
        self._on_layers_changed()

    def _add_tabs(self, tabs: list[tuple[str, Container]]) -> None:
        """The tools as tabs under the slide section (one screen, no long scroll)."""
        from qtpy.QtWidgets import QTabWidget

        self.tabs = QTabWidget()
        for title, widget in tabs:
            self.tabs.addTab(widget.native, title)
        self.native.layout().addWidget(self.tabs)

    def _on_layers_changed(self, *_: Any) -> None:
        self._refresh_info()
        if self.stain_on_open.value:
            from qtpy.QtCore import QTimer

            # Deferred: adding a layer from inside the layer list's own event is fragile.
            QTimer.singleShot(0, self._stain_new_slides)

    def _stain_new_slides(self) -> None:
        """Add the linear stain of every slide whose R and F are open but not yet stained."""
        stained = slide_layers(self._viewer, "linear")
        complete = set(slide_layers(self._viewer, "R")) & set(slide_layers(self._viewer, "F"))
        for slide in sorted(complete - set(stained) - self._auto_stained):
            self._auto_stained.add(slide)  # once: removing the stain layer is respected
            self.linear.reset_choices()
            self.linear.slide.value = slide
            self.linear.apply()

    def _refresh_info(self, *_: Any) -> None:
        slides = slide_layers(self._viewer, "R")
        if not slides:
            self.info.value = "No slide open."
            return
        lines = []
        for name, layer in slides.items():
            i = _meta(layer).get("info", {})
            shape = i.get("shape", ("?", "?"))
            lines.append(
                f"{name}: {shape[1]}×{shape[0]} px, {i.get('levels', '?')} levels, "
                f"{i.get('pixel_size_um', '?')} µm/px, {i.get('layout', '?')}"
            )
        self.info.value = "\n".join(lines)

    def open_path(self, path: str | Path) -> list:
        """Open a slide through this plugin's reader (errors become a notification)."""
        from napari.utils.notifications import show_error

        from napari_confocal_stain.napari._errors import describe
        from napari_confocal_stain.napari._reader import read_mosaic

        before = set(self._viewer.layers)
        try:
            return [
                self._viewer.add_image(data, **kwargs)
                for data, kwargs, _ in read_mosaic(str(path))
            ]
        except Exception as exc:
            # napari reads the first view while adding a layer: a bad region there (NaN,
            # a corrupt tile) fails the whole slide, as it would at opening.
            for layer in [lay for lay in self._viewer.layers if lay not in before]:
                self._viewer.layers.remove(layer)
            show_error(f"Could not open confocal slide: {describe(exc, path)}")
            return []

    def open_sample(self, *_: Any) -> Any:
        """Open the synthetic sample slide; the first time it is generated in a thread."""
        from napari.qt.threading import thread_worker

        from napari_confocal_stain.io.sample import sample_slide_path

        self.sample_button.enabled = False
        self.info.value = "Preparing the sample slide…"

        @thread_worker(progress={"desc": "Preparing the sample slide"})
        def _prepare() -> tuple[Path | None, BaseException | None]:
            # Returned, not raised: napari would report a raised error a second time.
            try:
                return sample_slide_path(), None
            except Exception as exc:
                return None, exc

        def done(result: tuple[Path | None, BaseException | None]) -> None:
            path, exc = result
            if exc is None:
                self._sample_ready(path)
            else:
                self._sample_failed(exc)

        worker = _prepare()
        worker.returned.connect(done)
        worker.finished.connect(lambda: setattr(self.sample_button, "enabled", True))
        worker.start()
        return worker

    def _sample_ready(self, path: Path) -> None:
        self.open_path(path)

    def _sample_failed(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        text = describe(exc)
        self.info.value = f"Sample slide failed: {text}"
        show_error(f"Could not prepare the sample slide: {text}")
