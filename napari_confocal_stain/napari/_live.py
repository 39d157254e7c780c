"""Live layers: napari layers whose pixels a :class:`TileRenderer` computes for what is on screen.

The thin glue between napari and :mod:`napari_confocal_stain.engine.renderer`:

* :class:`LiveImage` is a napari ``Image`` that records, on every draw, the visible box and
  the pyramid level napari chose (napari's own ``corner_pixels`` only grow while zooming in,
  and are expanded to chunk boundaries, so they overstate what is on screen).
* :class:`LiveLayer` debounces those changes (``DEBOUNCE_MS``), tells the renderer what is
  wanted, moves the renderer's "tile done" callbacks to the main thread, refreshes the layer
  at most every ``REFRESH_MS`` while tiles land — and at once when the last visible tile
  lands — and drives a napari progress bar and a status callback. Errors become one
  notification.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from napari.layers.utils.layer_utils import compute_multiscale_level_and_corners
from napari.utils.events import Event
from psygnal import Signal
from qtpy.QtCore import QTimer
from superqt.utils import ensure_main_thread

from napari_confocal_stain.engine.cache import RawTileStore, TileCache
from napari_confocal_stain.engine.linear_view import LinearStainView
from napari_confocal_stain.engine.pipeline import StainPipeline, to_uint8, worker_thread_init
from napari_confocal_stain.engine.renderer import TileRenderer
from napari_confocal_stain.napari._layers import META_KEY, layer_name

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["LiveImage", "LiveLayer", "live_layers", "shared_cache", "tile_cache_dir"]

DEBOUNCE_MS = 80
"""Quiet time after the last camera change before the renderer is told (ms)."""

REFRESH_MS = 1000
"""Shortest interval between layer refreshes while visible tiles are still computing (ms).

The first tile is shown at once and so is the tile that completes the view (see
``_tile_from_worker``); in between, every refresh re-slices and redraws the whole canvas,
and with software OpenGL (no GPU driver) that draw takes both cores away from the tile
worker for tens of milliseconds. Measured on a 1920×1080 view of 12 ``stain-fast`` tiles
(bench/viewport.py, BENCHMARKS.md): whole view on screen after a median 1.13 s refreshing at
most every 500 ms, 0.92 s at most every 1000 ms (1.5 s at 250 ms)."""

GAN_MARGIN = 16
"""Context (pixels each side) of a GAN tile, cross-faded with its neighbours over twice that."""

DEFAULT_CACHE_MB = 768

_CACHE: TileCache | None = None


def tile_cache_dir() -> str:
    """Where live layers keep computed tiles on disk (under the user's cache folder)."""
    from napari_confocal_stain.io.sample import cache_dir

    return str(cache_dir() / "tiles")


def shared_cache(max_mb: int | None = None) -> TileCache:
    """The process-wide tile cache (all live layers share one byte budget)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = TileCache(int((max_mb or DEFAULT_CACHE_MB) * 2**20))
    elif max_mb is not None:
        _CACHE.max_bytes = int(max_mb * 2**20)
    return _CACHE


class LiveImage(Image):
    """A napari Image layer that records the visible box of the level it displays."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events.add(live_view=Event)
        self.live_view: tuple[int, tuple[int, int, int, int]] | None = None

    def forget_coarsest_level(self) -> None:
        """Make napari re-read the coarsest level at the next refresh.

        napari keeps the coarsest level materialised (an lru_cache of ``np.asarray``) for the
        thumbnail and serves slices at that level from it; when one of its tiles lands, that
        copy is stale.
        """
        self._reset_thumbnail_level_data()

    def _update_draw(self, scale_factor, corner_pixels_displayed, shape_threshold):
        super()._update_draw(scale_factor, corner_pixels_displayed, shape_threshold)
        try:
            view = self._visible_view(corner_pixels_displayed, shape_threshold)
        except Exception:  # never break napari's draw loop
            return
        if view is not None and view != self.live_view:
            self.live_view = view
            self.events.live_view(value=view)

    def _visible_view(self, corner_pixels_displayed, shape_threshold):
        if not self.multiscale or self._slice_input.ndisplay != 2:
            return None
        displayed = self._slice_input.displayed
        corners = list(itertools.product(*np.asarray(corner_pixels_displayed).T))
        data = self._transforms[1:].simplified.set_slice(displayed).inverse(corners)
        bbox = np.stack([np.floor(np.min(data, 0)), np.ceil(np.max(data, 0))]).astype(int)
        if self._locked_data_level is not None:
            level = int(self._locked_data_level)
            scaled = bbox / self.downsample_factors[level][displayed]
            scaled = np.array([np.floor(scaled[0]), np.ceil(scaled[1])]).astype(int)
        else:
            level, scaled = compute_multiscale_level_and_corners(
                bbox, shape_threshold, self.downsample_factors[:, displayed]
            )
        h, w = (int(s) for s in np.take(self.data[level].shape, displayed))
        y0, x0 = (int(v) for v in np.maximum(scaled[0], 0))
        y1, x1 = int(min(scaled[1][0] + 1, h)), int(min(scaled[1][1] + 1, w))
        if y1 <= y0 or x1 <= x0:
            return None
        return int(level), (y0, y1, x0, x1)


_LIVE: weakref.WeakValueDictionary[int, LiveLayer] = weakref.WeakValueDictionary()


def live_layers(viewer: napari.viewer.Viewer, product: str = "gan") -> dict[str, LiveLayer]:
    """Map slide name → the live layer of ``product`` currently in ``viewer``."""
    out = {}
    for layer in viewer.layers:
        live = _LIVE.get(id(layer))
        if live is not None and live.product == product and not live.closed:
            out[live.slide] = live
    return out


class LiveLayer:
    """A napari layer of one product of one slide, computed for what is on screen.

    Parameters
    ----------
    viewer
        The viewer to add the layer to.
    pipeline
        The slide and settings (:class:`~napari_confocal_stain.engine.pipeline.StainPipeline`).
    product
        ``"gan"`` (GAN stain, RGB), ``"despeckled-r"`` (grey) or ``"linear"`` (linear stain
        of despeckled R).
    slide
        Slide name (for layer names and metadata).
    role
        Layer role in the plugin's metadata (``"gan"``, ``"despeckled"``,
        ``"linear-despeckled"``).
    tile
        Tile side in pixels of every level.
    disk_root
        Folder of an on-disk tile cache (None: memory only).
    cache_mb
        Byte budget of the shared in-memory cache.
    on_status
        Called on the main thread with a one-line status.
    on_progress
        Called on the main thread with ``(done, needed)`` tiles on screen. (Deliberately not
        a napari ``progress``: while one exists napari animates its activity indicator, and
        on a software-rendered display that repainting starved the tile worker 4-7×.)
    layer_kwargs
        Extra ``Image`` keyword arguments (scale, units, …).
    """

    tile_done = Signal(int, int, int)
    """``(level, ty, tx)``: a tile landed (emitted on the main thread)."""

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        pipeline: StainPipeline,
        product: str,
        *,
        slide: str,
        role: str,
        tile: int = 512,
        disk_root: str | None = None,
        cache_mb: int | None = None,
        on_status: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        layer_kwargs: dict | None = None,
    ) -> None:
        self.viewer = viewer
        self.pipeline = pipeline
        self.product = product
        self.slide = slide
        self.role = role
        self.on_status = on_status
        self.on_progress = on_progress
        self.closed = False
        self._error_shown = False
        self._last_refresh = 0.0
        self._coarsest_changed = False
        self._device_used: str | None = None
        self.tile = int(tile)
        self.disk_root = disk_root
        self.cache_mb = cache_mb
        self.renderer = self._make_renderer(pipeline)
        channels = self.renderer.channels
        scope = self.renderer.scope
        kwargs = dict(layer_kwargs or {})
        meta = kwargs.pop("metadata", {})
        meta = {
            **meta,
            META_KEY: {
                "role": role,
                "slide": slide,
                "settings": pipeline.settings.to_dict(),
                "scope": scope,
            },
        }
        self.layer = LiveImage(
            self.renderer.levels(),
            multiscale=True,
            rgb=channels == 3,
            contrast_limits=(0, 255),
            metadata=meta,
            **kwargs,
        )
        _LIVE[id(self.layer)] = self
        self._debounce = QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self._request)
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._refresh)
        self._poll_timer = QTimer()
        self._poll_timer.setInterval(500)
        self._poll_timer.timeout.connect(self._refresh_status)
        self.layer.events.live_view.connect(lambda _e: self._debounce.start())
        viewer.layers.events.removed.connect(self._on_removed)
        viewer.add_layer(self.layer)

    # ------------------------------------------------------------------ renderer

    def _make_renderer(self, pipeline: StainPipeline) -> TileRenderer:
        from dataclasses import replace

        from napari_confocal_stain.engine.cache import scope_key

        channels = 1 if self.product == "despeckled-r" else 3
        margin = min(GAN_MARGIN if self.product == "gan" else 0, self.tile // 2)
        scope = pipeline.scope(self.product)
        if self.product == "despeckled-r":
            ph_scope = scope_key(product="raw-r", slide=str(pipeline.slide_id))
        else:  # the linear stain of raw R
            raw = replace(pipeline.settings, despeckle=None)
            ph_scope = raw.scope("linear", str(pipeline.slide_id))
        settings = pipeline.settings
        # The placeholder's linear stain follows the renderer's settings (made with it).
        self._linear_view = LinearStainView(
            pipeline.mosaic, settings.linear_method, dict(settings.linear_coefficients)
        )
        store = None
        if self.disk_root is not None:
            store = RawTileStore(
                self.disk_root, scope, pipeline.level_shapes, self.tile, margin, channels
            )
        return TileRenderer(
            pipeline.level_shapes,
            self._compute,
            self._placeholder,
            scope=scope,
            placeholder_scope=ph_scope,
            channels=channels,
            tile=self.tile,
            margin=margin,
            cache=shared_cache(self.cache_mb),
            store=store,
            on_tile=self._tile_from_worker,
            on_error=self._error_from_worker,
            thread_init=worker_thread_init,
        )

    def rebind(self, pipeline: StainPipeline) -> None:
        """Switch to new settings in place: same layer, a new renderer for the new scope.

        Tiles of the old scope stay in the caches (switching back is instant); tiles of
        other products are untouched.
        """
        if pipeline.scope(self.product) == self.renderer.scope:
            self.pipeline = pipeline
            return
        old = self.renderer
        self.pipeline = pipeline
        if self.product == "gan":
            self.tile = int(pipeline.settings.tile)
        self._error_shown = False
        self.renderer = self._make_renderer(pipeline)
        old.close(timeout=0.5)
        meta = dict(self.layer.metadata)
        meta[META_KEY] = {
            **meta.get(META_KEY, {}),
            "settings": pipeline.settings.to_dict(),
            "scope": self.renderer.scope,
        }
        self.layer.metadata = meta
        self.layer.data = self.renderer.levels()
        self._request()

    # ------------------------------------------------------------------ products

    def _compute(self, level: int, box: tuple[int, int, int, int], cancel) -> np.ndarray:
        p = self.pipeline
        if self.product == "gan":
            report: dict = {}
            out = to_uint8(p.gan(level, box, cancel=cancel, report=report))
            used = f"{report.get('device', '?')} {report.get('precision', '')}".strip()
            if self._device_used is not None and used != self._device_used:
                # stain_region fell back (e.g. GPU out of memory → CPU): say so, once.
                self._notify_fallback(f"{self._device_used} → {used}")
            self._device_used = used
            return out
        if self.product == "despeckled-r":
            return to_uint8(p.reflectance(level, box, despeckled=True))
        if self.product == "linear":
            return to_uint8(p.linear(level, box, despeckled=True))
        raise ValueError(f"unknown product {self.product!r}")

    def _placeholder(self, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        if self.product == "despeckled-r":
            return to_uint8(self.pipeline.reflectance(level, box, despeckled=False))
        # The linear stain of raw R, by table lookup when it can be (this runs on the
        # main thread while napari slices).
        return self._linear_view.read(level, box)

    # ------------------------------------------------------------------ view → renderer

    def request_now(self) -> list:
        """Tell the renderer what is visible now (without waiting for the debounce)."""
        self._debounce.stop()
        return self._request()

    def _request(self) -> list:
        if self.closed or self.layer.live_view is None:
            return []
        if not self.layer.visible:
            self.renderer.request(0, (0, 0, 0, 0))  # hidden layers compute nothing
            self._refresh_status()
            return []
        level, box = self.layer.live_view
        todo = self.renderer.request(level, box)
        if todo:
            # A new view: its first tile is shown as soon as it lands, not a throttle later.
            self._last_refresh = 0.0
        self._refresh_status()
        return todo

    # ------------------------------------------------------------------ renderer → view

    @ensure_main_thread
    def _tile_from_worker(self, level: int, ty: int, tx: int) -> None:
        if self.closed:
            return
        self.tile_done.emit(level, ty, tx)
        if level == len(self.renderer.level_shapes) - 1:
            self._coarsest_changed = True
        done, needed = self.renderer.progress()
        if needed and done == needed:
            # The view is complete: show it now, whatever the throttle says.
            self._refresh_timer.stop()
            self._refresh()
        elif not self._refresh_timer.isActive():
            # Throttle: at most one refresh per REFRESH_MS, the first one without delay.
            wait = max(0.0, REFRESH_MS / 1000 - (time.perf_counter() - self._last_refresh))
            self._refresh_timer.start(int(wait * 1000))

    def _refresh(self) -> None:
        if self.closed:
            return
        self._last_refresh = time.perf_counter()
        if self._coarsest_changed:
            self._coarsest_changed = False
            self.layer.forget_coarsest_level()
        self.layer.refresh(thumbnail=False, extent=False)
        self._refresh_status()

    @ensure_main_thread
    def _notify_fallback(self, change: str) -> None:
        from napari.utils.notifications import show_warning

        show_warning(
            f"{self.layer.name}: now running on {change} (out of memory on the device; "
            "a smaller tile size keeps it on the GPU)"
        )

    @ensure_main_thread
    def _error_from_worker(self, message: str) -> None:
        if self.closed:
            return
        text = f"{self.layer.name}: stopped — {message}"
        if "memory" in message.lower():
            text += " (try a smaller tile size or the CPU device)"
        if self.on_status is not None:
            self.on_status(text)
        if not self._error_shown:  # one notification per layer, never a storm
            self._error_shown = True
            from napari.utils.notifications import show_error

            show_error(text)
        self._poll_timer.stop()

    def status_text(self) -> str:
        """One line: tiles on screen done / needed, throughput, errors."""
        done, needed = self.renderer.progress()
        st = self.renderer.stats
        rate = st.megapixels_per_second
        parts = [f"{done}/{needed} tiles on screen"]
        if st.computed:
            where = f" on {self._device_used}" if self._device_used else ""
            parts.append(f"{len(st.computed)} computed{where}, {rate:.2f} MP/s")
        if st.loaded:
            parts.append(f"{len(st.loaded)} from disk cache")
        if st.error:
            parts.append(f"stopped: {st.error}")
        return " · ".join(parts)

    def _refresh_status(self) -> None:
        done, needed = self.renderer.progress()
        busy = self.renderer.busy
        if self.on_progress is not None:
            self.on_progress(done, needed)
        if self.on_status is not None:
            self.on_status(f"{self.layer.name}: {self.status_text()}")
        # Poll while work is pending (the last tile may be a cancelled one, which lands
        # nothing); a light timer: it only rewrites the status line.
        if busy and not self._poll_timer.isActive():
            self._poll_timer.start()
        elif not busy:
            self._poll_timer.stop()

    # ------------------------------------------------------------------ lifetime

    def pause(self, paused: bool = True) -> None:
        """Stop computing (tiles in flight are cancelled); ``False`` resumes."""
        self.renderer.pause(paused)
        if not paused:
            self._request()
        self._refresh_status()

    def _on_removed(self, event: Any) -> None:
        if event.value is self.layer:
            self.close()

    def close(self) -> None:
        """Stop the renderer and forget the layer (the layer itself is not removed)."""
        if self.closed:
            return
        self.closed = True
        self._debounce.stop()
        self._refresh_timer.stop()
        self._poll_timer.stop()
        self.renderer.close(timeout=0.5)
        try:
            self.viewer.layers.events.removed.disconnect(self._on_removed)
        except (TypeError, ValueError, RuntimeError):
            pass


def live_layer_name(slide: str, role: str) -> str:
    """The layer name of a live product."""
    names = {
        "gan": "GAN stain",
        "despeckled": "reflectance (R), despeckled",
        "linear-despeckled": "linear stain (despeckled R)",
    }
    return layer_name(slide, names.get(role, role))
