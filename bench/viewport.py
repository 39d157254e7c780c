"""Interactive staining in a real napari viewer: latency, throughput, memory (issue 4 targets).

Runs a napari viewer (needs a display: ``xvfb-run``) on the bundled synthetic sample slide
(4096², 0.75 µm/px), with the canvas sized to a 1920×1080 viewport, and measures in one run:

1. **Linear stain**: seconds from a camera move to a new full-resolution place until napari has
   sliced the linear-stain layer there, and until that frame is on screen (the first buffer
   swap after it; target < 0.1 s), beside a repaint of the same view without new data (what
   the OpenGL renderer alone costs: software Mesa here). Median over several moves, for the
   plugin's :class:`LinearStainView` and, in the same run, napari slicing the dask graph.
2. **GAN stain** with the bundled U-Net (CPU): from the view settling (the debounced request)
   to the first tile on screen (target < 1 s), and to the whole viewport on screen; then
   ``stain_region`` alone on the same pixels (the bounding box of the visible tiles, the pixels
   the renderer had to produce, and the exact viewport), in the same process right after.
   The ratio viewport-time ÷ ``stain_region``-time is the figure (target ≤ 1.3).
3. **Event-loop latency**: a 10 ms QTimer probe on the main thread records how late it fires
   while tiles compute; the maximum and the 99th percentile (target: max < 0.1 s).
4. **500 random pans/zooms** with a bounded cache: peak RSS above the baseline (viewer + slide
   + model loaded) stays under the cache bound + a fixed overhead; every ``--check-every``-th
   view, napari's sliced pixels are compared with an independent recomputation (no tile at the
   wrong place). Uses a cheap generator (affine) so hundreds of views finish in minutes.

Run: ``xvfb-run -a -s "-screen 0 2400x1400x24" python bench/viewport.py`` (``--pans 100`` for a
quick run). The machine is shared: ratios are measured within one run; absolute times are for
orientation only (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _synthetic_slide(size: int) -> Path:
    """A ``size``² synthetic R/F slide in ``$TMPDIR``, written once (seed 11)."""
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_viewport_{size}"
    if not (out / ".complete").is_file():
        write_synthetic_mosaic(out, size=(size, size), seed=11)
        (out / ".complete").write_text("")
    return out


def fresh_places(
    shape: tuple[int, ...], tile: int, count: int, view: tuple[int, int] = (1080, 1920)
) -> list[tuple[float, float]]:
    """Centres of up to ``count`` full-resolution views that share no tile.

    Each view sits in its own block of whole tiles with one spare tile row and column, so
    neither its tiles nor the prefetch ring around them reach another place's tiles.
    """
    bh = (-(-(view[0] + tile) // tile) + 1) * tile
    bw = (-(-(view[1] + tile) // tile) + 1) * tile
    h, w = shape[-2], shape[-1]
    return [
        (y + bh / 2.0, x + bw / 2.0)
        for y in range(0, h - bh + 1, bh)
        for x in range(0, w - bw + 1, bw)
    ][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pans", type=int, default=500)
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--cache-mb", type=int, default=256)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument(
        "--places", type=int, default=5, help="fresh full-resolution places where the GAN is timed"
    )
    parser.add_argument("--model", default=None, help="GAN model (default: the plugin's default)")
    parser.add_argument(
        "--precision", default="auto", help="GAN precision (default: auto, as the viewer)"
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="SIZE",
        help="use a SIZE² synthetic slide (written once to $TMPDIR) instead of the 4096² sample, "
        "which holds only 2 fresh places; 8192 holds 6",
    )
    parser.add_argument("--no-probe", action="store_true", help="no event-loop probe timer")
    parser.add_argument("--linear-moves", type=int, default=7)
    parser.add_argument(
        "--beneath",
        choices=("none", "linear"),
        default="none",
        help="layer left visible under the GAN layer (each visible layer is one more "
        "full-canvas pass of the OpenGL renderer at every repaint)",
    )
    parser.add_argument(
        "--parts", default="linear,gan,pans", help="comma-separated subset of linear,gan,pans"
    )
    args = parser.parse_args(argv)
    if os.environ.get("BENCH_REFRESH_MS"):
        import napari_confocal_stain.napari._live as live_mod

        live_mod.REFRESH_MS = int(os.environ["BENCH_REFRESH_MS"])
    if os.environ.get("BENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH"]))

    import napari
    import psutil
    import torch
    from qtpy.QtCore import QTimer

    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings, to_uint8
    from napari_confocal_stain.inference import stain_region
    from napari_confocal_stain.io.sample import sample_slide_path
    from napari_confocal_stain.models.checkpoint import save_checkpoint
    from napari_confocal_stain.models.registry import build_model
    from napari_confocal_stain.napari._linear_widget import LinearStainWidget
    from napari_confocal_stain.napari._live import LiveLayer, shared_cache
    from napari_confocal_stain.napari._reader import read_mosaic

    print(f"$ {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {_load()}")
    proc = psutil.Process()
    slide = sample_slide_path() if args.synthetic is None else _synthetic_slide(args.synthetic)
    viewer = napari.Viewer(show=True)
    from qtpy.QtCore import QEventLoop

    # Waiting runs the real Qt event loop (as napari's main thread does: idle in C++, GIL
    # released), not a Python busy loop that would compete with the worker for the GIL.
    def spin(seconds: float) -> None:
        loop = QEventLoop()
        QTimer.singleShot(max(1, int(seconds * 1000)), loop.quit)
        loop.exec()

    def spin_until(cond, timeout: float) -> bool:
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            if cond():
                return True
            spin(0.02)
        return bool(cond())

    for data, kwargs, _ in read_mosaic(str(slide)):
        viewer.add_image(data, **kwargs)
    lin_widget = LinearStainWidget(viewer)
    lin_widget.slide.value = lin_widget.slide.choices[0]
    linear = lin_widget.apply()
    qt_canvas = viewer.window._qt_viewer.canvas
    viewer.window._qt_window.resize(1920 + 400, 1080 + 200)
    spin(0.5)
    qt_canvas.native.setFixedSize(1920, 1080)
    spin(0.5)
    print(f"canvas {qt_canvas.native.width()}×{qt_canvas.native.height()} px")
    px = float(linear.scale[-1])
    rng = np.random.default_rng(0)
    camera = viewer.scene.camera

    parts = set(args.parts.split(","))
    mosaic = linear.metadata["confocal_mosaic"]
    nan = float("nan")
    lin_s = t_first = ratio_view = grew = nan
    late = np.array([nan])
    mismatches = -1

    # 1. linear stain of a 1920×1080 full-resolution viewport ---------------------------
    for lyr in viewer.layers:
        lyr.visible = lyr is linear
    marks: dict[str, list[float]] = {"set_data": [], "swap": []}
    linear.events.set_data.connect(lambda _e: marks["set_data"].append(time.perf_counter()))
    qt_canvas.native.frameSwapped.connect(lambda: marks["swap"].append(time.perf_counter()))

    def linear_moves(n: int) -> tuple[list[float], list[float], list[float]]:
        """Per move: camera → sliced (set_data), camera → on screen (first buffer swap
        after it), and a repaint of the same view with no new data (the renderer alone)."""
        ready, shown, paint = [], [], []
        for _ in range(n):
            cy, cx = rng.uniform(700, 4096 - 700, size=2)
            marks["set_data"].clear()
            marks["swap"].clear()
            t0 = time.perf_counter()
            camera.center = (cy * px, cx * px)
            camera.zoom = 1.0 / px  # one screen pixel per slide pixel: level 0

            def on_screen() -> bool:
                return bool(marks["set_data"]) and any(
                    t > marks["set_data"][0] for t in marks["swap"]
                )

            ok = spin_until(on_screen, 5.0)
            if ok:
                ready.append(marks["set_data"][0] - t0)
                shown.append(min(t for t in marks["swap"] if t > marks["set_data"][0]) - t0)
            spin(0.3)
            marks["swap"].clear()
            t1 = time.perf_counter()
            qt_canvas._scene_canvas.update()
            if spin_until(lambda: bool(marks["swap"]), 5.0):
                paint.append(marks["swap"][0] - t1)
            spin(0.1)
        return ready, shown, paint

    if "linear" in parts:
        from napari_confocal_stain.core.linear_stain import linear_stain_levels

        fast_levels = linear.data
        # The previous path, for the ratio: napari slicing the dask graph (whole chunks).
        dask_levels = [to_uint8(lv) for lv in linear_stain_levels(mosaic.r, mosaic.f)]
        rows = {}
        for name, levels in (("dask graph", dask_levels), ("LinearStainView", fast_levels)):
            linear.data = levels
            spin(0.5)
            rows[name] = linear_moves(args.linear_moves)
        for name, (ready, shown, paint) in rows.items():
            print(
                f"linear stain via {name}, 1920×1080 at level {linear.data_level}, "
                f"{len(ready)} moves: camera → sliced median {statistics.median(ready):.3f} s, "
                f"→ on screen {statistics.median(shown):.3f} s (max {max(shown):.3f}); "
                f"a repaint alone {statistics.median(paint):.3f} s; load {_load()}"
            )
        lin_s = statistics.median(rows["LinearStainView"][1])
        lin_ready = statistics.median(rows["LinearStainView"][0])
        lin_ratio = statistics.median(rows["dask graph"][1]) / lin_s
        print(
            f"linear: on screen {lin_s:.3f} s (sliced {lin_ready:.3f} s), "
            f"{lin_ratio:.2f}× faster on screen than through the dask graph"
        )

    # 2 + 3. GAN stain with the bundled U-Net: first tile, whole viewport, latency ----------
    if "gan" in parts:
        chosen = {"model": args.model} if args.model else {}
        settings = StainSettings(tile=args.tile, precision=args.precision, **chosen)
        pipeline = StainPipeline(mosaic, settings)
        print(f"GAN model {settings.model}, precision {args.precision}")
        # Load once and build the kernels for the tile shape, as the widget does while it
        # says "Loading the model…" (outside the timing).
        from napari_confocal_stain.engine.pipeline import warm_up
        from napari_confocal_stain.napari._live import GAN_MARGIN

        warm_up(pipeline.stain_model(), tile=args.tile, context=GAN_MARGIN)
        shared_cache(args.cache_mb)
        live = LiveLayer(
            viewer,
            pipeline,
            "gan",
            slide="bench",
            role="gan",
            tile=args.tile,
            layer_kwargs={"scale": tuple(linear.scale), "units": linear.units},
        )
        linear.visible = args.beneath == "linear"
        # Main-thread time of each refresh (napari slicing our array + handing it to vispy;
        # the repaint that follows is the OpenGL renderer's), to tell the two apart.
        refresh_s: list[float] = []
        refresh_at: list[float] = []  # when each refresh started
        plain_refresh = live._refresh

        def timed_refresh() -> None:
            t = time.perf_counter()
            refresh_at.append(t)
            plain_refresh()
            refresh_s.append(time.perf_counter() - t)

        # Both the throttled refresh (the timer) and the immediate one (view complete).
        live._refresh = timed_refresh
        live._refresh_timer.timeout.disconnect()
        live._refresh_timer.timeout.connect(timed_refresh)
        lateness: list[float] = []
        probe = QTimer()
        probe.setInterval(10)
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            lateness.append(now - last[0] - 0.010)
            last[0] = now

        probe.timeout.connect(tick)
        r = live.renderer
        model = pipeline.stain_model()
        shown_at: dict[tuple, float] = {}

        def landed(lv: int, ty: int, tx: int) -> None:
            shown_at.setdefault((lv, ty, tx), time.perf_counter())

        live.tile_done.connect(landed)

        def run_alone(b):
            t = time.perf_counter()
            lin = pipeline.linear(0, b)
            stain_region(lin, model, tile=args.tile, precision=args.precision,
                         origin=(-b[0] % args.tile, -b[2] % args.tile))  # fmt: skip
            return time.perf_counter() - t

        # Rounds at fresh places (nothing cached), each followed by stain_region alone on
        # the same pixels: the machine's load drifts, the ratio within a round does not.
        firsts, ratios, ratios_exact, tall, lat_all, refresh_all = [], [], [], [], [], []
        # Far apart, so no round finds tiles of another already done.
        centres = fresh_places(mosaic.shape, args.tile, args.places)
        if len(centres) < args.places:
            print(f"only {len(centres)} fresh places fit this slide (see --synthetic)")
        for k, (cy, cx) in enumerate(centres):
            old = live.layer.live_view
            live.pause(True)  # nothing is computed while the camera moves
            camera.center = (cy * px, cx * px)
            camera.zoom = 1.0 / px
            spin_until(lambda o=old: live.layer.live_view not in (None, o), 5)
            spin(0.3)
            level, box = live.layer.live_view
            visible_tiles = r.tiles_in(level, box)
            vis_keys = {(level, ty, tx) for ty, tx in visible_tiles}
            vis_keys = {key for key in vis_keys if not r.is_done(*key)}
            shown_at.clear()
            lateness.clear()
            refresh_s.clear()
            if not args.no_probe:
                probe.start()
            n0, c0 = len(r.stats.computed), r.stats.compute_seconds
            last[0] = time.perf_counter()
            t0 = time.perf_counter()
            live.pause(False)  # = the debounced request of a settled view
            spin_until(lambda vk=vis_keys: vk <= set(shown_at), 900)
            t_landed = max(shown_at[key] for key in vis_keys)
            # On screen: the first frame swapped after a refresh that began once the last
            # visible tile had landed (a landed tile is only in the renderer's cache).
            spin_until(lambda tl=t_landed: any(t >= tl for t in refresh_at), 30)
            t_refresh = min(t for t in refresh_at if t >= t_landed)
            spin_until(lambda tr=t_refresh: any(t > tr for t in marks["swap"]), 5)
            t_all = min((t for t in marks["swap"] if t > t_refresh), default=nan) - t0
            t_first = min(shown_at.values()) - t0
            probe.stop()
            per_tile = (r.stats.compute_seconds - c0) / max(1, len(r.stats.computed) - n0)
            live.pause(True)  # the prefetch ring is not part of the viewport's time
            spin_until(lambda: not r.busy, 60)
            late = np.array(lateness[3:]) if len(lateness) > 3 else np.array([0.0])
            ty0, ty1 = min(t for t, _ in visible_tiles), max(t for t, _ in visible_tiles)
            tx0, tx1 = min(t for _, t in visible_tiles), max(t for _, t in visible_tiles)
            first, final = r.tile_box(level, ty0, tx0), r.tile_box(level, ty1, tx1)
            tiles_box = (first[0], final[1], first[2], final[3])
            t_tiles = run_alone(tiles_box)
            t_view = run_alone(box)
            firsts.append(t_first)
            tall.append(t_all)
            ratios.append(t_all / t_tiles)
            ratios_exact.append(t_all / t_view)
            mp = (tiles_box[1] - tiles_box[0]) * (tiles_box[3] - tiles_box[2]) / 1e6
            print(
                f"round {k}: level {level}, visible {box}, {len(visible_tiles)} tiles of "
                f"{args.tile}² (+{r.margin} px context); first tile {t_first:.2f} s, viewport "
                f"{t_all:.2f} s; stain_region alone on the tiles' {mp:.2f} MP {t_tiles:.2f} s, "
                f"on the exact viewport {t_view:.2f} s; ratio {ratios[-1]:.2f} "
                f"(exact {ratios_exact[-1]:.2f}); worker {per_tile:.2f} s per tile; "
                f"event loop max {late.max() * 1000:.0f} ms, "
                f"p99 {np.percentile(late, 99) * 1000:.0f} ms; {len(refresh_s)} refreshes, "
                f"main thread per refresh max {max(refresh_s, default=0) * 1000:.0f} ms, median "
                f"{statistics.median(refresh_s or [0]) * 1000:.0f} ms; load {_load()}"
            )
            refresh_all.extend(refresh_s)
            lat_all.append(late)
        late = np.concatenate(lat_all)
        t_first = statistics.median(firsts)
        ratio_view = statistics.median(ratios)
        print(
            f"GAN: median over {len(tall)} fresh places: first tile {t_first:.2f} s, whole "
            f"viewport on screen {statistics.median(tall):.2f} s (max {max(tall):.2f}); "
            f"median viewport ÷ stain_region "
            f"{ratio_view:.2f} (same pixels), {statistics.median(ratios_exact):.2f} (exact "
            f"viewport); event loop max {late.max() * 1000:.0f} ms, p99 "
            f"{np.percentile(late, 99) * 1000:.0f} ms over {len(late)} ticks (GAN layer over: "
            f"{args.beneath}); our refresh max {max(refresh_all, default=0) * 1000:.0f} ms"
        )
        live.close()
        viewer.layers.remove(live.layer)

    # 4. 500 random pans / zooms with a bounded cache --------------------------------------
    if "pans" in parts:
        tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_viewport_affine.safetensors")
        save_checkpoint(tmp, build_model("affine"), architecture="affine")
        cheap = StainPipeline(mosaic, StainSettings(model=tmp, tile=args.tile, precision="fp32"))
        cheap.stain_model()
        cache = shared_cache(args.cache_mb)
        cache.invalidate()
        live = LiveLayer(
            viewer,
            cheap,
            "gan",
            slide="bench",
            role="gan",
            tile=args.tile,
            layer_kwargs={"scale": tuple(linear.scale), "units": linear.units},
        )
        # Only the live layer is shown: napari's own dask cache (for the dask-backed R and F
        # layers) is napari's memory, not the renderer's.
        linear.visible = False
        import gc

        gc.collect()
        spin(0.5)
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        checked = mismatches = 0
        for i in range(args.pans):
            zoom = float(rng.choice([0.125, 0.25, 0.5, 1.0, 2.0])) / px
            cy, cx = rng.uniform(0, 4096, size=2)
            camera.center = (cy * px, cx * px)
            camera.zoom = zoom
            spin(float(rng.uniform(0.01, 0.15)))
            if (i + 1) % args.check_every == 0:
                live.request_now()
                spin_until(lambda: not live.renderer.busy, 120)
                spin(0.3)
                shown = np.asarray(live.layer._slice.image.raw)
                lv = live.layer.data_level
                cp = live.layer.corner_pixels
                sbox = (int(cp[0, 0]), int(cp[1, 0]) + 1, int(cp[0, 1]), int(cp[1, 1]) + 1)
                expect = _expected(live.renderer, cheap, lv, sbox, to_uint8, stain_region)
                checked += 1
                mismatches += int(not np.array_equal(shown, expect))
        stop.set()
        sampler.join()
        grew = (peak[0] - base) / 2**20
        print(
            f"{args.pans} random pans/zooms (cheap affine model, cache bound {args.cache_mb} MB): "
            f"peak RSS {peak[0] / 2**20:.0f} MB, {grew:.0f} MB above the {base / 2**20:.0f} MB "
            f"baseline; cache holds {cache.nbytes / 2**20:.0f} MB; "
            f"{len(live.renderer.stats.computed)} tiles computed, "
            f"{len(live.renderer.stats.cancelled)} cancelled; "
            f"{checked} views checked pixel for pixel, {mismatches} mismatches"
        )
        live.close()
    viewer.close()
    print(
        f"targets: linear {lin_s:.3f} s (< 0.1); first GAN tile {t_first:.2f} s (< 1); "
        f"event loop max {late.max() * 1000:.0f} ms (< 100); RSS growth {grew:.0f} MB vs "
        f"cache {args.cache_mb} MB; wrong-place tiles {mismatches}"
    )
    print(f"RATIO viewport ÷ stain_region (same pixels): {ratio_view:.2f}  (target ≤ 1.3)")
    return 0


def _expected(renderer, pipeline, level, box, to_uint8, stain_region) -> np.ndarray:
    """Recompute what must be on screen in ``box`` from scratch (independent of the cache)."""
    from napari_confocal_stain.engine.blend import compose

    s = pipeline.settings
    out = np.zeros((box[1] - box[0], box[3] - box[2], 3), np.uint8)
    for ty, tx in renderer.tiles_in(level, box):
        core = renderer.tile_box(level, ty, tx)
        if renderer.is_done(level, ty, tx):
            pieces = []
            gy, gx = renderer.grid(level)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    k = (level, ty + dy, tx + dx)
                    if 0 <= k[1] < gy and 0 <= k[2] < gx and renderer.is_done(*k):
                        g = renderer.grown_box(*k)
                        img = stain_region(
                            pipeline.linear(level, g),
                            pipeline.stain_model(),
                            tile=s.tile,
                            precision="fp32",
                            origin=(-g[0] % s.tile, -g[2] % s.tile),
                        )
                        pieces.append((g, to_uint8(img)))
            comp = compose(core, pieces, renderer.level_shapes[level], renderer.margin)
            tile_img = (comp + 0.5).astype(np.uint8)
        else:
            tile_img = to_uint8(pipeline.linear(level, core))
        a0, a1 = max(box[0], core[0]), min(box[1], core[1])
        b0, b1 = max(box[2], core[2]), min(box[3], core[3])
        out[a0 - box[0] : a1 - box[0], b0 - box[2] : b1 - box[2]] = tile_img[
            a0 - core[0] : a1 - core[0], b0 - core[2] : b1 - core[2]
        ]
    return out


if __name__ == "__main__":
    sys.exit(main())
