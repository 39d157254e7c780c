"""npe2 sample data: the synthetic confocal skin slide."""

from __future__ import annotations


def sample_slide() -> list:
    """Open the bundled synthetic slide (generated and cached on first use).

    Returns
    -------
    list of layer-data tuples
        R and F as multiscale layers, exactly as the reader gives them.
    """
    from napari.utils import progress

    from napari_confocal_stain.io.readers import open_mosaic
    from napari_confocal_stain.io.sample import sample_slide_path
    from napari_confocal_stain.napari._layers import mosaic_layer_data

    bar: progress | None = None

    def _progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total=total, desc="Generating the sample slide (first time only)")
        bar.update(done - bar.n)

    try:
        path = sample_slide_path(progress=_progress)
    finally:
        if bar is not None:
            bar.close()
    return mosaic_layer_data(open_mosaic(path))
