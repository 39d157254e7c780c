"""Per-slide report: summary statistics, CSV of all cells, distribution plot (PNG)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from skimage.io import imread

from napari_confocal_stain.core.metrics import hallucination_maps
from napari_confocal_stain.measure.report import (
    STATISTICS,
    cells_to_csv,
    format_summary,
    plot_distributions,
    summarize,
)


def test_summarize_matches_numpy_and_ignores_nan():
    rng = np.random.default_rng(0)
    chi2 = rng.gamma(2.0, 0.01, (6, 7))
    ssim = rng.random((6, 7))
    ssim[-1] = np.nan  # edge cells without SSIM
    out = summarize({"lbp_chi2": chi2, "ssim": ssim, "none": np.full(3, np.nan)})
    assert list(out) == ["lbp_chi2", "ssim", "none"]
    assert list(out["ssim"]) == list(STATISTICS)
    assert out["lbp_chi2"]["n"] == 42 and out["ssim"]["n"] == 35
    assert out["lbp_chi2"]["mean"] == pytest.approx(chi2.mean())
    assert out["lbp_chi2"]["median"] == pytest.approx(np.median(chi2))
    finite = ssim[np.isfinite(ssim)]
    for key, q in (("q05", 0.05), ("q25", 0.25), ("q75", 0.75), ("q95", 0.95)):
        assert out["ssim"][key] == pytest.approx(np.quantile(finite, q))
    assert out["none"]["n"] == 0 and math.isnan(out["none"]["mean"])
    text = format_summary(out)
    assert text.splitlines()[0].split() == ["metric", *STATISTICS]
    assert len(text.splitlines()) == 4
    with pytest.raises(ValueError, match="numeric"):
        summarize({"bad": ["a", "b"]})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cells_csv_round_trips_real_maps(tmp_path):
    rng = np.random.default_rng(1)
    source = rng.random((300, 430, 3)).astype(np.float32)
    maps = hallucination_maps(source, np.clip(source * 0.8 + 0.1, 0, 1), 128)
    path = cells_to_csv(
        tmp_path / "out" / "cells.csv", maps, 128, origin=(1000, 2000), image_shape=(300, 430)
    )
    assert path.exists() and path.parent.name == "out"
    rows = read_csv(path)
    assert list(rows[0]) == ["cell_y", "cell_x", "y0", "x0", "y1", "x1", "lbp_chi2", "ssim"]
    assert len(rows) == 3 * 4
    last = rows[-1]
    assert (int(last["cell_y"]), int(last["cell_x"])) == (2, 3)
    assert (int(last["y0"]), int(last["x0"])) == (1000 + 256, 2000 + 384)
    assert (int(last["y1"]), int(last["x1"])) == (1000 + 300, 2000 + 430)  # clipped edge cell
    for row in rows:
        i, j = int(row["cell_y"]), int(row["cell_x"])
        assert float(row["lbp_chi2"]) == maps["lbp_chi2"][i, j]  # repr round-trips exactly
        assert float(row["ssim"]) == maps["ssim"][i, j]
    # Without image_shape the cells are full.
    rows = read_csv(cells_to_csv(tmp_path / "full.csv", {"m": np.zeros((2, 2))}, 64))
    assert rows[-1]["y1"] == "128" and rows[-1]["x1"] == "128"


def test_cells_csv_bad_input_leaves_no_file(tmp_path):
    path = tmp_path / "cells.csv"
    with pytest.raises(ValueError, match="one shape"):
        cells_to_csv(path, {"a": np.zeros((2, 3)), "b": np.zeros((3, 2))}, 64)
    with pytest.raises(ValueError, match="clashes"):
        cells_to_csv(path, {"y0": np.zeros((2, 3))}, 64)
    with pytest.raises(ValueError, match="cell must be"):
        cells_to_csv(path, {"a": np.zeros((2, 3))}, 0)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cells.csv"
    cells_to_csv(path, {"a": np.ones((1, 2))}, 8)
    before = path.read_bytes()
    # A real failure at the rename step: the destination is now a non-empty folder.
    blocked = tmp_path / "blocked.csv"
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with pytest.raises(OSError):
        cells_to_csv(blocked, {"a": np.ones((1, 2))}, 8)
    with pytest.raises(OSError):
        plot_distributions(blocked, {"s": {"a": [1.0, 2.0]}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.csv", "cells.csv"]


def test_distribution_plot_png(tmp_path):
    rng = np.random.default_rng(2)
    data = {
        "independent": {"lbp_chi2": rng.gamma(2, 0.02, 60), "ssim": rng.beta(4, 3, 60)},
        "no-overlap": {"lbp_chi2": rng.gamma(2, 0.015, 60), "ssim": rng.beta(5, 3, 60)},
        "pyramid": {"lbp_chi2": rng.gamma(2, 0.01, 60), "ssim": np.full(60, np.nan)},
    }
    path = plot_distributions(tmp_path / "plots" / "dist.png", data, title="scan 0")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300  # two panels side by side
    assert image[..., :3].std() > 20  # not blank
    one = plot_distributions(tmp_path / "one.png", data, metrics=["ssim"])
    assert imread(one).shape[1] < image.shape[1]
    with pytest.raises(ValueError, match="at least one strategy"):
        plot_distributions(tmp_path / "x.png", {})
    with pytest.raises(ValueError, match="at least one metric"):
        plot_distributions(tmp_path / "x.png", {"s": {}})
    assert not (tmp_path / "x.png").exists()
