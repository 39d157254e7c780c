"""Screenshots of every tab of the Confocal stain dock, sample slide open, 1920 × 1080 window.

``xvfb-run -a -s "-screen 0 1920x1080x24" python bench/screenshots.py [--out docs/screenshots]
[--quick]``

Opens the sample slide (``confocal-stain sample``) in a 1920 × 1080 napari window with the
dock at its default width, zooms to a full-resolution region, starts the GAN stain there,
measures the heatmaps and calibrated flags of the region in view, steps to the first
flagged cell, and saves one PNG of the dock per tab (``gan-stain.png``, ``linear-stain.png``,
``despeckle.png``, ``heatmaps.png`` and, scrolled down to the flag review and the legend,
``heatmaps-review.png``) plus the whole window on the Heatmaps tab
(``window-heatmaps.png``). Each PNG is kept under 300 KB (palette-quantised).

It also lists every label of the dock whose text does not fit its width (a cut-off status
or summary line) and exits with status 1 if there is one. ``--quick`` skips the GAN and the
measuring (layout only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABS = ("gan-stain", "linear-stain", "despeckle", "heatmaps")
MAX_BYTES = 300_000


def _process(seconds: float = 0.2) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def _wait(condition, timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        _process(0.05)
        if condition():
            return True
    return False


def _save(pixmap, path: Path) -> int:
    """Save a QPixmap as PNG, palette-quantised (and halved if need be) to stay small."""
    import numpy as np
    from PIL import Image
    from qtpy.QtGui import QImage

    image = pixmap.toImage().convertToFormat(QImage.Format.Format_RGBA8888)
    w, h = image.width(), image.height()
    buf = np.frombuffer(image.constBits().asstring(h * image.bytesPerLine()), np.uint8)
    rgb = buf.reshape(h, image.bytesPerLine() // 4, 4)[:, :w, :3]
    pil = Image.fromarray(np.ascontiguousarray(rgb))
    while True:
        pil.quantize(colors=128, dither=Image.Dither.NONE).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES or pil.width < 400:
            return path.stat().st_size
        pil = pil.resize((pil.width * 3 // 4, pil.height * 3 // 4), Image.Resampling.LANCZOS)


def cut_labels(root) -> list[str]:
    """Visible texts under ``root`` that are cut off (too narrow, clipped by the dock)."""
    from qtpy.QtWidgets import QAbstractButton, QLabel

    cut = []
    for widget in [*root.findChildren(QLabel), *root.findChildren(QAbstractButton)]:
        pixmap = widget.pixmap() if isinstance(widget, QLabel) else None
        has_picture = pixmap is not None and not pixmap.isNull()
        if not widget.isVisible() or not widget.text() or has_picture:
            continue
        text = widget.text()[:80]
        shown = widget.visibleRegion().boundingRect()
        if not shown.isEmpty() and shown.right() < widget.width() - 1:
            cut.append(f"clipped at the right by the dock: {text!r}")
        elif isinstance(widget, QLabel) and widget.wordWrap():
            if widget.heightForWidth(widget.width()) > widget.height() + 1:
                cut.append(f"wrapped but clipped: {text!r}")
        elif widget.sizeHint().width() > widget.width() + 1:
            cut.append(f"{text!r} needs {widget.sizeHint().width()} px, has {widget.width()}")
    return cut


def main(argv: list[str] | None = None) -> int:
    import napari

    from napari_confocal_stain.io.sample import sample_slide_path
    from napari_confocal_stain.napari._panel import ConfocalStainWidget

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--quick", action="store_true", help="layout only: no GAN, no measuring")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    viewer = napari.Viewer(show=True)
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(1920, 1080)
    dock, panel = viewer.window.add_plugin_dock_widget("napari-confocal-stain", "Confocal stain")
    assert isinstance(panel, ConfocalStainWidget)
    panel.open_path(sample_slide_path())
    _process(1.0)
    if not args.quick:
        _stain_and_measure(viewer, panel)
    problems = []
    shots = [(i, name, False) for i, name in enumerate(TABS)] + [(3, "heatmaps-review", True)]
    for index, name, bottom in shots:
        panel.tabs.setCurrentIndex(index)
        bar = panel.tabs.widget(index).verticalScrollBar()  # each tab scrolls on its own
        bar.setValue(bar.maximum() if bottom else 0)
        _process(0.5)
        size = _save(dock.grab(), args.out / f"{name}.png")
        cut = cut_labels(dock)
        problems += [f"{name}: {c}" for c in cut]
        print(f"{name}.png: {dock.width()}x{dock.height()} px, {size / 1000:.0f} KB, cut: {cut}")
    print(f"window: {window.width()}x{window.height()} px")
    size = _save(window.grab(), args.out / "window-heatmaps.png")
    print(f"window-heatmaps.png: {size / 1000:.0f} KB")
    for line in problems:
        print("CUT OFF:", line)
    viewer.close()
    return 1 if problems else 0


def _stain_and_measure(viewer, panel) -> None:
    """Zoom to a full-resolution region, GAN-stain it, measure it, go to the first flag."""
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None else viewer.camera
    px = 0.75
    camera.center = (2048 * px, 2048 * px)
    camera.zoom = 1.0 / px  # one screen pixel per slide pixel: level 0
    _process(1.0)
    panel.gan.start()
    live = panel.gan.live()
    _wait(lambda: live is not None and live.renderer.wait_idle(0.05), 900)
    heat = panel.heatmaps
    heat.measure_visible()
    _wait(lambda: not heat.running, 1800)
    heat.review.step(1)
    _process(1.0)


if __name__ == "__main__":
    sys.exit(main())
