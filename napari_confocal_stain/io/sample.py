"""The bundled sample slide: a small synthetic Vivascope mosaic, made once and cached.

The sample is generated (deterministically) rather than shipped so the wheel stays
small; the first call writes it to the user's cache folder and later calls return the
same folder at once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

SAMPLE_SIZE = (4096, 4096)
SAMPLE_SEED = 1
CACHE_ENV = "NAPARI_CONFOCAL_STAIN_CACHE"


def cache_dir() -> Path:
    """Folder for generated samples and (later) tile caches.

    Returns
    -------
    pathlib.Path
        ``$NAPARI_CONFOCAL_STAIN_CACHE`` if set, else the platform's user cache folder.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-confocal-stain", appauthor=False))


def sample_slide_path(
    size: tuple[int, int] = SAMPLE_SIZE,
    seed: int = SAMPLE_SEED,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Return the folder of the sample slide, generating it on first use.

    Parameters
    ----------
    size
        (height, width) of the slide in pixels.
    seed
        Generator seed.
    progress
        Optional ``progress(done, total)`` callback while generating.

    Returns
    -------
    pathlib.Path
        A Vivascope mosaic folder (``DET#1/highres_raw.tif``, ``DET#2/highres_raw.tif``).
    """
    from napari_confocal_stain.io.synthetic import SYNTH_VERSION, write_synthetic_mosaic

    # Keyed on the generator's version so a changed generator never reuses a stale sample.
    # The last folder name becomes the slide's name in napari, so keep it readable.
    version = f"v{SYNTH_VERSION}-{size[0]}x{size[1]}-seed{seed}"
    out = cache_dir() / "samples" / version / "synthetic-skin"
    if _complete(out):
        return out
    if out.exists():  # left over by an older, interrupted version: start again
        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_synthetic_mosaic(out, size=size, seed=seed, progress=progress)
    except Exception:
        # Another process may have finished the same sample first.
        if _complete(out):
            return out
        raise
    return out


def _complete(folder: Path) -> bool:
    return all((folder / det / "highres_raw.tif").is_file() for det in ("DET#1", "DET#2"))
