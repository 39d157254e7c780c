"""Bad input in the napari shell (real viewer under Xvfb): each failure is one notification
naming the file and the problem, no traceback, and no partial output.

The failures are real: a path through a file, a read-only and a full tmpfs (skipped where
mounting is not allowed), a broken checkpoint, a slide with NaN outside its statistics
sample.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from _faults import leftovers, tmpfs  # noqa: E402
from _tiff_factories import image, write_tiff_pyramid  # noqa: E402

from napari_confocal_stain.errors import OutputError  # noqa: E402
from napari_confocal_stain.models.checkpoint import save_checkpoint  # noqa: E402
from napari_confocal_stain.models.registry import build_model  # noqa: E402
from napari_confocal_stain.napari._live import live_layers  # noqa: E402
from napari_confocal_stain.napari._panel import ConfocalStainWidget  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def notifications():
    """Every napari notification raised during the test (what the user would see)."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture
def panel(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    widget = ConfocalStainWidget(viewer)
    widget.stain_on_open.value = False
    widget.open_path(synthetic_slide)
    yield viewer, widget
    for live in [
        *live_layers(viewer, "gan").values(),
        *live_layers(viewer, "despeckled-r").values(),
    ]:
        live.close()


def export(widget, qtbot, out: Path) -> str:
    """Export the linear stain from the GAN tab; return the status line when it ends."""
    gan = widget.gan
    gan.export_what.value = "linear"
    assert gan.export(out) is not None
    qtbot.waitUntil(lambda: gan.export_button.enabled, timeout=120_000)
    return str(gan.export_status.value)


def errors(notifications, prefix: str) -> list[str]:
    return [str(n.message) for n in notifications if str(n.message).startswith(prefix)]


def test_export_to_a_path_through_a_file(panel, qtbot, tmp_path, notifications):
    _, widget = panel
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    status = export(widget, qtbot, notes / "x.ome.zarr")
    (message,) = errors(notifications, "Export:")
    assert f"{notes} is a file, not a folder" in message and "\n" not in message
    assert status.startswith("Export failed") and str(notes) in status
    assert leftovers(tmp_path) == ["notes.txt"] and notes.read_text() == "a file"


def test_export_to_a_read_only_disk(panel, qtbot, tmp_path, notifications):
    _, widget = panel
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        export(widget, qtbot, ro / "x.ome.tif")
        (message,) = errors(notifications, "Export:")
        assert str(ro) in message and "read-only file system" in message
        assert leftovers(ro) == []


def test_export_to_a_full_disk_keeps_the_work_and_resumes(panel, qtbot, tmp_path, notifications):
    _, widget = panel
    with tmpfs(tmp_path / "small", "1m") as disk:
        out = disk / "x.ome.zarr"
        work = disk / ".x.ome.zarr.partial"
        export(widget, qtbot, out)
        (message,) = errors(notifications, "Export:")
        assert str(out) in message and "disk full" in message and f"kept in {work}" in message
        assert leftovers(disk) == [work.name]
        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        notifications.clear()
        status = export(widget, qtbot, out)  # the same name again resumes
        assert status == f"Exported {out}", status
        assert leftovers(disk) == [out.name] and not errors(notifications, "Export:")


def test_broken_despeckle_model_is_one_notification(panel, qtbot, tmp_path, notifications):
    viewer, widget = panel
    bad = tmp_path / "despeckle.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    desp = widget.despeckle
    desp.model.bundled.value = "Checkpoint file…"
    desp.model.file.value = str(bad)
    desp.run()
    qtbot.waitUntil(lambda: desp.status.value.startswith("Not despeckled"), timeout=30_000)
    (message,) = errors(notifications, "Despeckle:")
    assert str(bad) in message and "\n" not in message
    assert not live_layers(viewer, "despeckled-r")


def test_report_dock_save_failures(
    make_napari_viewer, qtbot, synthetic_slide, tmp_path, notifications
):
    from napari_confocal_stain.napari._heatmaps import HeatmapsWidget
    from napari_confocal_stain.napari._report_dock import MetricsReportWidget

    viewer = make_napari_viewer()
    main = ConfocalStainWidget(viewer)
    main.stain_on_open.value = False
    main.open_path(synthetic_slide)
    heat = HeatmapsWidget(viewer)
    dock = MetricsReportWidget(viewer)
    assert dock.save(tmp_path / "early.csv", dock.save_csv) is None  # nothing measured yet
    (message,) = errors(notifications, "Metrics report:")
    assert "nothing measured" in message and not (tmp_path / "early.csv").exists()
    affine = save_checkpoint(tmp_path / "affine.safetensors", build_model("affine"),
                             architecture="affine")  # fmt: skip
    heat.checkpoint.value = affine
    heat.strategy.value = "independent"
    assert heat.measure_slide(level=1) is not None
    qtbot.waitUntil(lambda: heat._worker is None, timeout=60_000)
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    taken = tmp_path / "taken.csv"
    taken.mkdir()
    for path, words in ((notes / "cells.csv", f"{notes}: is a file, not a folder"),
                        (taken, f"{taken}: is a folder, not a file")):  # fmt: skip
        notifications.clear()
        assert dock.save(path, dock.save_csv) is None
        (message,) = errors(notifications, "Metrics report:")
        assert words in message and words in dock.status.value, message
    assert leftovers(tmp_path) == ["affine.safetensors", "notes.txt", "taken.csv"]
    assert leftovers(taken) == []
    assert dock.save(tmp_path / "cells.csv", dock.save_csv) == tmp_path / "cells.csv"


def test_writer_failure_is_one_line_naming_the_file(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((300, 400, 3), np.uint8), rgb=True, name="stain")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    target = notes / "layer.ome.tif"
    with pytest.raises(OutputError) as info:
        layer.save(str(target), plugin="napari-confocal-stain")
    message = str(info.value)
    assert "\n" not in message and f"{notes} is a file, not a folder" in message, message
    assert str(target) in message
    assert leftovers(tmp_path) == ["notes.txt"]


def nan_slide(folder: Path, side: int = 2048) -> Path:
    """A float32 R/F pair: clean coarse levels (any statistics sample is clean), and a
    16×16 NaN patch in level 0 of R, far from the image's centre. At the default size
    napari's first view of the whole slide is a coarse level; at 1024² it is level 0."""
    r = image((side, side), np.float32, seed=1)
    f = image((side, side), np.float32, seed=2)
    levels_r = [r, r[::2, ::2].copy(), r[::4, ::4].copy()]
    levels_f = [f, f[::2, ::2].copy(), f[::4, ::4].copy()]
    r[side - 88 : side - 72, 32:48] = np.nan
    write_tiff_pyramid(folder / "s1_R.tif", levels_r)
    write_tiff_pyramid(folder / "s1_F.tif", levels_f)
    return folder


def test_nan_beyond_the_statistics_sample_stops_the_export(
    make_napari_viewer, qtbot, tmp_path, notifications
):
    slide = nan_slide(tmp_path / "nan_slide")
    viewer = make_napari_viewer()
    widget = ConfocalStainWidget(viewer)
    widget.stain_on_open.value = False
    assert widget.open_path(slide)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    export(widget, qtbot, out_dir / "x.ome.zarr")
    (message,) = errors(notifications, "Export:")
    assert str(slide / "s1_R.tif") in message and "NaN" in message, message
    assert leftovers(out_dir) == []


def test_nan_in_the_first_view_is_one_notification_and_no_layer(
    make_napari_viewer, tmp_path, notifications
):
    slide = nan_slide(tmp_path / "nan_slide", side=1024)
    viewer = make_napari_viewer()
    widget = ConfocalStainWidget(viewer)
    widget.stain_on_open.value = False
    assert widget.open_path(slide) == []
    (message,) = errors(notifications, "Could not open confocal slide")
    assert str(slide / "s1_R.tif") in message and "NaN" in message, message
    assert len(viewer.layers) == 0
