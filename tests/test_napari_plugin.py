"""The napari shell in a real viewer (run under Xvfb): manifest, reader, widgets, sample."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_confocal_stain.napari._layers import META_KEY  # noqa: E402
from napari_confocal_stain.napari._linear_widget import LinearStainWidget  # noqa: E402
from napari_confocal_stain.napari._panel import ConfocalStainWidget  # noqa: E402
from napari_confocal_stain.napari._reader import get_reader  # noqa: E402
from napari_confocal_stain.napari._viewer_state import slide_layers  # noqa: E402

PLUGIN = "napari-confocal-stain"


@pytest.fixture
def notifications():
    """Collect napari notifications (what the user would see) during a test."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def test_npe2_manifest_validates_with_imports():
    exe = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    res = subprocess.run(
        [exe, "validate", PLUGIN, "--imports"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()


def test_reader_claims_mosaics_and_declines_other_files(synthetic_slide, tmp_path):
    assert callable(get_reader(str(synthetic_slide)))
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert get_reader(str(png)) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("x")
    assert get_reader(str(plain)) is None


def test_reader_layers(synthetic_slide):
    layers = get_reader(str(synthetic_slide))(str(synthetic_slide))
    assert [kind for *_, kind in layers] == ["image", "image"]
    (r_data, r_kw, _), (_, f_kw, _) = layers
    assert r_kw["multiscale"] and f_kw["multiscale"]
    assert r_kw["scale"] == pytest.approx((0.75, 0.75))
    assert r_kw["metadata"][META_KEY]["role"] == "R"
    assert f_kw["metadata"][META_KEY]["role"] == "F"
    assert r_data[0].shape == (1024, 1536)
    lo, hi = r_kw["contrast_limits"]
    assert 0.0 <= lo < hi <= 1.0
    assert "reflectance" in r_kw["name"] and "fluorescence" in f_kw["name"]


def _open(viewer, path):
    return viewer.open(str(path), plugin=PLUGIN)


def _canvas_content(shot: np.ndarray) -> np.ndarray:
    """Crop a screenshot (RGBA uint8) to where the image is drawn (not the canvas background)."""
    rgb = shot[..., :3].astype(np.int16)
    bg = rgb[0, 0]
    drawn = np.abs(rgb - bg).sum(-1) > 12
    ys, xs = np.nonzero(drawn)
    return shot[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1, :3]


def test_linear_stain_widget_shows_he_colours_where_tissue_is(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer(show=True)
    layers = _open(viewer, synthetic_slide)
    assert len(layers) == 2 and all(lyr.multiscale for lyr in layers)
    widget = LinearStainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.slide.value == layers[0].metadata[META_KEY]["slide"]
    stain = widget.apply()
    assert stain is not None and stain.rgb and stain.multiscale
    assert stain.scale[-1] == pytest.approx(0.75)
    for lyr in layers:
        lyr.visible = False
    viewer.reset_view()
    shot = _canvas_content(viewer.screenshot(canvas_only=True, flash=False)) / 255.0

    # The expected picture: Gareau's stain of the coarsest level, resampled to the shot.
    mosaic = stain.metadata["confocal_mosaic"]
    from skimage.transform import resize

    from napari_confocal_stain.core.linear_stain import linear_stain

    coarse = linear_stain(np.asarray(mosaic.r[-1]), np.asarray(mosaic.f[-1]))
    expected = resize(coarse, shot.shape[:2], order=1, anti_aliasing=True)

    def he_coloured(img):  # pink/purple: green absorbed more than red and blue
        return (img[..., 1] < img[..., 0] - 0.08) & (img[..., 1] < img[..., 2] - 0.02)

    def white(img):
        return img.min(-1) > 0.85

    tissue, background = he_coloured(expected), white(expected)
    assert tissue.mean() > 0.2 and background.mean() > 0.05  # the slide has both
    assert he_coloured(shot)[tissue].mean() > 0.9
    assert white(shot)[background].mean() > 0.9
    np.testing.assert_allclose(shot.mean((0, 1)), expected.mean((0, 1)), atol=0.05)


def test_widget_edits_update_the_layer_in_place(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    _open(viewer, synthetic_slide)
    widget = LinearStainWidget(viewer)
    stain = widget.apply()
    n_layers = len(viewer.layers)
    before = np.asarray(stain.data[-1]).copy()

    widget.h.vector = (0.6, 0.1, 0.8)  # live update on edit
    assert len(viewer.layers) == n_layers
    assert stain.metadata[META_KEY]["coefficients"]["h"] == pytest.approx((0.6, 0.1, 0.8))
    assert not np.allclose(np.asarray(stain.data[-1]), before)

    widget.method.value = "beer-lambert"
    assert "Beer" in stain.name and len(viewer.layers) == n_layers
    assert stain.metadata[META_KEY]["method"] == "beer-lambert"
    # (isHidden: the widget itself is never shown in this test, so .visible is False)
    assert not widget.k_f.native.isHidden() and widget.h.native.isHidden()

    widget.reset()
    widget.method.value = "gareau"
    assert stain.metadata[META_KEY]["coefficients"]["h"] == pytest.approx((0.30, 0.20, 1.0))


def test_widget_without_slide_says_so(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = LinearStainWidget(viewer)
    assert widget.apply() is None
    assert "Open a slide" in widget.status.value


def test_bad_slide_gives_one_notification_and_no_layer(
    make_napari_viewer, tmp_path, notifications
):
    import tifffile

    bad = tmp_path / "mosaic_broken"
    (bad / "DET#1").mkdir(parents=True)
    tifffile.imwrite(bad / "DET#1" / "highres_raw.tif", np.zeros((64, 64), np.uint8))
    before = sorted(p.name for p in bad.rglob("*"))
    viewer = make_napari_viewer()
    widget = ConfocalStainWidget(viewer)
    assert widget.open_path(bad) == []
    assert len(viewer.layers) == 0
    errors = [n for n in notifications if "DET#2" in str(n.message)]
    assert len(errors) == 1
    assert sorted(p.name for p in bad.rglob("*")) == before  # nothing written


def test_main_widget_opens_sample_and_stains_it(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Confocal stain")
    assert isinstance(widget, ConfocalStainWidget)
    worker = widget.open_sample()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: len(slide_layers(viewer, "linear")) == 1, timeout=10_000)
    roles = sorted(lyr.metadata[META_KEY]["role"] for lyr in viewer.layers)
    assert roles == ["F", "R", "linear"]
    assert "4096" in widget.info.value
    # Every tab's Slide choice points at the sample just opened.
    (sample,) = slide_layers(viewer, "R")
    for tab in (widget.gan, widget.linear, widget.despeckle, widget.heatmaps):
        assert tab.slide.value == sample, type(tab).__name__


def test_every_tab_follows_the_slide_opened_last(make_napari_viewer, synthetic_slide, tmp_path):
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    viewer = make_napari_viewer()
    widget = ConfocalStainWidget(viewer)
    tabs = (widget.gan, widget.linear, widget.despeckle, widget.heatmaps)
    viewer.open(str(synthetic_slide), plugin=PLUGIN)  # File ▸ Open
    assert [t.slide.value for t in tabs] == ["mosaic_synthetic"] * 4
    other = write_synthetic_mosaic(tmp_path / "second", size=(256, 256), seed=1)
    widget.open_path(other)  # the panel's Open slide
    (name,) = set(slide_layers(viewer, "R")) - {"mosaic_synthetic"}
    assert [t.slide.value for t in tabs] == [name] * 4


def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic-skin")
    assert {lyr.metadata[META_KEY]["role"] for lyr in viewer.layers} == {"R", "F"}
    assert viewer.layers[0].data[0].shape == (4096, 4096)
