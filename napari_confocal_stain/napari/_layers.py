"""Turn a ConfocalMosaic (and its stains) into napari layer-data tuples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from napari_confocal_stain.io.mosaic import ConfocalMosaic

#: Key under which every layer this plugin makes keeps its provenance.
META_KEY = "confocal_stain"

ROLE_NAMES = {
    "R": "reflectance (R)",
    "F": "fluorescence (F)",
    "linear": "linear stain",
}


def layer_name(slide: str, role: str, detail: str = "") -> str:
    """Name a layer so a pathologist can tell slide and content apart."""
    base = f"{slide} · {ROLE_NAMES.get(role, role)}"
    return f"{base} ({detail})" if detail else base


def contrast_limits(mosaic: ConfocalMosaic, role: str) -> tuple[float, float]:
    """Contrast limits of mode ``role`` (``"R"``/``"F"``), from the sample taken at open.

    Given explicitly because napari would otherwise compute them from the data it is
    handed: the coarsest level, which for a single-level file is built from all of level 0.
    """
    limits = (mosaic.metadata.get("contrast_limits") or {}).get(role.lower())
    if limits is None:
        return 0.0, 1.0  # the normalised range
    lo, hi = (float(v) for v in limits)
    return lo, hi


def mosaic_layer_data(mosaic: ConfocalMosaic) -> list[tuple[Any, dict, str]]:
    """R and F of a mosaic as two multiscale grayscale image layers in µm.

    Parameters
    ----------
    mosaic
        The opened slide.

    Returns
    -------
    list of (data, kwargs, "image")
        Layer-data tuples, R first; ``metadata["confocal_stain"]`` records the
        slide and mode and ``metadata["confocal_mosaic"]`` holds the mosaic itself
        so widgets can stain it.
    """
    px = float(mosaic.pixel_size_um)
    info = mosaic.info()
    out = []
    for role, levels, cmap, blending in (
        ("R", mosaic.r, "gray", "translucent_no_depth"),
        ("F", mosaic.f, "gray", "additive"),
    ):
        out.append(
            (
                list(levels),
                {
                    "name": layer_name(mosaic.name, role),
                    "multiscale": True,
                    "scale": (px, px),
                    "units": ("um", "um"),
                    "axis_labels": ("y", "x"),
                    "colormap": cmap,
                    "blending": blending,
                    # F is shown above R but hidden: the raw modes are compared
                    # side by side, and an additive overlay of both confuses.
                    "visible": role == "R",
                    "contrast_limits": contrast_limits(mosaic, role),
                    "metadata": {
                        META_KEY: {"role": role, "slide": mosaic.name, "info": info},
                        "confocal_mosaic": mosaic,
                    },
                },
                "image",
            )
        )
    return out
