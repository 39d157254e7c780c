"""Shared fixtures: an isolated cache folder and one synthetic slide per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the sample slide and tile caches out of the user's real cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("NAPARI_CONFOCAL_STAIN_CACHE")
    os.environ["NAPARI_CONFOCAL_STAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("NAPARI_CONFOCAL_STAIN_CACHE", None)
    else:
        os.environ["NAPARI_CONFOCAL_STAIN_CACHE"] = old


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Vivascope mosaic (1024 x 1536, seed 3), written once per session."""
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    out = tmp_path_factory.mktemp("slides") / "mosaic_synthetic"
    return write_synthetic_mosaic(out, size=(1024, 1536), seed=3)
