"""The headless API: one import, every name there, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import napari_confocal_stain


def test_every_public_name_resolves_to_its_owner():
    assert set(napari_confocal_stain.__all__) == {"__version__", *napari_confocal_stain._LAZY}
    for name in napari_confocal_stain.__all__:
        obj = getattr(napari_confocal_stain, name)
        if name != "__version__":
            assert callable(obj), name
            assert obj.__module__.startswith("napari_confocal_stain."), (name, obj.__module__)
    for name in ("open_mosaic", "linear_stain", "load_model", "stain_region",
                 "despeckle_region", "StainPipeline", "hallucination_maps"):  # fmt: skip
        assert name in napari_confocal_stain.__all__


def test_import_is_lazy():
    code = (
        "import sys, napari_confocal_stain as m\n"
        "heavy = [x for x in ('torch', 'pyvips', 'dask', 'zarr', 'napari') if x in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
