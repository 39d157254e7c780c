"""What a tile of each product is: despeckled R, linear stain, GAN stain (no Qt, no caching).

A :class:`StainPipeline` binds a :class:`~napari_confocal_stain.io.mosaic.ConfocalMosaic` to a
:class:`StainSettings` and computes any rectangle of any pyramid level, reading only that
rectangle plus the context it needs from the lazy mosaic. The viewer's tile renderer
(:mod:`napari_confocal_stain.engine.renderer`), the whole-slide export and the metrics
command all call these same functions, so a tile looks the same wherever it is computed.

Context rules (why the results do not depend on how a slide is cut):

* **Despeckling** is exact: the region is read with the net's receptive radius (+1 for the
  3×3 median) on every side, clipped at the slide edge where the net pads exactly as on the
  whole slide, and cropped.
* **The linear stain** is per pixel.
* **The GAN stain** of a box is ``stain_region`` on the box grown by ``context`` pixels
  (clipped at the slide edge), with the statistics lattice anchored at the level's origin
  (``origin``), cropped back. Neighbouring boxes therefore share one lattice and differ only
  through what each saw as context near its border; callers cross-fade over that context
  (the renderer does, over ``2·context`` pixels).

Coarse levels are stained from that level's own pixels (a fast overview); level 0 at the
slide's native pixel size.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.engine.cache import scope_key
from napari_confocal_stain.models.defaults import DEFAULT_DESPECKLE_MODEL, DEFAULT_STAIN_MODEL

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from napari_confocal_stain.io.mosaic import ConfocalMosaic

__all__ = [
    "BACKGROUND_NICE",
    "PRODUCTS",
    "Box",
    "StainPipeline",
    "StainSettings",
    "get_model",
    "read_array",
    "read_normalized",
    "to_uint8",
    "warm_up",
    "worker_thread_init",
]


PRODUCTS = ("despeckled-r", "linear", "gan")
"""What a pipeline can compute: despeckled reflectance, linear stain, GAN stain."""


@dataclass(frozen=True)
class StainSettings:
    """Everything that changes a product's pixels (hashable; see :meth:`scope`).

    Parameters
    ----------
    despeckle
        Despeckle R before staining: a bundled model name or a checkpoint path; ``None``
        stains raw R.
    median
        3×3 median after the despeckling net (Combalia's recipe).
    linear_method
        ``"gareau"`` (the GAN's input) or ``"beer-lambert"``.
    linear_coefficients
        ``(name, value)`` pairs overriding the linear method's constants.
    model
        GAN stain generator: a bundled model name or a checkpoint path.
    strategy
        Tiling strategy of :func:`~napari_confocal_stain.inference.stain_region`.
    tile
        Statistics tile of the strategy (the scale the model was trained at).
    device, precision
        As for ``stain_region``; they may change pixels (bf16 vs fp32), so they are in the scope.
    """

    despeckle: str | None = None
    median: bool = True
    linear_method: str = "gareau"
    linear_coefficients: tuple[tuple[str, Any], ...] = ()
    model: str = DEFAULT_STAIN_MODEL
    strategy: str = "seamless"
    tile: int = 512
    device: str = "auto"
    precision: str = "auto"

    def scope(self, product: str, slide: str) -> str:
        """A stable key of everything that determines ``product``'s pixels on ``slide``.

        Only the settings the product depends on are included, so changing the GAN model
        does not invalidate the despeckled reflectance, and so on.
        """
        if product not in PRODUCTS:
            raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")
        fields: dict[str, Any] = {"product": product, "slide": slide}
        if self.despeckle is not None:
            fields["despeckle"] = _identity(self.despeckle)
            fields["median"] = self.median
        if product in ("linear", "gan"):
            fields["linear"] = [self.linear_method, [list(c) for c in self.linear_coefficients]]
        if product == "gan":
            fields.update(
                model=_identity(self.model),
                strategy=self.strategy,
                tile=self.tile,
                precision=self.precision,
                device=self.device,
            )
        return scope_key(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for provenance metadata)."""
        d = asdict(self)
        d["linear_coefficients"] = [list(c) for c in self.linear_coefficients]
        return d


def _identity(name_or_path: str) -> str:
    """A bundled name as is; a file by its absolute path, size and modification time."""
    p = Path(name_or_path)
    try:
        if p.suffix and p.exists():
            st = p.stat()
            return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except (OSError, RuntimeError):  # unreadable folder, link loop: load_model says which
        pass
    return str(name_or_path)


_MODELS: dict[tuple[str, str, str], nn.Module] = {}
_MODELS_LOCK = threading.Lock()


def get_model(name_or_path: str, device: str = "auto", kind: str = "stain") -> nn.Module:
    """Load a model once per process (bundled name or checkpoint path) and keep it.

    Parameters
    ----------
    name_or_path
        Bundled weight name (see ``models.checkpoint.available_weights``)
        or a ``.safetensors`` / legacy ``.pt`` path.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, …; an absent accelerator falls back to the CPU.
    kind
        ``"stain"`` or ``"despeckle"`` (only part of the cache key, for messages).

    Raises
    ------
    napari_confocal_stain.errors.CheckpointError
        The file is missing, not a checkpoint, tampered with, or does not fit its architecture.
    """
    from napari_confocal_stain.inference import load_model

    key = (_identity(str(name_or_path)), str(device), kind)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = load_model(name_or_path, device=device, fallback=True)
            _MODELS[key] = model
    return model


def read_array(arr: Any) -> np.ndarray:
    """A dask (or numpy) slice as float32 numpy, safe to call from a worker thread.

    ``callbacks=()`` keeps dask from using (and, while computing, swapping out) the global
    callbacks: napari registers its dask cache globally while it slices on the main thread,
    and that cache's bookkeeping is not thread-safe (a concurrent compute fails with a
    ``KeyError`` in ``dask.cache``).
    """
    if hasattr(arr, "dask"):
        arr = arr.compute(callbacks=())
    return np.asarray(arr, dtype=np.float32)


def read_normalized(mosaic: ConfocalMosaic, mode: str, level: int, box: Box) -> np.ndarray:
    """Normalised R or F (``mode`` ``"r"``/``"f"``) of a box of a level, float32 ``(h, w)``.

    Equal to ``read_array(mosaic.r[level][y0:y1, x0:x1])``. Levels the file stores are read
    straight from its planes, decoding only the file tiles under the box; through the dask
    graph every chunk the box touches (1024² by default) would be decoded and normalised
    whole, a cost comparable to the model's on a 544² tile.
    """
    y0, y1, x0, x1 = box
    planes = mosaic.r_raw if mode == "r" else mosaic.f_raw
    stats = (mosaic.metadata.get("norm_stats") or {}).get(mode)
    if level < len(planes) and stats is not None:
        from napari_confocal_stain.core.normalize import apply_normalization

        raw = np.asarray(planes[level][y0:y1, x0:x1])
        return apply_normalization(raw, stats["low"], stats["high"])
    levels = mosaic.r if mode == "r" else mosaic.f
    return read_array(levels[level][y0:y1, x0:x1])


BACKGROUND_NICE = 10
"""How much :func:`worker_thread_init` lowers a background thread's CPU priority (Linux)."""


def worker_thread_init(background: bool = True) -> None:
    """Per-thread set-up for threads that run models behind a user interface.

    * Flush denormals to zero. x86's flush-to-zero / denormals-are-zero flags live in each
      thread's MXCSR register. A new thread starts without them, and a generator's
      activations contain denormal floats that make every multiply that touches them many
      times slower: a U-Net tile took 4× longer in a fresh worker thread than
      in napari's main thread (where a loaded library had set the flags). Outputs in [0, 1]
      stored as uint8 are unaffected.
    * With ``background`` (Linux only), lower this thread's scheduling priority by
      :data:`BACKGROUND_NICE`. Threads the model's thread pool starts from this thread
      inherit it. The GUI thread (and the OpenGL rasteriser's threads, when rendering is in
      software) then get a core the moment they need one, instead of queueing behind the
      model for it; the model still has every idle cycle. Lowering a priority needs no
      privilege; it cannot be raised back in this thread, which ends with its renderer.
    """
    import torch

    torch.set_flush_denormal(True)
    if background and sys.platform.startswith("linux"):
        try:  # on Linux a thread id names one thread: only this one is reniced
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE
            )
        except (AttributeError, OSError):  # a sandbox may forbid it: run at normal priority
            pass


def warm_up(
    model: nn.Module,
    *,
    tile: int,
    context: int = 0,
    precision: str = "fp32",
    device: str = "auto",
) -> None:
    """Run the engine once on a tile as the renderer cuts it, so the first real tile is fast.

    oneDNN (and cuDNN) build their kernels for each new input shape on first use: the first
    U-Net tile costs about twice the next ones on this CPU. What the renderer computes for an
    interior tile is ``tile + 2·context`` pixels a side with the statistics lattice offset by
    ``context``, so :func:`~napari_confocal_stain.inference.stain_region` cuts it into
    the same blocks here (a plain ``tile``-aligned input would build other shapes' kernels
    and leave the first real tile to pay); a tissue-free run caches the model's background
    response (one more forward). Call it where waiting is expected (while "Loading the
    model…").

    It also pays dask's one-off set-up of its first compute (looking for a distributed
    client imports ``dask.distributed`` when installed: 0.3 s here), which would otherwise
    land on the first tile read through the dask graph (levels the file does not store).
    """
    import dask.array as da

    from napari_confocal_stain.inference import stain_region

    read_array(da.zeros((2, 2), chunks=1))
    size = tile + 2 * context
    offset = context % tile
    grey = np.full((size, size, 3), 0.5, dtype=np.float32)  # tissue-like: not skipped
    stain_region(grey, model, tile=tile, precision=precision, device=device,
                 origin=(offset, offset), skip_background=False)  # fmt: skip
    # A tissue-free input: computes (and caches) the model's background response, which
    # the first tile with an empty corner would otherwise compute.
    white = np.ones((size, size, 3), dtype=np.float32)
    stain_region(white, model, tile=tile, precision=precision, device=device,
                 origin=(offset, offset))  # fmt: skip


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 with rounding (what layers, caches and exports store)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass
class StainPipeline:
    """Compute products of one slide for any box of any level.

    Parameters
    ----------
    mosaic
        The opened slide.
    settings
        The products' parameters.
    slide_id
        Identifies the slide in cache scopes (default: the mosaic's source path).
    """

    mosaic: ConfocalMosaic
    settings: StainSettings = field(default_factory=StainSettings)
    slide_id: str | None = None

    def __post_init__(self) -> None:
        if self.slide_id is None:
            self.slide_id = str(getattr(self.mosaic, "source", "slide"))
        self._halo: int | None = None

    # ------------------------------------------------------------------ geometry

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(H, W)`` of every pyramid level, level 0 first."""
        return [tuple(int(s) for s in lvl.shape[:2]) for lvl in self.mosaic.r]

    def scope(self, product: str) -> str:
        """Cache scope of ``product`` on this slide (see :meth:`StainSettings.scope`)."""
        return self.settings.scope(product, str(self.slide_id))

    def _check_box(self, level: int, box: Box) -> Box:
        if not 0 <= level < len(self.mosaic.r):
            raise IndexError(f"level {level} out of range (slide has {len(self.mosaic.r)})")
        h, w = self.level_shapes[level]
        y0, y1, x0, x1 = (int(v) for v in box)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"box {box} is not inside level {level} of shape {(h, w)}")
        return y0, y1, x0, x1

    # ------------------------------------------------------------------ models

    def stain_model(self) -> nn.Module:
        """The GAN generator (loaded once per process)."""
        return get_model(self.settings.model, self.settings.device, "stain")

    def despeckle_model(self) -> nn.Module | None:
        """The despeckling net, or None when R is stained raw."""
        if self.settings.despeckle is None:
            return None
        return get_model(self.settings.despeckle, self.settings.device, "despeckle")

    def despeckle_halo(self) -> int:
        """Context each side the despeckled R of a pixel depends on (net + median)."""
        if self._halo is None:
            from napari_confocal_stain.inference import receptive_radius

            model = self.despeckle_model()
            self._halo = 0 if model is None else receptive_radius(model) + 1
        return self._halo

    # ------------------------------------------------------------------ products

    def raw(self, level: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Normalised R and F of a box, float32 ``(h, w)`` each."""
        y0, y1, x0, x1 = self._check_box(level, box)
        return (
            read_normalized(self.mosaic, "r", level, (y0, y1, x0, x1)),
            read_normalized(self.mosaic, "f", level, (y0, y1, x0, x1)),
        )

    def reflectance(self, level: int, box: Box, *, despeckled: bool | None = None) -> np.ndarray:
        """R of a box, despeckled if the settings (or ``despeckled``) say so.

        Despeckling reads the box with the net's full context, so the result equals the
        despeckled whole slide cropped to the box.
        """
        y0, y1, x0, x1 = self._check_box(level, box)
        use = self.settings.despeckle is not None if despeckled is None else despeckled
        if not use:
            return read_normalized(self.mosaic, "r", level, (y0, y1, x0, x1))
        if self.settings.despeckle is None:
            raise ValueError("despeckled R was asked for but the settings name no despeckle model")
        from napari_confocal_stain.inference import despeckle_region

        h, w = self.level_shapes[level]
        halo = self.despeckle_halo()
        a0, a1, b0, b1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
        r = read_normalized(self.mosaic, "r", level, (a0, a1, b0, b1))
        big = max(r.shape)  # one pass over the read region: exact, no inner tiling
        out = despeckle_region(
            r,
            self.despeckle_model(),
            median=self.settings.median,
            tile=big,
            device=self.settings.device,
        )
        return out[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0]

    def linear(self, level: int, box: Box, *, despeckled: bool | None = None) -> np.ndarray:
        """The linear stain of a box, float32 ``(h, w, 3)`` in [0, 1]."""
        from napari_confocal_stain.core.linear_stain import linear_stain

        y0, y1, x0, x1 = self._check_box(level, box)
        r = self.reflectance(level, box, despeckled=despeckled)
        f = read_normalized(self.mosaic, "f", level, (y0, y1, x0, x1))
        return linear_stain(
            r, f, self.settings.linear_method, **dict(self.settings.linear_coefficients)
        )

    def gan(
        self,
        level: int,
        box: Box,
        *,
        context: int = 0,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
        report: dict | None = None,
    ) -> np.ndarray:
        """The GAN stain of a box grown by ``context`` (clipped to the level), float32.

        Returns the *grown* box's stain (``(gh, gw, 3)``); :meth:`grown` gives its geometry.
        The statistics lattice is anchored at the level's pixel (0, 0), so boxes computed
        separately share it.

        Raises
        ------
        napari_confocal_stain.inference.Cancelled
            ``cancel()`` returned True between blocks.
        """
        from napari_confocal_stain.inference import stain_region

        s = self.settings
        gy0, gy1, gx0, gx1 = self.grown(level, box, context)
        lin = self.linear(level, (gy0, gy1, gx0, gx1))
        return stain_region(
            lin,
            self.stain_model(),
            strategy=s.strategy,
            tile=s.tile,
            device=s.device,
            precision=s.precision,
            origin=((-gy0) % s.tile, (-gx0) % s.tile),
            cancel=cancel,
            progress=progress,
            report=report,
        )

    def grown(self, level: int, box: Box, context: int) -> Box:
        """``box`` grown by ``context`` pixels each side, clipped to the level."""
        y0, y1, x0, x1 = self._check_box(level, box)
        h, w = self.level_shapes[level]
        c = max(0, int(context))
        return max(0, y0 - c), min(h, y1 + c), max(0, x0 - c), min(w, x1 + c)

    def product(self, product: str, level: int, box: Box, **kwargs: Any) -> np.ndarray:
        """Dispatch by name: ``"despeckled-r"``, ``"linear"`` or ``"gan"`` (float32)."""
        if product == "despeckled-r":
            return self.reflectance(level, box, despeckled=True)
        if product == "linear":
            return self.linear(level, box)
        if product == "gan":
            return self.gan(level, box, **kwargs)
        raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")


def default_despeckle_settings(settings: StainSettings) -> StainSettings:
    """``settings`` with the bundled despeckler switched on (if none is set)."""
    if settings.despeckle is not None:
        return settings
    from dataclasses import replace

    return replace(settings, despeckle=DEFAULT_DESPECKLE_MODEL)
