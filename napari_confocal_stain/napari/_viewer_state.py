"""What the widgets read off the viewer: our layers by slide and role, and heatmap news.

Every layer this plugin makes records ``metadata[META_KEY] = {"role": …, "slide": …}``
(:mod:`~napari_confocal_stain.napari._layers`); the widgets find slides, their mosaics and
their heatmaps through the functions here rather than keeping lists of their own, so a
layer the user removes is simply gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psygnal import Signal

from napari_confocal_stain.napari._layers import META_KEY

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from magicgui.widgets import ComboBox

    from napari_confocal_stain.io.mosaic import ConfocalMosaic

__all__ = [
    "MetricsBus",
    "chosen_slide",
    "follow_opened_slides",
    "heatmap_layers",
    "layer_meta",
    "metrics_bus",
    "overlay_kwargs",
    "slide_layers",
    "slide_mosaic",
    "slide_names",
]


def layer_meta(layer: Any) -> dict:
    """The plugin's record on a layer (``{}`` for layers that are not ours)."""
    return layer.metadata.get(META_KEY, {}) if hasattr(layer, "metadata") else {}


def slide_layers(viewer: napari.viewer.Viewer, role: str = "R") -> dict[str, Any]:
    """Map slide name -> the layer of the given role (``"R"``, ``"F"``, ``"linear"``)."""
    return {
        layer_meta(lyr)["slide"]: lyr
        for lyr in viewer.layers
        if layer_meta(lyr).get("role") == role
    }


def slide_names(viewer: napari.viewer.Viewer) -> list[str]:
    """The open slides (those with an R layer), sorted."""
    return sorted(slide_layers(viewer, "R"))


def slide_mosaic(viewer: napari.viewer.Viewer, slide: str) -> ConfocalMosaic | None:
    """The ConfocalMosaic behind a slide's R layer, or None if it was removed."""
    layer = slide_layers(viewer, "R").get(slide)
    return None if layer is None else layer.metadata.get("confocal_mosaic")


def chosen_slide(combo: ComboBox, viewer: napari.viewer.Viewer) -> str | None:
    """The combo's slide, else the first open slide (and show it in the combo)."""
    combo.reset_choices()
    if combo.value:
        return str(combo.value)
    slides = slide_names(viewer)
    if slides:
        combo.value = slides[0]
        return slides[0]
    return None


def follow_opened_slides(viewer: napari.viewer.Viewer, combo: ComboBox) -> None:
    """Point a *Slide* combo at every slide as it is opened (its R layer is added).

    However the slide arrives (File ▸ Open, the sample, the panel's *Open slide*, a
    drop), every tab then shows the slide just opened instead of an empty choice.
    """

    def on_inserted(event: Any) -> None:
        meta = layer_meta(getattr(event, "value", None))
        if meta.get("role") != "R" or not meta.get("slide"):
            return
        combo.reset_choices()
        if meta["slide"] in combo.choices:
            combo.value = meta["slide"]

    viewer.layers.events.inserted.connect(on_inserted)


def overlay_kwargs(ref: Any, name: str, colormap: str | None = None) -> dict:
    """Layer kwargs that place a new layer exactly over ``ref`` (a slide's R layer)."""
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


def heatmap_layers(viewer: napari.viewer.Viewer, slide: str | None = None) -> list[Any]:
    """The heatmap Image layers of a slide (all slides if None), in layer-list order."""
    return [
        layer
        for layer in viewer.layers
        if layer_meta(layer).get("role") == "heatmap"
        and (slide is None or layer_meta(layer).get("slide") == slide)
    ]


class MetricsBus:
    """Tells report docks that a slide's maps changed (emitted on the main thread)."""

    updated = Signal(str)


metrics_bus = MetricsBus()
"""Process-wide: the Heatmaps widget emits ``metrics_bus.updated.emit(slide)`` after new
cells are shown; report docks listen."""
