"""Hallucination heatmaps in a real viewer (Xvfb), the report dock, and ``confocal-stain metrics``.

The slide is the session's synthetic mosaic (1024 × 1536, seed 3, see conftest.py); the
"network" is a real affine generator checkpoint (identity = the Gareau mapping), so a GAN
run is fast and its output is the linear stain; the issue's check paints a fake structure
into one cell of an output and erases a known nucleus (ground truth from ``synth_nuclei``)
in another, and those two cells, and only those, must light up.
"""

from __future__ import annotations

import argparse
import csv
import re

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_confocal_stain.cli import main as cli_main  # noqa: E402
from napari_confocal_stain.cli import metrics as metrics_cli  # noqa: E402
from napari_confocal_stain.core.linear_stain import linear_stain  # noqa: E402
from napari_confocal_stain.engine.pipeline import (  # noqa: E402
    StainPipeline,
    StainSettings,
    to_uint8,
)
from napari_confocal_stain.io.readers import open_mosaic  # noqa: E402
from napari_confocal_stain.io.synthetic import synth_nuclei  # noqa: E402
from napari_confocal_stain.measure.slide import (  # noqa: E402
    MAP_NAMES,
    CellBlock,
    SlideMaps,
    level_cell,
    measure_box,
)

SIZE, SEED = (1024, 1536), 3  # the conftest's synthetic_slide
CELL = 256


@pytest.fixture(scope="module")
def affine_checkpoint(tmp_path_factory):
    from napari_confocal_stain.models.checkpoint import save_checkpoint
    from napari_confocal_stain.models.registry import build_model

    path = tmp_path_factory.mktemp("models") / "affine.safetensors"
    return save_checkpoint(path, build_model("affine"))


@pytest.fixture(scope="module")
def calibrated_affine(tmp_path_factory):
    """The affine generator with the default model's flag calibration in its metadata."""
    from napari_confocal_stain.measure.flags import CALIBRATION_KEY, load_calibration
    from napari_confocal_stain.models.checkpoint import save_checkpoint
    from napari_confocal_stain.models.registry import build_model

    path = tmp_path_factory.mktemp("models") / "affine-calibrated.safetensors"
    extra = {CALIBRATION_KEY: load_calibration().to_dict()}
    return save_checkpoint(path, build_model("affine"), extra=extra)


@pytest.fixture(scope="module")
def painted(synthetic_slide):
    """An output with a painted fake structure in one cell and one erased nucleus in another.

    Returns the uint8 output and the two cells ``(painted, erased)`` plus the erased
    nucleus's centre.
    """
    pipeline = StainPipeline(open_mosaic(synthetic_slide))
    r, f = pipeline.raw(0, (0, SIZE[0], 0, SIZE[1]))
    truth = synth_nuclei(SIZE, seed=SEED)
    gt = np.column_stack([truth["y"], truth["x"], truth["radius_px"]]).astype(np.float64)
    # An isolated nucleus well inside its cell (its detection cannot fall in another cell).
    dist = np.hypot(gt[:, None, 0] - gt[None, :, 0], gt[:, None, 1] - gt[None, :, 1])
    np.fill_diagonal(dist, np.inf)
    inner = (gt[:, :2] % CELL > 40).all(1) & (gt[:, :2] % CELL < CELL - 40).all(1)
    lonely = np.flatnonzero((dist.min(axis=1) > 30) & inner)
    y, x, rad = gt[lonely[len(lonely) // 2]]
    erased_cell = (int(y) // CELL, int(x) // CELL)
    yy, xx = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    d = np.hypot(yy - y, xx - x)
    f_out = f.copy()
    f_out[d < 1.8 * rad] = np.percentile(f[(d > 2.2 * rad) & (d < 3.2 * rad)], 20)
    out = linear_stain(r, f_out)
    # Mild noise everywhere: no cell of a real output is identical to its source.
    rng = np.random.default_rng(0)
    out = np.clip(out + rng.normal(0, 0.01, out.shape), 0, 1).astype(np.float32)
    # The fake structure: a textured purple disc in the middle of a cell not next to it.
    painted_cell = next(
        (i, j)
        for i in range(SIZE[0] // CELL)
        for j in range(SIZE[1] // CELL)
        if max(abs(i - erased_cell[0]), abs(j - erased_cell[1])) > 1
    )
    cy, cx = (v * CELL + CELL // 2 for v in painted_cell)
    py, px = np.mgrid[-90:90, -90:90]
    disc = py**2 + px**2 < 80**2
    texture = 0.5 + 0.5 * np.sin(px / 3.0) * np.cos(py / 5.0)
    patch = out[cy - 90 : cy + 90, cx - 90 : cx + 90]
    patch[disc] = texture[disc, None] * np.float32([0.55, 0.2, 0.75])
    return to_uint8(out), painted_cell, erased_cell, (y, x)


def open_slide(viewer, path):
    from napari_confocal_stain.napari._reader import read_mosaic

    return [viewer.add_image(data, **kw) for data, kw, _ in read_mosaic(str(path))]


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def wait_done(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


# ----------------------------------------------------------------------------- viewer


def test_painted_structure_and_erased_nucleus_light_up_exactly_their_cells(
    make_napari_viewer, qtbot, synthetic_slide, painted, notifications
):
    from napari_confocal_stain.napari._heatmaps import HeatmapsWidget

    output, painted_cell, erased_cell, (ey, ex) = painted
    viewer = make_napari_viewer()
    open_slide(viewer, synthetic_slide)
    viewer.add_image(
        output, rgb=True, name="painted output", scale=(0.75, 0.75), units=("um", "um")
    )
    widget = HeatmapsWidget(viewer)
    slide = widget.slide.value
    assert slide == "mosaic_synthetic"
    widget.output.reset_choices()
    assert "painted output" in widget.output.choices  # an RGB layer of the slide's size
    widget.output.value = "painted output"
    widget.cell.value = CELL
    assert widget.measure_slide(level=0) is not None
    wait_done(qtbot, widget)
    assert not notifications, [n.message for n in notifications]

    maps = widget.results(slide)[(slide, "painted output")]
    expected = np.zeros(maps.grid, bool)
    expected[painted_cell] = expected[erased_cell] = True
    # The calibrated flags (the default model's calibration: the output is another layer):
    # the erased nucleus flags its cell, for that reason, with a marker on the nucleus.
    flagged = widget.flagged(slide, "painted output")
    assert flagged[erased_cell] and "erased_nuclei" in maps.reasons[erased_cell]
    # The painted structure sits on glass (the slide's corner): a background cell is never
    # flagged, however unlike its input the output is there.
    assert maps.flags["tissue"][painted_cell] == 0 and not flagged[painted_cell]
    assert not (flagged & (maps.flags["tissue"] == 0)).any()
    # Each cell lights up for its own reason: texture/structure there, a lost nucleus here.
    chi2, ssim = maps.maps["lbp_chi2"], maps.maps["ssim"]
    others = ~expected
    assert chi2[painted_cell] > 5 * chi2[others].max()
    assert ssim[painted_cell] < ssim[others].min() - 0.2
    assert maps.maps["nuclei_erased"][erased_cell] == 1
    assert chi2[erased_cell] < 0.08 and ssim[erased_cell] > 0.3  # only the nucleus is gone
    kept = maps.maps["nuclei_preserved"]
    assert np.all(kept[others & np.isfinite(kept)] == 1)

    # Layers: three cell grids on the slide's µm grid and two point layers.
    heat = {lyr.metadata["confocal_stain"]["metric"]: lyr for lyr in widget._viewer.layers
            if lyr.metadata.get("confocal_stain", {}).get("role") == "heatmap"}  # fmt: skip
    assert set(heat) == {"lbp_chi2", "ssim", "nuclei_preserved"}
    layer = heat["lbp_chi2"]
    assert layer.data.shape == maps.grid
    np.testing.assert_allclose(layer.scale, [CELL * 0.75] * 2)
    assert 0 < layer.opacity < 1
    # Hovering the painted cell's centre (in µm) shows its χ² under the layer's name.
    world = [(v * CELL + CELL / 2) * 0.75 for v in painted_cell]
    assert layer.get_value(world, world=True) == pytest.approx(chi2[painted_cell], rel=1e-6)
    status = layer.get_status(world, world=True)
    assert "LBP χ²" in status["layer_name"] and "256-px cell" in status["layer_name"]
    assert f"{chi2[painted_cell]:.3f}"[:4] in status["coordinates"]
    # The status bar under the cursor names every metric of the cell with its value.
    viewer.mouse_over_canvas = True
    viewer.cursor.position = world
    text, _ = viewer._calc_status_from_cursor()
    for metric in ("lbp_chi2", "ssim"):
        shown = re.search(re.escape(heat[metric].name) + r": ([-0-9.e]+)", text)
        assert shown is not None, text
        assert float(shown[1]) == pytest.approx(maps.maps[metric][painted_cell], abs=0.01)
    # Cell and slide grids line up: a cell's first slide pixel falls in that cell, the
    # slide pixel before it in the previous cell.
    i, j = painted_cell
    first = np.array([i * CELL, j * CELL]) * 0.75
    assert tuple(np.round(layer.world_to_data(first))) == (i, j)
    assert tuple(np.round(layer.world_to_data(first - [0.75, 0.75]))) == (i - 1, j - 1)
    erased = next(lyr for lyr in viewer.layers if lyr.name.startswith(f"{slide} · erased"))
    np.testing.assert_array_equal(erased.data, maps.points["flag_erased"])
    assert np.hypot(*(erased.data - [ey, ex]).T).min() < 3
    invented = next(lyr for lyr in viewer.layers if lyr.name.startswith(f"{slide} · invented"))
    np.testing.assert_array_equal(invented.data.reshape(-1, 2), maps.points["flag_invented"])
    assert erased.symbol[0] != invented.symbol[0] if len(invented.data) else True
    # The legend shows the measured values and says what the colours mean, in words.
    assert f"{maps.grid[0] * maps.grid[1]} cells" in widget.legend["ssim"].values.value
    assert "texture differs" in widget.legend["lbp_chi2"].meaning.value
    assert "yellow outline = flagged cell" in widget.flag_legend.value
    _check_review(viewer, widget, maps, flagged)


def _check_review(viewer, widget, maps, flagged):
    """Outlines, summary line and Next / Previous of a measured slide."""
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None else viewer.camera
    slide = widget.slide.value
    n, m = int(flagged.sum()), int((maps.flags["tissue"] == 1).sum())
    assert n >= 2 and m > n
    assert widget.review.summary.value.startswith(f"{slide}: {n} of {m} tissue cells flagged")
    # One outline per flagged cell, on the cell's pixels.
    (outlines,) = [
        lyr
        for lyr in viewer.layers
        if lyr.metadata.get("confocal_stain", {}).get("kind") == "flagged"
    ]
    assert outlines.nshapes == n
    corners = {tuple(np.round(d.min(axis=0) + 0.5).astype(int) // CELL) for d in outlines.data}
    assert corners == {tuple(c) for c in np.argwhere(flagged)}
    np.testing.assert_allclose(outlines.scale, [0.75, 0.75])
    # Next walks the flagged cells from the highest score down, centring the camera on
    # each cell and zooming in; it wraps after the last, and Previous goes back.
    cells = [tuple(c) for c in np.argwhere(flagged)]
    expected = sorted(cells, key=lambda c: (-maps.flags["score"][c], c))
    assert widget.review.order == expected
    seen = []
    for _ in range(n + 1):
        widget.review.next_button.clicked.emit()
        centre = np.asarray(camera.center)[-2:]
        seen.append(tuple(int(v) for v in centre / 0.75 // CELL))
        i, j = seen[-1]
        want = (np.array([i, j]) * CELL + (CELL - 1) / 2) * 0.75
        np.testing.assert_allclose(centre, want, atol=1e-6)
    assert seen == [*expected, expected[0]]
    zoom = camera.zoom
    assert zoom * CELL * 0.75 == pytest.approx(0.6 * min(viewer.canvas.size), rel=1e-6)
    info = widget.review.cell_info.value
    assert f"score {maps.flags['score'][expected[0]]:.2f}" in info and f"1 of {n}" in info
    widget.review.prev_button.clicked.emit()
    assert tuple(int(v) for v in np.asarray(camera.center)[-2:] / 0.75 // CELL) == expected[-1]
    assert f"{n} of {n}" in widget.review.cell_info.value
    words = widget.review.cell_info.value.split("Why: ")[1]
    assert words and "_" not in words  # reasons in words, not signal names


def test_gan_whole_slide_report_dock_and_saving(
    make_napari_viewer, qtbot, synthetic_slide, affine_checkpoint, tmp_path, notifications
):
    from napari_confocal_stain.napari._heatmaps import HeatmapsWidget
    from napari_confocal_stain.napari._report_dock import MetricsReportWidget

    viewer = make_napari_viewer()
    open_slide(viewer, synthetic_slide)
    widget = HeatmapsWidget(viewer)
    dock = MetricsReportWidget(viewer)
    widget.checkpoint.value = affine_checkpoint
    # "Measure visible region": the whole slide is in view after opening it.
    widget.strategy.value = "independent"
    level, box = widget.visible_region()
    assert box[0] <= 0 and box[2] <= 0 and box[1] >= 1024 and box[3] >= 1536
    assert widget.measure_visible() is not None
    wait_done(qtbot, widget)
    widget.strategy.value = "seamless"
    assert widget.measure_slide(level=1) is not None  # 512-px cells = 256 px at level 1
    wait_done(qtbot, widget)
    assert not notifications, [n.message for n in notifications]
    labels = {label for _, label in widget.results()}
    assert labels == {"affine · independent", "affine · seamless"}
    for maps in widget.results().values():
        assert maps.measured.all()
        # The identity generator reproduces its input (up to bf16 rounding, which "auto"
        # precision may pick on a CPU): no texture or structure change.
        assert np.nanmax(maps.maps["lbp_chi2"]) < 0.01
        assert np.nanmin(maps.maps["ssim"]) > 0.99
    independent = widget.results()[("mosaic_synthetic", "affine · independent")]
    assert (independent.levels == level).all()  # the level napari shows
    seamless = widget.results()[("mosaic_synthetic", "affine · seamless")]
    assert (seamless.levels == 1).all()
    assert np.isnan(seamless.maps["nuclei_preserved"]).all()  # 1.5 µm/px: nuclei not counted
    # The report dock follows the heatmaps: one row per output and metric, a plot per slide.
    qtbot.waitUntil(lambda: dock.table.shape[0] == 2 * 5, timeout=5000)
    assert dock.slide.value == "mosaic_synthetic"
    assert any("affine · seamless · ssim" == str(i) for i in dock.table.row_headers)
    assert len(dock.figure.axes) == 3
    png = dock.save_png(tmp_path / "out" / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = dock.save_csv(tmp_path / "out" / "cells.csv")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3  # 1024 × 1536 slide, 512-px cells
    assert float(rows[-1]["affine · seamless.ssim"]) > 0.99
    # Atomic writes: no temporaries left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cells.csv", "plot.png"]


def test_errors_are_one_notification_and_cancel_stops(
    make_napari_viewer, qtbot, synthetic_slide, affine_checkpoint, tmp_path, notifications
):
    from napari_confocal_stain.napari._heatmaps import HeatmapsWidget

    viewer = make_napari_viewer()
    widget = HeatmapsWidget(viewer)
    assert widget.measure_slide() is None  # no slide open
    assert "open a slide" in widget.status.value.lower()
    open_slide(viewer, synthetic_slide)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget.checkpoint.value = bad
    notifications.clear()
    widget.measure_slide(level=0)
    wait_done(qtbot, widget)
    assert len(notifications) == 1 and "broken.safetensors" in notifications[0].message
    assert "broken.safetensors" in widget.status.value
    assert not widget.results()
    notifications.clear()
    assert widget.measure_slide(level=5) is None  # the slide has 2 levels
    assert len(notifications) == 1 and "out of range" in widget.status.value
    # Cancel right after the start: the run stops before its first chunk is measured.
    widget.checkpoint.value = affine_checkpoint
    notifications.clear()
    assert widget.measure_slide(level=0) is not None
    assert widget.cancel_button.enabled
    widget.cancel()
    wait_done(qtbot, widget, timeout=20_000)
    assert "cancelled" in widget.status.value.lower()
    assert not widget.results() and not notifications
    assert not widget.cancel_button.enabled


def test_live_mode_measures_tiles_as_the_engine_lands_them(
    make_napari_viewer, qtbot, synthetic_slide, affine_checkpoint
):
    from napari_confocal_stain.napari._heatmaps import HeatmapsWidget

    _live = pytest.importorskip("napari_confocal_stain.napari._live")
    viewer = make_napari_viewer()
    open_slide(viewer, synthetic_slide)
    mosaic = open_mosaic(synthetic_slide)
    pipeline = StainPipeline(
        mosaic, StainSettings(model=str(affine_checkpoint), strategy="independent")
    )
    live = _live.LiveLayer(
        viewer, pipeline, "gan", slide="mosaic_synthetic", role="gan",
        layer_kwargs={"scale": (0.75, 0.75), "units": ("um", "um"), "name": "GAN"},
    )  # fmt: skip
    widget = HeatmapsWidget(viewer)
    widget.cell.value = 512
    widget.live.value = True
    assert widget._live is live
    # The engine decides what to compute: the top-left tile in view, and its prefetch ring.
    live.renderer.request(0, (0, 512, 0, 512))
    assert live.renderer.wait_idle(60)
    qtbot.waitUntil(lambda: len(widget.results()) == 1 and widget.wait_live(0.1), timeout=30_000)
    assert widget.wait_live(30)
    maps = next(iter(widget.results().values()))
    # Cells covered by a landed tile of any level are measured, the others not, and a cell
    # keeps its finest measurement (a 512-px cell is one level-0 tile, a quarter of a
    # level-1 tile; napari's own first view of the whole slide asked for level 1).
    renderer = live.renderer

    def landed() -> tuple[np.ndarray, np.ndarray]:
        covered = np.zeros(maps.grid, bool)
        finest = np.full(maps.grid, 255)
        for level in range(len(renderer.level_shapes)):
            k = 2**level  # cells per tile side at this level
            gy, gx = renderer.grid(level)
            for ty, tx in np.ndindex(gy, gx):
                if renderer.is_done(level, ty, tx):
                    sl = (slice(ty * k, (ty + 1) * k), slice(tx * k, (tx + 1) * k))
                    covered[sl] = True
                    finest[sl] = np.minimum(finest[sl], level)
        return covered, finest

    # napari's own draws may still land a tile after the first wait: measuring follows
    # landing, so wait until both are idle and agree.
    qtbot.waitUntil(
        lambda: (
            renderer.wait_idle(0.1)
            and widget.wait_live(0.1)
            and np.array_equal(next(iter(widget.results().values())).measured, landed()[0])
        ),
        timeout=30_000,
    )
    maps = next(iter(widget.results().values()))
    covered, finest = landed()
    assert renderer.is_done(0, 0, 0) and not renderer.is_done(0, 0, 2)
    np.testing.assert_array_equal(maps.measured, covered)
    np.testing.assert_array_equal(maps.levels[covered], finest[covered])
    assert np.nanmax(maps.maps["lbp_chi2"]) < 0.01 and np.nanmin(maps.maps["ssim"]) > 0.99
    full = maps.levels == 0
    assert full[0, 0] and np.all(maps.maps["nuclei_preserved"][full] >= 0.95)
    # The same cells measured directly (output = what the layer displays) agree.
    direct = measure_box(
        pipeline, 0, (0, 512, 0, 512), 512, output=lambda lv, b: live.renderer.read(lv, b)
    )
    for name in ("lbp_chi2", "ssim", "nuclei_preserved"):
        assert direct.maps[name][0, 0] == pytest.approx(maps.maps[name][0, 0])
    widget.live.value = False
    assert widget._live is None
    live.close()


# ----------------------------------------------------------------------------- library


def test_chunked_flags_equal_the_whole_slide_flags(synthetic_slide, painted):
    from napari_confocal_stain.measure.flags import flag_hallucinations
    from napari_confocal_stain.measure.slide import measure_slide, output_calibration

    output = painted[0]
    pipeline = StainPipeline(open_mosaic(synthetic_slide))
    r, f = pipeline.raw(0, (0, SIZE[0], 0, SIZE[1]))
    whole = flag_hallucinations(r, f, output / 255.0, cell=CELL)
    slide = SlideMaps(SIZE, CELL)
    calibration = output_calibration(pipeline, gan=False)  # another output: default model
    for _, _, block in measure_slide(
        pipeline, 0, CELL, output=lambda _lv, b: output[b[0] : b[1], b[2] : b[3]],
        chunk=512, calibration=calibration,
    ):  # fmt: skip
        slide.add(block)
    # 512-px chunks of 256-px cells, read with 96 px of context: every cell's flags are the
    # whole slide's (same arithmetic on the same pixels; the tolerance is float noise).
    np.testing.assert_allclose(slide.flags["score"], whole["score"], atol=1e-6)
    np.testing.assert_array_equal(slide.flags["tissue"] == 1, whole["tissue"])
    clear = np.abs(whole["score"] - 1) > 1e-3
    np.testing.assert_array_equal(slide.flagged[clear], whole["flagged"][clear])
    assert whole["flagged"].any() and not whole["flagged"][~whole["tissue"]].any()
    for name, key in (("flag_erased", "erased_points"), ("flag_invented", "invented_points")):
        a, b = slide.points[name], whole[key]
        assert len(a) == len(b)
        np.testing.assert_allclose(a[np.lexsort(a.T)], b[np.lexsort(b.T)], atol=1e-6)
    for idx in np.argwhere(clear & whole["flagged"]):
        assert slide.reasons[tuple(idx)] == whole["reasons"][tuple(idx)]


def test_region_flags_equal_the_whole_slide_flags_of_its_cells(synthetic_slide, painted):
    """A region measure (the viewer's "Measure visible region") reads context beyond it.

    Flagging a *crop* mirrors the local signals at the crop's edge (docs/flags.md, cells
    around a defect); the region measure instead reads the slide around the region, so the
    cells of a view deep inside the slide score as they do in the whole slide.
    """
    from napari_confocal_stain.measure.flags import flag_hallucinations
    from napari_confocal_stain.measure.slide import measure_slide, output_calibration

    output = painted[0]
    pipeline = StainPipeline(open_mosaic(synthetic_slide))
    r, f = pipeline.raw(0, (0, SIZE[0], 0, SIZE[1]))
    whole = flag_hallucinations(r, f, output / 255.0, cell=CELL)
    region = (CELL, 3 * CELL, CELL, 3 * CELL)  # 2 × 2 cells, slide on every side
    slide = SlideMaps(SIZE, CELL)
    for _, _, block in measure_slide(
        pipeline, 0, CELL, region=region, output=lambda _lv, b: output[b[0] : b[1], b[2] : b[3]],
        chunk=512, calibration=output_calibration(pipeline, gan=False),
    ):  # fmt: skip
        slide.add(block)
    inner = (slice(1, 3), slice(1, 3))
    np.testing.assert_allclose(slide.flags["score"][inner], whole["score"][inner], atol=1e-6)
    assert np.isnan(slide.flags["score"][0, 0])  # outside the region: not measured
    # The same cells flagged from a crop of exactly the region (no context) differ.
    y0, y1, x0, x1 = region
    crop = flag_hallucinations(
        r[y0:y1, x0:x1], f[y0:y1, x0:x1], output[y0:y1, x0:x1] / 255.0, cell=CELL
    )
    assert not np.allclose(crop["score"], whole["score"][inner], atol=1e-3)


def test_cli_metrics_csv_has_the_calibrated_flags(
    synthetic_slide, calibrated_affine, tmp_path, capsys
):
    from napari_confocal_stain.measure.flags import flag_hallucinations

    out = tmp_path / "cells.csv"
    code = cli_main(
        ["metrics", str(synthetic_slide), "--model", str(calibrated_affine), "--cell", "256",
         "--chunk", "512", "--strategy", "independent", "--csv", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-3:] == ["flagged", "score", "reasons"]
    assert len(rows) == (SIZE[0] // 256) * (SIZE[1] // 256)
    pipeline = StainPipeline(
        open_mosaic(synthetic_slide),
        StainSettings(model=str(calibrated_affine), strategy="independent"),
    )
    box = (0, SIZE[0], 0, SIZE[1])
    r, f = pipeline.raw(0, box)
    stained = to_uint8(pipeline.gan(0, box)) / 255.0
    direct = flag_hallucinations(r, f, stained, cell=256, model=str(calibrated_affine))
    for row in rows:
        cell = int(row["cell_y"]), int(row["cell_x"])
        assert row["flagged"] in ("0", "1")
        score = float(row["score"])
        assert (row["flagged"] == "1") == (score > 1) == (row["reasons"] != "")
        assert score == pytest.approx(direct["score"][cell], abs=0.02)
        if abs(direct["score"][cell] - 1) > 0.05:
            assert (row["flagged"] == "1") == bool(direct["flagged"][cell])
        if row["reasons"]:
            assert set(row["reasons"].split("+")) <= set(direct["signal_names"])
    n = sum(r["flagged"] == "1" for r in rows)
    m = int(direct["tissue"].sum())
    assert f"flags: {n} of {m} tissue cells flagged" in printed


def test_slide_maps_keep_the_finest_level_and_flag_thresholds():
    slide = SlideMaps((1000, 1500), 512)
    assert slide.grid == (2, 3)
    nan = np.full((1, 1), np.nan)

    def block(level, origin, chi2, erased=()):
        maps = {n: nan.copy() for n in MAP_NAMES}
        maps["lbp_chi2"] = np.full((1, 1), chi2)
        pts = {k: np.empty((0, 2)) for k in ("erased", "invented", "preserved")}
        pts["erased"] = np.array(erased, float).reshape(-1, 2)
        return CellBlock(level, origin, maps, pts)

    slide.add(block(0, (1, 2), 0.5, [(600, 1100)]))
    slide.add(block(2, (1, 2), 0.0))  # coarser: ignored
    assert slide.maps["lbp_chi2"][1, 2] == 0.5 and len(slide.points["erased"]) == 1
    slide.add(block(0, (1, 2), 0.01))  # same level: replaces, points too
    assert slide.maps["lbp_chi2"][1, 2] == 0.01 and len(slide.points["erased"]) == 0
    with pytest.raises(ValueError, match="minimum"):
        level_cell(128, 8)
    with pytest.raises(ValueError, match="whole number"):
        level_cell(100, 8)


# ----------------------------------------------------------------------------- CLI


def parser():
    p = argparse.ArgumentParser(prog="confocal-stain")
    metrics_cli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_metrics_csv_plot_and_errors(synthetic_slide, affine_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    args = parser().parse_args(
        ["metrics", str(synthetic_slide), "--model", str(affine_checkpoint),
         "--strategy", "independent", "--strategy", "seamless", "--cell", "512",
         "--region", "0:1024,500:1536", "--csv", str(out / "cells.csv"),
         "--plot", str(out / "cells.png"), "--quiet"]
    )  # fmt: skip
    assert args.func is metrics_cli.run
    assert args.func(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.count("lbp_chi2") == 2 and "independent" in printed and "seamless" in printed
    # A checkpoint without a flag calibration: metrics, no flags, one warning saying why.
    assert "no hallucination flags" in captured.err and "calibrate" in captured.err
    assert printed.count("flags: not computed") == 2
    with open(out / "cells.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # Columns 500..1536 snap outwards to cells 0..2 (x 0..1536): 2 × 3 cells.
    assert [(r["cell_y"], r["cell_x"]) for r in rows] == [
        (str(i), str(j)) for i in range(2) for j in range(3)
    ]
    assert rows[-1]["x1"] == "1536" and rows[-1]["y1"] == "1024"
    for r in rows:
        assert float(r["seamless.lbp_chi2"]) < 0.01 and float(r["independent.ssim"]) > 0.99
        assert float(r["seamless.nuclei_preserved"]) >= 0.95
        assert float(r["seamless.nuclei_erased"]) <= 1
        assert r["seamless.flagged"] == r["seamless.score"] == r["seamless.reasons"] == ""
    assert (out / "cells.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "cells.png"]

    def fails(*extra):
        code = cli_main(["metrics", str(synthetic_slide), "--quiet", *extra])
        err = capsys.readouterr().err
        return code, err

    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(b"junk")
    for extra, message in [
        (["--region", "5000:6000,0:10"], "outside"),
        (["--region", "banana"], "y0:y1,x0:x1"),
        (["--cell", "100"], "power of two"),
        (["--level", "1", "--cell", "32"], "minimum"),
        (["--level", "9"], "out of range"),
        (["--model", str(bad_ckpt), "--csv", str(tmp_path / "no.csv")], "bad.safetensors"),
    ]:
        code, err = fails(*extra)
        assert code == 2, extra
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "no.csv").exists()
    code, err = fails("--model", "x")
    assert code == 2 and "x" in err
    assert cli_main(["metrics", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
