"""Interactive staining in a real napari viewer (under Xvfb): what is computed, what is shown.

The camera is set programmatically; the renderer's record of computed / cancelled tiles and
napari's own sliced pixels (``layer._slice.image.raw``) are checked against ``stain_region``
run independently on the same boxes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_confocal_stain.engine.blend import compose
from napari_confocal_stain.engine.pipeline import to_uint8
from napari_confocal_stain.inference import stain_region
from napari_confocal_stain.models.checkpoint import save_checkpoint
from napari_confocal_stain.models.registry import build_model
from napari_confocal_stain.napari._live import live_layers, shared_cache
from napari_confocal_stain.napari._panel import ConfocalStainWidget

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def panel(make_napari_viewer, synthetic_slide, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1100, 800)
    widget = ConfocalStainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.stain_on_open.value = False
    widget.open_path(synthetic_slide)
    qtbot.wait(50)
    yield viewer, widget
    for live in [
        *live_layers(viewer, "gan").values(),
        *live_layers(viewer, "despeckled-r").values(),
    ]:
        live.close()


@pytest.fixture(scope="module")
def affine_file(tmp_path_factory):
    """A real (tiny) generator saved as a user checkpoint: fast enough for many tiles."""
    path = tmp_path_factory.mktemp("models") / "affine.safetensors"
    return save_checkpoint(path, build_model("affine"), architecture="affine")


def _start(widget, qtbot, *, model: str | None = None, tile: int = 256):
    gan = widget.gan
    if model is not None:
        gan.model.bundled.value = "Checkpoint file…"
        gan.model.file.value = model
    gan.tile.value = tile
    gan.precision.value = "fp32"
    gan.disk_cache.value = False
    gan.start()
    qtbot.waitUntil(lambda: gan.live() is not None, timeout=60_000)
    return gan.live()


def _settle(viewer, live, qtbot, center, zoom, timeout=120_000):
    viewer.scene.camera.center = center
    viewer.scene.camera.zoom = zoom
    qtbot.wait(300)  # a draw + the debounce
    live.request_now()
    qtbot.waitUntil(lambda: not live.renderer.busy, timeout=timeout)
    qtbot.wait(400)  # the throttled refresh


def _expected_display(live, level, box):
    """Cross-fade of stain_region on each done tile's grown box (computed here, again)."""
    r = live.renderer
    p = live.pipeline
    s = p.settings
    out = np.zeros((box[1] - box[0], box[3] - box[2], 3), np.uint8)
    for ty, tx in r.tiles_in(level, box):
        core = r.tile_box(level, ty, tx)
        pieces = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                k = (level, ty + dy, tx + dx)
                gy, gx = r.grid(level)
                if 0 <= k[1] < gy and 0 <= k[2] < gx and r.is_done(*k):
                    g = r.grown_box(*k)
                    img = stain_region(
                        p.linear(level, g),
                        p.stain_model(),
                        strategy=s.strategy,
                        tile=s.tile,
                        precision="fp32",
                        origin=(-g[0] % s.tile, -g[2] % s.tile),
                    )
                    pieces.append((g, to_uint8(img)))
        if r.is_done(level, ty, tx):
            tile_img = (compose(core, pieces, r.level_shapes[level], r.margin) + 0.5).astype(
                np.uint8
            )
        else:
            tile_img = to_uint8(p.linear(level, core))
        a0, a1 = max(box[0], core[0]), min(box[1], core[1])
        b0, b1 = max(box[2], core[2]), min(box[3], core[3])
        out[a0 - box[0] : a1 - box[0], b0 - box[2] : b1 - box[2]] = tile_img[
            a0 - core[0] : a1 - core[0], b0 - core[2] : b1 - core[2]
        ]
    return out


def test_only_visible_tiles_are_computed_and_shown_pixels_equal_stain_region(
    panel, qtbot, affine_file
):
    viewer, widget = panel
    live = _start(widget, qtbot, model=str(affine_file))
    layer = live.layer
    views = [layer.live_view]
    layer.events.live_view.connect(lambda e: views.append(e.value))
    _settle(viewer, live, qtbot, center=(300.0, 500.0), zoom=4.0)
    level, box = layer.live_view
    assert level == 0
    # Every computed tile was on screen (or in the one-tile margin) in some view shown.
    allowed = {(lv, *k) for lv, b in views if b for k in live.renderer.tiles_in(lv, b, ring=1)}
    assert set(live.renderer.stats.computed) <= allowed
    level0 = {k for k in live.renderer.stats.computed if k[0] == 0}
    assert {(0, *k) for k in live.renderer.tiles_in(0, box)} <= level0
    # What napari sliced and sent to the GPU is exactly the composite of stain_region runs.
    shown = np.asarray(layer._slice.image.raw)
    cp = layer.corner_pixels
    sbox = (int(cp[0, 0]), int(cp[1, 0]) + 1, int(cp[0, 1]), int(cp[1, 1]) + 1)
    assert shown.shape[:2] == (sbox[1] - sbox[0], sbox[3] - sbox[2])
    np.testing.assert_array_equal(shown, _expected_display(live, 0, sbox))


def test_panning_away_cancels_pending_tiles(panel, qtbot):
    viewer, widget = panel
    live = _start(widget, qtbot, tile=256)  # the bundled U-Net: slow enough to interrupt
    r = live.renderer
    _settle(viewer, live, qtbot, center=(512.0, 768.0), zoom=0.3)  # overview first

    def jump(center):
        old = live.layer.live_view
        viewer.scene.camera.center = center
        viewer.scene.camera.zoom = 3.0
        qtbot.waitUntil(lambda: live.layer.live_view != old, timeout=10_000)
        assert live.layer.live_view[0] == 0
        qtbot.wait(50)
        live.request_now()
        return set(r.wanted), len(r.stats.computed)

    first_view, n0 = jump((200.0, 200.0))  # world units: µm
    assert len(first_view) >= 6
    qtbot.waitUntil(lambda: len(r.stats.computed) > n0, timeout=120_000)
    second_view, n_before = jump((600.0, 1000.0))
    assert not first_view & second_view
    qtbot.waitUntil(lambda: not r.busy, timeout=120_000)
    after = r.stats.computed[n_before:]
    stray = [k for k in after if k not in second_view]
    assert len(stray) <= 1  # at most the tile that was in flight at the jump
    never = first_view - set(r.stats.computed)
    assert never  # the rest of the first view was dropped, not computed
    assert set(r.stats.cancelled) <= first_view
    assert all(r.is_done(*k) for k in second_view)


def test_compare_view_shows_every_panel_and_overlay_restores(panel, qtbot):
    viewer, widget = panel
    viewer.window._qt_window.resize(1700, 1000)
    widget.stain_on_open.value = True
    widget._stain_new_slides()
    widget.despeckle.run()
    qtbot.waitUntil(lambda: bool(live_layers(viewer, "despeckled-r")), timeout=60_000)
    live = _start(widget, qtbot, tile=512)
    despeckled = live_layers(viewer, "despeckled-r")["mosaic_synthetic"]
    panels = widget.compare.side_by_side()
    roles = [layer.metadata["confocal_stain"]["role"] for layer in panels]
    assert roles == ["R", "F", "despeckled", "linear", "gan"]
    viewer.reset_view()
    qtbot.wait(300)
    for lv in (live, despeckled):
        lv.request_now()
    qtbot.waitUntil(
        lambda: not live.renderer.busy and not despeckled.renderer.busy, timeout=240_000
    )
    qtbot.wait(500)
    # napari shows the GAN tiles (not the placeholder) at the coarse level too.
    shown = np.asarray(live.layer._slice.image.raw)
    level, _ = live.layer.live_view
    cp = live.layer.corner_pixels
    np.testing.assert_array_equal(
        shown, live.renderer.read(level, (cp[0, 0], cp[1, 0] + 1, cp[0, 1], cp[1, 1] + 1))
    )
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    if os.environ.get("CONFOCAL_STAIN_SCREENSHOTS"):  # for looking at it by eye
        import imageio.v3 as iio

        iio.imwrite(os.environ["CONFOCAL_STAIN_SCREENSHOTS"], shot.astype(np.uint8))
    h, w = shot.shape[:2]
    rows, cols = viewer.canvas.grid.actual_shape(viewer.layers)
    assert (rows, cols) == (2, 3)
    cells = [
        shot[i * h // rows : (i + 1) * h // rows, j * w // cols : (j + 1) * w // cols]
        for i in range(rows)
        for j in range(cols)
    ]
    # Five panels show the slide (the canvas around it is black), the sixth cell is empty;
    # exactly two of them are in colour (the stains), three are grey (R, F, despeckled R).
    shown = [c[c.max(-1) > 20] for c in cells]
    has_slide = [
        len(px) > 0.005 * c.shape[0] * c.shape[1] and px.std() > 10
        for px, c in zip(shown, cells, strict=True)
    ]
    assert sum(has_slide) == 5, [len(px) for px in shown]
    spread = [(px.max(-1) - px.min(-1)).mean() if len(px) else 0.0 for px in shown]
    assert sum(v > 15 for v in spread) == 2, spread
    widget.compare.overlay()
    assert not viewer.canvas.grid.enabled
    assert viewer.layers[-1] is live.layer and live.layer.visible


def test_bad_model_file_gives_one_notification_and_no_layer(panel, qtbot, tmp_path):
    viewer, widget = panel
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    errors = []
    from napari.utils.notifications import notification_manager

    notification_manager.notification_ready.connect(lambda n: errors.append(n))
    widget.gan.model.bundled.value = "Checkpoint file…"
    widget.gan.model.file.value = str(bad)
    widget.gan.start()
    qtbot.waitUntil(lambda: "Not started" in widget.gan.status.value, timeout=30_000)
    assert "tampered.safetensors" in widget.gan.status.value
    assert len([n for n in errors if "GAN stain" in str(n.message)]) == 1
    assert not live_layers(viewer, "gan")
    assert bad.read_bytes().startswith(b"\x10")  # the user's file is untouched


def test_cache_bound_holds_while_browsing(panel, qtbot, affine_file):
    viewer, widget = panel
    widget.gan.cache_mb.value = 64
    live = _start(widget, qtbot, model=str(affine_file))
    cache = shared_cache()
    rng = np.random.default_rng(1)
    for _ in range(12):
        center = (float(rng.uniform(0, 1024)), float(rng.uniform(0, 1536)))
        viewer.scene.camera.center = center
        viewer.scene.camera.zoom = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        qtbot.wait(150)
        assert cache.nbytes <= cache.max_bytes
    live.request_now()
    qtbot.waitUntil(lambda: not live.renderer.busy, timeout=120_000)
    assert cache.nbytes <= 64 * 2**20
    shared_cache(768)


def test_export_button_writes_a_readable_pyramid_in_the_background(panel, qtbot, tmp_path):
    import tifffile

    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings

    viewer, widget = panel
    gan = widget.gan
    gan.export_what.value = "linear"
    out = tmp_path / "exported.ome.tif"
    worker = gan.export(out)
    assert worker is not None and not gan.export_button.enabled
    qtbot.waitUntil(lambda: gan.export_button.enabled, timeout=120_000)
    assert "Exported" in gan.export_status.value, gan.export_status.value
    with tifffile.TiffFile(out) as tif:
        level0 = tif.series[0].levels[0].asarray()
        assert len(tif.series[0].levels) >= 2
    mosaic = viewer.layers[0].metadata["confocal_mosaic"]
    expect = to_uint8(StainPipeline(mosaic, StainSettings()).linear(0, (0, 1024, 0, 1536)))
    assert level0.shape == expect.shape
    assert np.abs(level0.astype(int) - expect).max() <= 1
    # A second export to the same name is refused (nothing overwritten), with one message.
    gan.export(out)
    qtbot.waitUntil(lambda: gan.export_button.enabled, timeout=30_000)
    assert "failed" in gan.export_status.value and "exists" in gan.export_status.value


def test_exported_ome_zarr_opens_in_napari_as_one_rgb_layer(
    make_napari_viewer, synthetic_slide, tmp_path
):
    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings
    from napari_confocal_stain.export import export_slide
    from napari_confocal_stain.io.readers import open_mosaic

    out = export_slide(synthetic_slide, tmp_path / "stain.ome.zarr", product="linear")
    viewer = make_napari_viewer()
    layers = viewer.open(str(out), plugin="napari-confocal-stain")
    assert len(layers) == 1 and layers[0].rgb and layers[0].multiscale
    assert layers[0].scale[-1] == pytest.approx(0.75)
    mosaic = open_mosaic(synthetic_slide)
    expect = to_uint8(StainPipeline(mosaic, StainSettings()).linear(0, (0, 512, 0, 512)))
    got = np.asarray(layers[0].data[0][:512, :512])
    assert np.abs(got.astype(int) - expect).max() <= 1


def test_known_limits_of_the_model_are_shown_when_it_loads(panel, qtbot, tmp_path):
    """A model card's known limits (checkpoint ``extra.known_limits``) reach the GAN tab."""
    _viewer, widget = panel
    limited = save_checkpoint(
        tmp_path / "limited.safetensors",
        build_model("affine"),
        architecture="affine",
        extra={"known_limits": ["Pale keratinised epithelium is stained too dark."]},
    )
    messages = []
    from napari.utils.notifications import notification_manager

    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    live = _start(widget, qtbot, model=str(limited))
    qtbot.waitUntil(lambda: widget.gan.limits.visible, timeout=30_000)
    assert "too dark" in widget.gan.limits.value
    assert sum("too dark" in m for m in messages) == 1
    live.pause(True)
    widget.gan.start()  # again: the label stays, no second notification
    qtbot.wait(500)
    qtbot.waitUntil(lambda: widget.gan.start_button.enabled, timeout=30_000)
    assert sum("too dark" in m for m in messages) == 1
    # A model without declared limits clears the label.
    widget.gan.model.file.value = str(
        save_checkpoint(
            tmp_path / "plain.safetensors", build_model("affine"), architecture="affine"
        )
    )
    widget.gan.start()
    qtbot.waitUntil(lambda: not widget.gan.limits.visible, timeout=30_000)
