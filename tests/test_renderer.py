"""The tile renderer, the pipeline and cross-fading, without a viewer (real slides and models)."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from napari_confocal_stain import open_mosaic
from napari_confocal_stain.engine.blend import compose, ramp
from napari_confocal_stain.engine.cache import RawTileStore, TileCache
from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings, to_uint8
from napari_confocal_stain.engine.renderer import TileRenderer
from napari_confocal_stain.inference import stain_region

SHAPES = [(1000, 1500), (500, 750), (250, 375)]


def coord_image(level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A product whose every pixel says where it is (so misplaced tiles are caught)."""
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return np.stack([yy % 251, xx % 241, np.full_like(yy, 10 * level)], -1).astype(np.uint8)


def grey_placeholder(level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.full((box[1] - box[0], box[3] - box[2], 3), 200, np.uint8)


def make(compute=None, **kw) -> TileRenderer:
    fn = compute or (lambda level, box, cancel: coord_image(level, box))
    kw.setdefault("tile", 128)
    return TileRenderer(SHAPES, fn, grey_placeholder, scope="test", **kw)


def test_wanted_tiles_are_the_visible_ones_centre_first_then_a_ring():
    r = make(prefetch=1)
    try:
        r.pause()
        todo = r.request(0, (300, 500, 300, 700))  # rows 2-3, cols 2-5
        visible = {(0, ty, tx) for ty in (2, 3) for tx in (2, 3, 4, 5)}
        assert r.visible == visible
        assert set(todo[: len(visible)]) == visible  # visible first
        ring = set(todo[len(visible) :])
        assert ring == {(0, ty, tx) for ty in range(1, 5) for tx in range(1, 7)} - visible
        # Centre first: the first tile is one of the two nearest the box centre (400, 500).
        assert todo[0] in {(0, 2, 3), (0, 3, 3)}
        dists = [np.hypot((ty + 0.5) * 128 - 400, (tx + 0.5) * 128 - 500) for _, ty, tx in todo]
        assert dists[: len(visible)] == sorted(dists[: len(visible)])
    finally:
        r.close()


def test_read_shows_done_tiles_and_the_placeholder_elsewhere():
    r = make(prefetch=0)
    try:
        r.request(1, (0, 128, 0, 128))  # exactly tile (1, 0, 0)
        assert r.wait_idle(10)
        assert r.stats.computed == [(1, 0, 0)]
        out = r.read(1, (100, 200, 100, 300))
        np.testing.assert_array_equal(out[:28, :28], coord_image(1, (100, 128, 100, 128)))
        assert (out[28:] == 200).all() and (out[:, 28:] == 200).all()
        view = r.levels()[1]
        assert view.shape == (500, 750, 3) and view.dtype == np.uint8
        np.testing.assert_array_equal(view[100:200, 100:300], out)
        np.testing.assert_array_equal(view[5, 7], coord_image(1, (5, 6, 7, 8))[0, 0])
        assert view[0:128:2, 0:128:4].shape == (64, 32, 3)
    finally:
        r.close()


def test_tiles_that_leave_the_screen_are_cancelled():
    started = threading.Event()

    def slow(level, box, cancel):
        started.set()
        for _ in range(200):  # a long computation that polls cancel between steps
            if cancel():
                raise RuntimeError("cancelled")
            time.sleep(0.005)
        return coord_image(level, box)

    r = make(slow, prefetch=0)
    try:
        r.request(0, (0, 256, 0, 256))  # four tiles top-left
        assert started.wait(5)
        r.request(0, (768, 1000, 1280, 1500))  # far away: bottom-right
        assert r.wait_idle(30)
        far = {(0, ty, tx) for ty in (6, 7) for tx in (10, 11)}
        assert set(r.stats.computed) == far  # nothing of the old view was finished
        assert r.stats.cancelled and set(r.stats.cancelled) <= {
            (0, ty, tx) for ty in (0, 1) for tx in (0, 1)
        }
        assert r.stats.error is None
    finally:
        r.close()


def test_memory_cache_bound_holds_under_many_views():
    cache = TileCache(max_bytes=3 * 2**20)
    r = make(cache=cache, prefetch=1)
    rng = np.random.default_rng(0)
    try:
        for _ in range(40):
            level = int(rng.integers(0, 3))
            h, w = SHAPES[level]
            y, x = int(rng.integers(0, h - 64)), int(rng.integers(0, w - 64))
            r.request(level, (y, y + 200, x, x + 300))
            r.read(level, (y, min(h, y + 200), x, min(w, x + 300)))
            assert cache.nbytes <= cache.max_bytes
        assert r.wait_idle(30)
        assert cache.nbytes <= cache.max_bytes
        for level, ty, tx in r.stats.computed[-5:]:  # recent tiles are at their place
            if r.is_done(level, ty, tx):
                box = r.tile_box(level, ty, tx)
                np.testing.assert_array_equal(r.read(level, box), coord_image(level, box))
    finally:
        r.close()


def test_compute_errors_are_reported_once_and_stop_the_renderer():
    messages = []

    def broken(level, box, cancel):
        raise MemoryError("out of memory on the device")

    r = make(broken, on_error=messages.append, prefetch=0)
    try:
        r.request(0, (0, 500, 0, 500))
        assert r.wait_idle(10)
        assert messages == ["out of memory on the device"]
        assert not r.busy and r.stats.computed == []
        assert (r.read(0, (0, 10, 0, 10)) == 200).all()  # placeholder stays
    finally:
        r.close()


def test_ramps_are_a_partition_of_unity_and_a_lone_piece_is_exact():
    size, tile, m = 300, 100, 10
    pieces = []
    total = np.zeros(size, np.float32)
    for k in range(3):
        a, b = max(0, k * tile - m), min(size, (k + 1) * tile + m)
        w = ramp(a, b, size, m)
        total[a:b] += w
        pieces.append(((0, 5, a, b), np.full((5, b - a), float(k + 1), np.float32)))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    lone = compose((0, 5, 100, 200), [pieces[1]], (5, size), m)
    np.testing.assert_array_equal(lone, 2.0)
    mixed = compose((0, 5, 0, 300), pieces, (5, size), m)
    assert mixed[0, 50] == 1.0 and mixed[0, 150] == 2.0 and mixed[0, 250] == 3.0
    assert np.all(np.diff(mixed[0]) >= 0)  # a smooth ramp, no jump, across each border
    assert np.abs(np.diff(mixed[0])).max() <= 1.0 / (2 * m) + 1e-6
    with pytest.raises(ValueError, match="cover"):
        compose((0, 5, 0, 300), [pieces[0]], (5, size), m)


def test_disk_store_makes_a_reopened_slide_instant(tmp_path):
    calls = []

    def counted(level, box, cancel):
        calls.append(box)
        return coord_image(level, box)

    store = RawTileStore(tmp_path / "tiles", "scopeA", SHAPES, 128, 16, 3)
    r = make(counted, store=store, margin=16, prefetch=0)
    try:
        r.request(0, (0, 256, 0, 256))
        assert r.wait_idle(10)
        first = r.read(0, (0, 256, 0, 256))
    finally:
        r.close()
    assert len(calls) == 4
    reopened = RawTileStore(tmp_path / "tiles", "scopeA", SHAPES, 128, 16, 3)
    r2 = make(counted, store=reopened, margin=16, prefetch=0, cache=TileCache())
    try:
        r2.request(0, (0, 256, 0, 256))
        assert r2.wait_idle(10)
        assert len(calls) == 4 and sorted(r2.stats.loaded) == sorted(r.stats.computed)
        np.testing.assert_array_equal(r2.read(0, (0, 256, 0, 256)), first)
    finally:
        r2.close()


def test_scopes_change_exactly_with_what_a_product_depends_on():
    base = StainSettings()
    other_model = StainSettings(model="stain-other")
    desp = StainSettings(despeckle="despeckle-combalia")
    assert base.scope("gan", "s") != other_model.scope("gan", "s")
    assert base.scope("linear", "s") == other_model.scope("linear", "s")
    assert base.scope("linear", "s") != desp.scope("linear", "s")
    assert desp.scope("despeckled-r", "s") == StainSettings(
        despeckle="despeckle-combalia", model="x", tile=256
    ).scope("despeckled-r", "s")
    assert base.scope("gan", "s") != base.scope("gan", "t")


@pytest.fixture(scope="module")
def pipeline(synthetic_slide):
    return StainPipeline(open_mosaic(synthetic_slide), StainSettings(tile=64, precision="fp32"))


def test_gan_tiles_equal_stain_region_and_blend_without_seams(pipeline):
    """A lone tile is exactly stain_region of its grown box; neighbours cross-fade."""
    level, margin, tile = 1, 16, 64
    r = TileRenderer(
        pipeline.level_shapes,
        lambda lv, box, cancel: to_uint8(pipeline.gan(lv, box, cancel=cancel)),
        lambda lv, box: to_uint8(pipeline.linear(lv, box)),
        scope=pipeline.scope("gan"),
        tile=tile,
        margin=margin,
        prefetch=0,
    )
    try:
        r.request(level, (128, 192, 128, 192))  # one tile: (1, 2, 2)
        assert r.wait_idle(60) and r.stats.computed == [(level, 2, 2)]
        gy0, gy1, gx0, gx1 = r.grown_box(level, 2, 2)
        lin = pipeline.linear(level, (gy0, gy1, gx0, gx1))
        ref = stain_region(
            lin,
            pipeline.stain_model(),
            tile=tile,
            precision="fp32",
            origin=(-gy0 % tile, -gx0 % tile),
        )
        core = to_uint8(ref)[128 - gy0 : 192 - gy0, 128 - gx0 : 192 - gx0]
        np.testing.assert_array_equal(r.read(level, (128, 192, 128, 192)), core)
        # Its right-hand neighbour: the shared border is now a cross-fade of both.
        r.request(level, (128, 192, 192, 256))
        assert r.wait_idle(60)
        both = r.read(level, (128, 192, 128, 256)).astype(float)
        seam = np.abs(both[:, 192 - 128] - both[:, 191 - 128]).mean()
        inside = np.abs(np.diff(both[:, 150 - 128 : 170 - 128], axis=1)).mean()
        # The same column of one pass over both tiles: the tissue's own edge strength there
        # (a textured stain can have a sharp edge exactly at the border).
        union = to_uint8(
            stain_region(
                pipeline.linear(level, (112, 208, 112, 272)),
                pipeline.stain_model(),
                tile=tile,
                precision="fp32",
                origin=(-112 % tile, -112 % tile),
            )
        ).astype(float)
        tissue = np.abs(union[16:80, 192 - 112] - union[16:80, 191 - 112]).mean()
        assert seam <= 2.0 * max(inside, tissue) + 2.0  # no sharper than the tissue
    finally:
        r.close()


def test_despeckled_reflectance_of_a_box_equals_the_whole_region_cropped(synthetic_slide):
    p = StainPipeline(open_mosaic(synthetic_slide), StainSettings(despeckle="despeckle-combalia"))
    whole = p.reflectance(1, (0, 256, 0, 384))
    part = p.reflectance(1, (100, 164, 200, 264))
    np.testing.assert_allclose(part, whole[100:164, 200:264], atol=1e-5)
    raw = p.reflectance(1, (100, 164, 200, 264), despeckled=False)
    assert np.abs(part - raw).mean() > 0.01  # it did despeckle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_worker_threads_run_at_lower_priority_and_the_caller_is_untouched():
    from napari_confocal_stain.engine.pipeline import BACKGROUND_NICE, worker_thread_init

    seen: dict[str, int] = {}

    def compute(level, box, cancel):
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return coord_image(level, box)

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    r = make(compute, thread_init=worker_thread_init)
    try:
        r.request(0, (0, 128, 0, 128))
        assert r.wait_idle(30)
    finally:
        r.close()
    assert seen["worker"] == min(19, main_before + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


@pytest.mark.parametrize("margin", [0, 4, 16])
def test_compose_uint8_equals_rounded_compose(margin: int) -> None:
    """The viewer's display composite copies tile interiors: bit-identical by construction."""
    from napari_confocal_stain.engine.blend import compose, compose_uint8

    rng = np.random.default_rng(margin)
    tile, shape = 64, (150, 170)  # ragged last row and column, slide edges on two sides
    grid = (-(-shape[0] // tile), -(-shape[1] // tile))

    def grown(ty, tx):
        return (max(0, ty * tile - margin), min(shape[0], (ty + 1) * tile + margin),
                max(0, tx * tile - margin), min(shape[1], (tx + 1) * tile + margin))  # fmt: skip

    raws = {}
    for ty in range(grid[0]):
        for tx in range(grid[1]):
            if rng.random() < 0.7 or (ty, tx) == (1, 1):  # some neighbours not done yet
                g = grown(ty, tx)
                raws[ty, tx] = rng.integers(0, 256, (g[1] - g[0], g[3] - g[2], 3), np.uint8)
    for (ty, tx), raw in raws.items():
        core = (
            ty * tile,
            min(shape[0], (ty + 1) * tile),
            tx * tile,
            min(shape[1], (tx + 1) * tile),
        )
        pieces = [
            (grown(ty + dy, tx + dx), raws[ty + dy, tx + dx])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (ty + dy, tx + dx) in raws
        ]
        ref = (compose(core, pieces, shape, margin) + 0.5).astype(np.uint8)
        got = compose_uint8(core, (grown(ty, tx), raw), pieces, shape, margin)
        np.testing.assert_array_equal(got, ref)
