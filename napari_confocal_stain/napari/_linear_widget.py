"""The "Linear stain" widget: Gareau or Beer–Lambert stain of a slide, as an RGB layer.

A magicgui container (no Qt code of our own) driven by a napari viewer; docked on its own
or as a tab of the main panel. Every failure the user can cause is reported as one
notification and in the status line; nothing here raises into napari's event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton

from napari_confocal_stain.core.linear_stain import (
    BEER_LAMBERT_DEFAULTS,
    GAREAU_DEFAULTS,
)
from napari_confocal_stain.engine.linear_view import LinearStainView
from napari_confocal_stain.napari._errors import describe
from napari_confocal_stain.napari._layers import META_KEY, layer_name
from napari_confocal_stain.napari._viewer_state import (
    follow_opened_slides,
    slide_layers,
    slide_mosaic,
)
from napari_confocal_stain.napari._widget_parts import wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["METHOD_LABELS", "LinearStainWidget"]

METHOD_LABELS = {"gareau": "Gareau (affine)", "beer-lambert": "Beer–Lambert (Giacomelli)"}


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
        follow_opened_slides(self._viewer, self.slide)
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
        wrap_label(self.status)
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
