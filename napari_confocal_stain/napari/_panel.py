"""The plugin's main dock, "Confocal stain": open a slide, compare, and the tools as tabs.

It assembles the other widgets (GAN stain, linear stain, despeckle, heatmaps, compare);
each stays usable on its own. Every failure the user can cause is one notification and the
info line; nothing here raises into napari's event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton

from napari_confocal_stain.napari._compare_widget import CompareWidget
from napari_confocal_stain.napari._despeckle_widget import DespeckleWidget
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._gan_widget import GanStainWidget
from napari_confocal_stain.napari._heatmaps import HeatmapsWidget
from napari_confocal_stain.napari._linear_widget import LinearStainWidget
from napari_confocal_stain.napari._viewer_state import layer_meta, slide_layers
from napari_confocal_stain.napari._widget_parts import PANEL_WIDTH, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ConfocalStainWidget"]


def _tab_scroll(content: Any) -> Any:
    """``content`` in a vertical-only scroll area never narrower than the content.

    With no horizontal scroll bar, a viewport narrower than the content's minimum width
    would clip its right edge; the area's minimum width follows the content's (plus the
    scroll bar) as it changes, so the dock widens instead.
    """
    from qtpy.QtCore import QEvent, QSize, Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    class TabScroll(QScrollArea):
        def minimumSizeHint(self) -> QSize:
            hint = super().minimumSizeHint()
            inner = self.widget().minimumSizeHint().width()
            inner = max(inner, self.widget().minimumWidth())
            bar = self.verticalScrollBar().sizeHint().width()
            return QSize(max(hint.width(), inner + bar), hint.height())

        def eventFilter(self, obj: Any, event: Any) -> bool:
            if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
                self.updateGeometry()  # the content's minimum width may have changed
            return super().eventFilter(obj, event)

    scroll = TabScroll()
    scroll.setWidget(content)
    scroll.setWidgetResizable(True)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    return scroll


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
        self.despeckle = DespeckleWidget(viewer, on_change=lambda: self.gan.despeckle_changed())
        self.gan = GanStainWidget(viewer, despeckle=self.despeckle)
        self.compare = CompareWidget(viewer)
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
        wrap_label(self.info)
        self.max_width = PANEL_WIDTH  # leave the canvas most of the window
        self.sample_button.changed.connect(self.open_sample)
        self.open_button.changed.connect(lambda *_: self.open_path(self.path.value))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        # Slides opened before the panel (e.g. `napari SLIDE -w napari-confocal-stain`).
        self._on_layers_changed()

    def _add_tabs(self, tabs: list[tuple[str, Container]]) -> None:
        """The tools as tabs under the slide section, each scrolling vertically on its own.

        A tab taller than the screen (the heatmaps with their legend) scrolls instead of
        stretching the dock past the window, which would squeeze and clip its wrapped
        status lines.
        """
        from qtpy.QtWidgets import QTabWidget

        self.tabs = QTabWidget()
        for title, widget in tabs:
            self.tabs.addTab(_tab_scroll(widget.native), title)
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
            i = layer_meta(layer).get("info", {})
            shape = i.get("shape", ("?", "?"))
            lines.append(
                f"{name}: {shape[1]}×{shape[0]} px, {i.get('levels', '?')} levels, "
                f"{i.get('pixel_size_um', '?')} µm/px, {i.get('layout', '?')}"
            )
        self.info.value = "\n".join(lines)

    def open_path(self, path: str | Path) -> list:
        """Open a slide through this plugin's reader (errors become a notification)."""
        from napari.utils.notifications import show_error

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
