"""Compare: a slide's raw modes and stains side by side (linked pan/zoom) or overlaid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, Label, PushButton

from napari_confocal_stain.napari._viewer_state import layer_meta, slide_names
from napari_confocal_stain.napari._widget_parts import button_row, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["COMPARE_ROLES", "CompareWidget"]

COMPARE_ROLES = ("R", "F", "despeckled", "linear", "linear-despeckled", "gan")
"""Panel order of the side-by-side view: raw modes first, then the stains."""


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
        row = button_row(self.side_button, self.overlay_button)
        super().__init__(widgets=[row, self.status], labels=False)
        self.margins = (0, 0, 0, 0)
        wrap_label(self.status)
        self._hidden: list[Any] = []
        self.side_button.changed.connect(lambda *_: self.side_by_side())
        self.overlay_button.changed.connect(lambda *_: self.overlay())

    def _slide(self) -> str | None:
        active = self._viewer.layers.selection.active
        if active is not None and layer_meta(active).get("slide"):
            return layer_meta(active)["slide"]
        slides = slide_names(self._viewer)
        return slides[0] if slides else None

    def panels(self, slide: str) -> list[Any]:
        """The slide's layers in panel order (R, F, despeckled R, linear, GAN)."""
        by_role: dict[str, Any] = {}
        for lyr in self._viewer.layers:
            m = layer_meta(lyr)
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
            f"{slide}: {len(panels)} panels ({', '.join(layer_meta(p)['role'] for p in panels)}), "
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
            role = layer_meta(lyr)["role"]
            lyr.visible = role in ("R", "gan") or (
                role == "linear" and not any(layer_meta(p)["role"] == "gan" for p in panels)
            )
        if any(layer_meta(p)["role"] == "F" for p in panels):
            next(p for p in panels if layer_meta(p)["role"] == "F").blending = "additive"
        self.status.value = f"{slide}: overlay (toggle layers' visibility to compare)"
        return panels
