"""The synthetic slide generator: determinism, locality, content, speckle and the writer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from scipy import stats

from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io._synth_fields import block_rng, gamma_speckle, upsample
from napari_confocal_stain.io.synthetic import (
    NUCLEUS_DTYPE,
    PIXEL_SIZE_UM,
    synth_layers,
    synth_mosaic_arrays,
    synth_nuclei,
    synth_region,
    write_synthetic_mosaic,
)

SIZE = (1536, 2560)  # wider than one render chunk (2048), several strips (256)


@pytest.fixture(scope="module")
def slide():
    """The whole SIZE slide (seed 7) in memory, with its layers."""
    return synth_layers(SIZE, 0, 0, *SIZE, seed=7)


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = synth_region((512, 640), 0, 0, 512, 640, seed=3)
    b = synth_region((512, 640), 0, 0, 512, 640, seed=3)
    c = synth_region((512, 640), 0, 0, 512, 640, seed=4)
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()
    for x, z in zip(a, c, strict=True):
        assert np.mean(x != z) > 0.5


@pytest.mark.parametrize(
    "region",
    [
        (250, 2030, 300, 40),  # across a strip border (256) and the render-chunk border (2048)
        (120, 120, 20, 20),  # across nucleus blocks (128) and lattice nodes (8)
        (1000, 3, 1, 2557),  # a single row, odd start
        (767, 1023, 3, 1537),  # odd start on the half-resolution grid
    ],
)
def test_region_is_bit_identical_to_the_same_pixels_of_the_whole(slide, region):
    y0, x0, h, w = region
    r, f = synth_region(SIZE, y0, x0, h, w, seed=7)
    assert r.tobytes() == slide["r"][y0 : y0 + h, x0 : x0 + w].tobytes()
    assert f.tobytes() == slide["f"][y0 : y0 + h, x0 : x0 + w].tobytes()


def test_ground_truth_is_the_same_whatever_the_region(slide):
    whole = synth_nuclei(SIZE, 7)
    assert whole.dtype == NUCLEUS_DTYPE and len(whole) > 300
    parts = [
        synth_nuclei(SIZE, 7, (y, x, 512, 640))
        for y in (0, 512, 1024)
        for x in range(0, 2560, 640)
    ]
    joined = np.concatenate(parts)
    joined = joined[np.lexsort((joined["x"], joined["y"]))]
    assert joined.tobytes() == whole.tobytes()
    # Nuclei do not overlap (hard core), so each is separately detectable.
    d = np.hypot(*(np.subtract.outer(whole[k][:400], whole[k][:400]) for k in ("y", "x")))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 6.0


def test_value_ranges_and_dtypes(slide):
    for key in ("r", "f"):
        a = slide[key]
        assert a.dtype == np.float32 and a.shape == SIZE
        assert a.min() >= 0.0 and a.max() <= 1.0
    for key in ("tissue", "keratin", "epidermis", "dermis", "nest"):
        assert slide[key].min() >= -1e-6 and slide[key].max() <= 1.0 + 1e-6
    # Tissue and background both present, all layers present on this slide.
    assert 0.25 < (slide["tissue"] > 0.5).mean() < 0.75
    for key in ("keratin", "epidermis", "dermis", "nest"):
        assert (slide[key] > 0.9).sum() > 1000, key
    r8, _ = synth_mosaic_arrays((300, 400), seed=2, dtype="uint8")
    r16, _ = synth_mosaic_arrays((300, 400), seed=2, dtype="uint16")
    rf, _ = synth_mosaic_arrays((300, 400), seed=2)
    assert r8.dtype == np.uint8 and r16.dtype == np.uint16 and rf.dtype == np.float32
    assert np.array_equal(r8, np.rint(rf * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="not inside"):
        synth_region((300, 400), 250, 0, 100, 10)
    with pytest.raises(ValueError, match="looks"):
        synth_region((300, 400), 0, 0, 10, 10, looks=-1)


def test_f_is_bright_at_ground_truth_nuclei(slide):
    gt = synth_nuclei(SIZE, 7)
    y = np.rint(gt["y"]).astype(int)
    x = np.rint(gt["x"]).astype(int)
    inner = (y > 20) & (y < SIZE[0] - 20) & (x > 20) & (x < SIZE[1] - 20)
    y, x, rad = y[inner], x[inner], gt["radius_px"][inner]
    f = slide["f"]
    centre = np.mean([f[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    # Surroundings: 8 points at 2.5 radii, the median (neighbouring nuclei may touch one).
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    ring = np.median(
        [
            f[
                np.rint(y + 2.5 * rad * np.sin(a)).astype(int),
                np.rint(x + 2.5 * rad * np.cos(a)).astype(int),
            ]
            for a in ang
        ],
        axis=0,
    )
    assert np.all(centre > 0.3)
    assert np.mean(centre > 2 * ring) > 0.97
    assert np.median(centre / np.maximum(ring, 1e-3)) > 3
    # Radii as specified: 6-12 um diameter.
    d_um = 2 * gt["radius_px"] * PIXEL_SIZE_UM
    assert d_um.min() >= 6.0 and d_um.max() <= 12.0
    # And nothing bright in F is missing from the ground truth: the F nuclei layer is zero
    # farther than 11 px from every ground-truth centre.
    nuc = slide["nuclei"] > 0.05
    far = np.ones(SIZE, bool)
    gy, gx = np.rint(gt["y"]).astype(int), np.rint(gt["x"]).astype(int)
    for dy in range(-11, 12):
        for dx in range(-11, 12):
            if dy * dy + dx * dx <= 121:
                yy, xx = np.clip(gy + dy, 0, SIZE[0] - 1), np.clip(gx + dx, 0, SIZE[1] - 1)
                far[yy, xx] = False
    assert not np.any(nuc & far)


def test_r_bright_in_keratin_and_fibres_dark_in_background(slide):
    r, f, rc = slide["r"], slide["f"], slide["r_clean"]
    background = slide["tissue"] < 0.01
    keratin = slide["keratin"] > 0.9
    fibre = slide["fibres"] > 0.4
    dermis_gap = (slide["dermis"] > 0.99) & (slide["fibres"] < 0.02) & (slide["nuclei"] == 0)
    assert r[background].mean() < 0.04 and f[background].mean() < 0.03
    assert r[keratin].mean() > 0.4
    assert r[fibre].mean() > 0.4
    assert r[fibre].mean() > 2 * r[dermis_gap].mean()
    # Nuclei are dark in R (clean image: against the cytoplasm right around them).
    nuc = slide["nuclei"] > 0.4
    epi = slide["epidermis"] > 0.99
    assert rc[nuc & epi].mean() < 0.6 * rc[epi & (slide["nuclei"] == 0)].mean()


@pytest.mark.parametrize("looks", [1, 5, 2.5])
def test_speckle_is_gamma_with_mean_one_and_variance_one_over_l(looks):
    s = np.concatenate(
        [gamma_speckle(block_rng(0, 99, 0, i), (256, 256), looks).ravel() for i in range(4)]
    )
    assert s.dtype == np.float32 and s.min() > 0 and np.isfinite(s).all()
    assert abs(s.mean() - 1) < 0.01
    assert abs(s.var() * looks - 1) < 0.03
    assert stats.kstest(s, stats.gamma(a=looks, scale=1 / looks).cdf).pvalue > 1e-3


def test_speckle_in_the_slide_is_multiplicative(slide):
    # Without speckle R is the clean image; with L looks, R / R_clean is gamma(L, 1/L).
    y0, x0, h, w = 0, 0, *SIZE
    clean, _ = synth_region(SIZE, y0, x0, h, w, seed=7, looks=None)
    assert np.array_equal(clean, np.clip(slide["r_clean"], 0, 1))
    sel = (clean > 0.05) & (clean < 0.3)  # no clipping at 1 (S < 3.3 here)
    ratio = slide["r"][sel] / clean[sel]
    assert sel.sum() > 100_000
    assert abs(ratio.mean() - 1) < 0.01
    assert abs(ratio.var() * 5 - 1) < 0.05


def test_upsample_is_exact_at_nodes_and_linear_between():
    nodes = np.arange(30, dtype=np.float32).reshape(5, 6) ** 1.5
    out = upsample(nodes, 4, 2, 3, 8, 12, 17, 21)  # pixel (8, 12) is node (2, 3) = nodes[0, 0]
    assert out[0, 0] == nodes[0, 0] and out[4, 8] == nodes[1, 2] and out[16, 20] == nodes[4, 5]
    assert np.isclose(out[2, 0], (nodes[0, 0] + nodes[1, 0]) / 2)
    with pytest.raises(IndexError):
        upsample(nodes, 4, 2, 3, 8, 12, 18, 21)


def test_written_mosaic_is_tiled_pyramidal_and_exact(tmp_path):
    out = write_synthetic_mosaic(tmp_path / "m", size=(1100, 1300), seed=5, tile=256)
    r, f = synth_mosaic_arrays((1100, 1300), seed=5, dtype="uint8")
    for det, ref in (("DET#1", r), ("DET#2", f)):
        with tifffile.TiffFile(out / det / "highres_raw.tif") as tif:
            page = tif.pages[0]
            assert page.is_tiled and page.tilewidth == 256 and page.dtype == np.uint8
            levels = tif.series[0].levels
            assert [lv.shape for lv in levels] == [
                (1100, 1300),
                (550, 650),
                (275, 325),
                (137, 162),
            ]
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            for k, p in enumerate(tif.pages):
                assert p.is_tiled and p.get_resolution() == pytest.approx(
                    (1e4 / PIXEL_SIZE_UM / 2**k,) * 2, rel=1e-6
                )
            assert np.array_equal(levels[0].asarray(), ref)
            # Each level is the rounded 2x2 mean of the one above.
            q = ref[:1100, :1300].astype(np.uint32).reshape(550, 2, 650, 2).sum((1, 3))
            assert np.array_equal(levels[1].asarray(), ((q + 2) >> 2).astype(np.uint8))
    meta = json.loads((out / "mosaic.json").read_text())
    assert meta["seed"] == 5 and meta["size"] == [1100, 1300] and meta["looks"] == 5
    assert meta["pixel_size_um"] == PIXEL_SIZE_UM and meta["synth_version"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_uint16_and_float32_mosaics(tmp_path):
    r16, f16 = synth_mosaic_arrays((300, 520), seed=1, dtype="uint16")
    out = write_synthetic_mosaic(tmp_path / "u16", size=(300, 520), seed=1, dtype="uint16")
    assert np.array_equal(tifffile.imread(out / "DET#1" / "highres_raw.tif"), r16)
    out = write_synthetic_mosaic(tmp_path / "f32", size=(300, 520), seed=1, dtype="float32")
    got = tifffile.imread(out / "DET#2" / "highres_raw.tif")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, f16 / 65535.0, atol=1e-7)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "m"
    out.mkdir()  # an empty folder is fine
    write_synthetic_mosaic(out, size=(200, 300), seed=1)
    first = (out / "DET#1" / "highres_raw.tif").read_bytes()
    with pytest.raises(MosaicError, match="not empty") as info:
        write_synthetic_mosaic(out, size=(200, 300), seed=2)
    assert info.value.path == out
    assert (out / "DET#1" / "highres_raw.tif").read_bytes() == first
    write_synthetic_mosaic(out, size=(200, 300), seed=2, overwrite=True)
    assert (out / "DET#1" / "highres_raw.tif").read_bytes() != first
    assert json.loads((out / "mosaic.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(MosaicError, match="is a file"):
        write_synthetic_mosaic(afile, size=(200, 300))


def test_interrupted_write_leaves_nothing(tmp_path):
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done == 2:
            raise KeyboardInterrupt  # like Ctrl-C in the CLI

    with pytest.raises(KeyboardInterrupt):
        write_synthetic_mosaic(tmp_path / "m", size=(1500, 700), seed=1, progress=progress)
    assert calls == [(1, 6), (2, 6)]
    assert list(tmp_path.iterdir()) == []


def test_progress_reaches_total(tmp_path):
    calls = []
    write_synthetic_mosaic(
        tmp_path / "m", size=(600, 300), progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_the_slide(tmp_path):
    """Write a small and an 8x taller slide in fresh processes; compare their peak RSS.

    Held whole, the tall slide would need >= 32 MB more as uint8 (134 MB as float32); the
    streaming writer only holds strips of 256 rows.
    """
    script = textwrap.dedent(
        """
        import sys
        from napari_confocal_stain.io.synthetic import write_synthetic_mosaic
        h, w = int(sys.argv[1]), int(sys.argv[2])
        write_synthetic_mosaic(sys.argv[3], size=(h, w), seed=1)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(int(status["VmHWM"].split()[0]))
        """
    )
    peaks = []
    for h in (2048, 16384):
        res = subprocess.run(
            [sys.executable, "-c", script, str(h), "1024", str(tmp_path / f"m{h}")],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        peaks.append(int(res.stdout.split()[-1]) / 1024)  # MB
    assert peaks[1] - peaks[0] < 24, peaks
    assert peaks[1] < 400, peaks
