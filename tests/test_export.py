"""Whole-slide export: formats read back by independent readers, resume after kill -9,
refusals, cancel, the LocalCluster path, the CLI and the napari writer."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_confocal_stain import open_mosaic
from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings, to_uint8
from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.export import ExportCancelled, export_slide, parse_region
from napari_confocal_stain.export.plan import ExportPlan, level_shapes
from napari_confocal_stain.export.store import downsample2
from napari_confocal_stain.export.tasks import TASK_LOG_ENV

# A small, fast GAN configuration: statistics tile 64 (a multiple of the U-Net's size
# multiple), 128-px chunks grown by 32 px, fp32 pinned (no bf16 timing calibration).
GAN = StainSettings(tile=64, precision="fp32")
GAN_REGION = "128:512,256:768"  # 384 x 512: 3 x 4 chunks of 128
GAN_KW = {"settings": GAN, "product": "gan", "region": GAN_REGION, "tile": 128, "context": 32}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def assert_same_stain(got: np.ndarray, ref: np.ndarray) -> None:
    """The same uint8 stain from another process, up to float rounding.

    A fresh process (or a cluster worker) may run the model with another thread count, and
    oneDNN splits a convolution's reductions by thread, so fp32 results differ by a few ulps;
    a value that close to a .5 boundary rounds to the neighbouring uint8 level. Allowed: ±1
    level on at most 1 in 10⁴ values; anything structural (a missing or misplaced piece)
    changes thousands of values by far more.
    """
    assert got.shape == ref.shape and got.dtype == ref.dtype
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert np.count_nonzero(diff) <= max(1, diff.size // 10_000), np.count_nonzero(diff)


def _zarr_level(path: Path, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[str(level)])


@pytest.fixture(scope="module")
def mosaic(synthetic_slide):
    return open_mosaic(synthetic_slide)


@pytest.fixture(scope="module")
def gan_reference(mosaic, tmp_path_factory) -> np.ndarray:
    """The GAN export of GAN_REGION, uninterrupted, on threads."""
    out = tmp_path_factory.mktemp("gan_ref") / "ref.ome.zarr"
    export_slide(mosaic, out, **GAN_KW)
    return _zarr_level(out)


# ------------------------------------------------------------------------------ geometry


def test_parse_region_and_levels():
    assert parse_region(None, (100, 200)) == (0, 100, 0, 200)
    assert parse_region(" 10:20 , 30:50 ", (100, 200)) == (10, 20, 30, 50)
    for bad in ("10:20", "20:10,0:5", "0:101,0:5", "a:b,c:d"):
        with pytest.raises(ValueError):
            parse_region(bad, (100, 200))
    assert level_shapes((3000, 1025)) == [(3000, 1025), (1500, 512), (750, 256), (375, 128)]
    with pytest.raises(ValueError, match="multiple of 64"):
        ExportPlan.make((0, 10, 0, 10), 100)


# ------------------------------------------------------------------------------ formats


def test_linear_ome_zarr_read_back(mosaic, synthetic_slide, tmp_path):
    before = _snapshot(synthetic_slide)
    out = export_slide(mosaic, tmp_path / "lin.ome.zarr", product="linear", tile=256)
    assert _snapshot(synthetic_slide) == before  # the input is never written to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin.ome.zarr"]  # no leftovers

    h, w = mosaic.shape
    expected = to_uint8(StainPipeline(mosaic, StainSettings()).linear(0, (0, h, 0, w)))
    # zarr, directly
    level0 = _zarr_level(out, 0)
    assert level0.shape == (3, h, w)
    np.testing.assert_array_equal(level0.transpose(1, 2, 0), expected)
    np.testing.assert_array_equal(_zarr_level(out, 1), downsample2(level0))
    # NGFF metadata: c, y, x axes in micrometres, scale doubling per level
    attrs = json.loads((out / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales[0] == [1.0, mosaic.pixel_size_um, mosaic.pixel_size_um]
    assert scales[1][2] == pytest.approx(2 * mosaic.pixel_size_um)
    # our own reader
    from napari_confocal_stain.io.omezarr import open_omezarr

    img = open_omezarr(out)
    assert img.axes == "cyx" and img.n_channels == 3
    assert img.pixel_size_um == pytest.approx(mosaic.pixel_size_um)
    assert [lv[0].shape for lv in img.levels] == [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
    np.testing.assert_array_equal(
        img.levels[0][1][100:200, 300:400], expected[100:200, 300:400, 1]
    )
    # ome-zarr-py (what napari-ome-zarr uses) and napari's builtin zarr reader
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    Reader = pytest.importorskip("ome_zarr.reader").Reader
    node = next(iter(Reader(parse_url(str(out)))()))
    assert [tuple(d.shape) for d in node.data][:2] == [(3, h, w), (3, h // 2, w // 2)]
    assert node.metadata["channel_names"] == ["R", "G", "B"]
    np.testing.assert_array_equal(np.asarray(node.data[0][:, :64, :64]), level0[:, :64, :64])
    napari_io = pytest.importorskip("napari_builtins.io")
    data, _ = napari_io.read_zarr_dataset(str(out))
    np.testing.assert_array_equal(np.asarray(data[1]), _zarr_level(out, 1))


def test_linear_ome_tiff_read_back(mosaic, tmp_path):
    out = export_slide(mosaic, tmp_path / "lin.ome.tif", product="linear", tile=256)
    h, w = mosaic.shape
    expected = to_uint8(StainPipeline(mosaic, StainSettings()).linear(0, (0, h, 0, w)))
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert [lv.shape for lv in series.levels] == [(h, w, 3), (h // 2, w // 2, 3),
                                                      (h // 4, w // 4, 3)]  # fmt: skip
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 128 and page.photometric == 2  # RGB
        assert len(page.tags["SubIFDs"].value) == 2
        np.testing.assert_array_equal(series.levels[0].asarray(), expected)
        ome = tf.ome_metadata
        assert f'PhysicalSizeX="{mosaic.pixel_size_um}"' in ome
    pyvips = pytest.importorskip("pyvips")
    top = pyvips.Image.new_from_file(str(out))
    assert (top.width, top.height, top.bands) == (w, h, 3)
    assert top.xres == pytest.approx(1e3 / mosaic.pixel_size_um)  # px per mm
    crop = np.ndarray(
        buffer=top.crop(300, 100, 64, 32).write_to_memory(), dtype=np.uint8, shape=(32, 64, 3)
    )
    np.testing.assert_array_equal(crop, expected[100:132, 300:364])
    sub = pyvips.Image.tiffload(str(out), subifd=0)
    assert (sub.width, sub.height) == (w // 2, h // 2)


def test_despeckled_r_region_and_cli(mosaic, synthetic_slide, tmp_path):
    """Grey despeckled R of a region through the CLI parser; exact (context-read) per chunk."""
    from napari_confocal_stain.cli.export import add_parsers

    parser = argparse.ArgumentParser(prog="confocal-stain")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "r.ome.tif"
    args = parser.parse_args(
        ["stain", str(synthetic_slide), "--out", str(out), "--what", "despeckled-r",
         "--region", "200:328,300:556", "--tile", "128", "--quiet"]
    )  # fmt: skip
    assert args.func(args) == 0
    settings = StainSettings(despeckle="despeckle-combalia")
    expected = to_uint8(StainPipeline(mosaic, settings).reflectance(0, (200, 328, 300, 556)))
    got = tifffile.imread(out)
    assert got.shape == (128, 256)
    np.testing.assert_array_equal(got, expected)
    # an existing output is refused with one clear error, and left alone
    stamp = out.stat().st_mtime_ns
    args = parser.parse_args(["stain", str(synthetic_slide), "--out", str(out), "--quiet"])
    with pytest.raises(MosaicError, match="already exists"):
        args.func(args)
    assert out.stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------ safety


def test_refusals_and_overwrite(mosaic, synthetic_slide, tmp_path):
    out = tmp_path / "x.ome.zarr"
    export_slide(mosaic, out, product="linear", region="0:256,0:256", tile=128)
    first = _zarr_level(out)
    with pytest.raises(MosaicError, match="already exists"):
        export_slide(mosaic, out, product="linear", region="0:256,256:512", tile=128)
    np.testing.assert_array_equal(_zarr_level(out), first)
    export_slide(mosaic, out, product="linear", region="0:256,256:512", tile=128, overwrite=True)
    assert not np.array_equal(_zarr_level(out), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]
    with pytest.raises(MosaicError, match="never written"):
        export_slide(mosaic, synthetic_slide / "stain.ome.zarr", product="linear")
    with pytest.raises(MosaicError, match=r"\.ome\.zarr or \.ome\.tif"):
        export_slide(mosaic, tmp_path / "x.png", product="linear")


def test_product_is_one_of_three_and_the_cli_refuses_contradictions(
    mosaic, synthetic_slide, tmp_path, capsys
):
    """``product`` replaces method × what: an unknown one is refused, and so are CLI flags
    that ask for two products at once; nothing is written either way."""
    from napari_confocal_stain.cli import main

    for bad in ("stain", "GAN", ""):
        with pytest.raises(ValueError, match="product must be one of"):
            export_slide(mosaic, tmp_path / "p.ome.zarr", product=bad)
    for command in (
        ["stain", str(synthetic_slide), "--out", str(tmp_path / "c.ome.tif")],
        ["batch", str(synthetic_slide), "--out-dir", str(tmp_path / "outs")],
    ):
        for method in ("linear", "gan"):
            argv = [*command, "--method", method, "--what", "despeckled-r", "--quiet"]
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "--what despeckled-r" in err[0], err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ resume


def test_resume_after_kill_is_identical(synthetic_slide, gan_reference, tmp_path, monkeypatch):
    """A GAN export killed with SIGKILL mid-run, resumed, equals the uninterrupted one."""
    out = tmp_path / "killed.ome.zarr"
    work = tmp_path / ".killed.ome.zarr.partial"
    script = textwrap.dedent(
        f"""
        import time
        from napari_confocal_stain.engine.pipeline import StainSettings
        from napari_confocal_stain.export import export_slide
        # slow the driver down after each chunk so the kill lands mid-run
        export_slide({str(synthetic_slide)!r}, {str(out)!r},
                     settings=StainSettings(tile=64, precision="fp32"), product="gan",
                     region={GAN_REGION!r}, tile=128, context=32,
                     progress=lambda d, t: time.sleep(0.1))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            pieces = list((work / "pieces").glob("*.npy")) if work.exists() else []
            if len(pieces) >= 3:
                break
            assert proc.poll() is None, "the export finished or failed before it was killed"
            time.sleep(0.02)
        else:
            pytest.fail("the export made no progress in 60 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and (work / "manifest.json").is_file()
    kept = {p.stem for p in (work / "pieces").glob("*.npy")}

    # without --resume the partial export is neither reused nor silently discarded
    mosaic = open_mosaic(synthetic_slide)
    with pytest.raises(MosaicError, match="--resume"):
        export_slide(mosaic, out, **GAN_KW)
    # resuming with different options is refused
    with pytest.raises(MosaicError, match="different request"):
        export_slide(mosaic, out, **{**GAN_KW, "context": 16}, resume=True)
    log = tmp_path / "tasks.log"
    monkeypatch.setenv(TASK_LOG_ENV, str(log))
    export_slide(mosaic, out, **GAN_KW, resume=True)
    redone = {"{}_{}".format(*line.split()[2:]) for line in log.read_text().splitlines()
              if line.startswith("piece")}  # fmt: skip
    assert len(kept) >= 3 and not redone & kept  # finished pieces are never recomputed
    assert len(redone) == 12 - len(kept)
    assert_same_stain(_zarr_level(out), gan_reference)
    assert not work.exists()
    assert not list(out.rglob("*.partial"))  # no temporaries of the killed run left inside


def test_cancel_then_resume(mosaic, gan_reference, tmp_path):
    out = tmp_path / "c.ome.tif"
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 4

    with pytest.raises(ExportCancelled):
        export_slide(mosaic, out, **GAN_KW, cancel=cancel)
    assert not out.exists() and (tmp_path / ".c.ome.tif.partial").is_dir()
    export_slide(mosaic, out, **GAN_KW, resume=True)
    np.testing.assert_array_equal(tifffile.imread(out), gan_reference.transpose(1, 2, 0))


# ------------------------------------------------------------------------------ cluster


@pytest.mark.timeout(120)
def test_local_cluster_matches_threads(mosaic, gan_reference, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "cluster.ome.zarr"
    export_slide(mosaic, out, **GAN_KW, scheduler="local", workers=2)
    assert_same_stain(_zarr_level(out), gan_reference)


# ------------------------------------------------------------------------------ CLI, writer


def test_cli_batch(synthetic_slide, tmp_path, capsys):
    from napari_confocal_stain.cli import main

    argv = ["batch", str(synthetic_slide), "--out-dir", str(tmp_path / "outs"), "--method",
            "linear", "--format", "ome.tif", "--tile", "512", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "outs" / f"{synthetic_slide.name}.ome.tif"
    assert capsys.readouterr().out.strip() == str(out)
    assert tifffile.imread(out).shape == (*open_mosaic(synthetic_slide).shape, 3)
    assert main(argv) == 2  # exists: one line on stderr, nothing replaced
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert main([*argv, "--resume"]) == 0  # a finished output counts as done
    assert "already done" in capsys.readouterr().out


def test_napari_writer(tmp_path):
    from napari_confocal_stain.napari._writer import write_image_layer

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    paths = write_image_layer(
        str(tmp_path / "layer.ome.tif"), rgb, {"rgb": True, "scale": (0.5, 0.5), "name": "s"}
    )
    assert paths == [str(tmp_path / "layer.ome.tif")]
    np.testing.assert_array_equal(tifffile.imread(paths[0]), rgb)
    grey = rng.random((200, 300)).astype(np.float32)
    (path,) = write_image_layer(
        str(tmp_path / "g.ome.zarr"), [grey, grey[::2, ::2]],
        {"rgb": False, "multiscale": True, "scale": (0.75, 0.75), "contrast_limits": (0, 1)},
    )  # fmt: skip
    np.testing.assert_array_equal(_zarr_level(Path(path))[0], to_uint8(grey))
    assert write_image_layer(str(tmp_path / "v.ome.zarr"), np.zeros((2, 3, 4, 5)), {}) == []


def test_napari_writer_through_npe2(tmp_path):
    """The writer contribution as napari calls it: the installed plugin's own manifest."""
    npe2 = pytest.importorskip("npe2")
    layers = pytest.importorskip("napari.layers")
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "napari-confocal-stain" in pm._manifests, "the plugin's manifest is not installed"
    rgb = np.random.default_rng(1).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    layer = layers.Image(rgb, rgb=True, scale=(0.75, 0.75), name="stain")
    (saved,) = layer.save(str(tmp_path / "s.ome.zarr"), plugin="napari-confocal-stain")
    np.testing.assert_array_equal(_zarr_level(Path(saved)).transpose(1, 2, 0), rgb)
    from napari_confocal_stain.io.omezarr import open_omezarr

    assert open_omezarr(saved).pixel_size_um == pytest.approx(0.75)


def test_tissue_free_chunks_are_skipped(tmp_path):
    """All-background chunks: the model is not run, nothing is stored, they read as white."""
    import dask.array as da

    from napari_confocal_stain.io.mosaic import ConfocalMosaic

    r = np.zeros((512, 512), np.float32)
    f = np.zeros((512, 512), np.float32)
    r[300:380, 320:400] = 0.6  # tissue in one 256² chunk only
    f[330:350, 340:360] = 0.8
    lazy = [da.from_array(a, chunks=256) for a in (r, f)]
    mosaic = ConfocalMosaic(
        r=[lazy[0]], f=[lazy[1]], pixel_size_um=0.75, source=str(tmp_path / "in-memory"),
        layout="ome-zarr", name="patch", dtype="float32", normalization="dtype", files={},
    )  # fmt: skip
    out = export_slide(mosaic, tmp_path / "lin.ome.zarr", product="linear", tile=256)
    files = sorted(str(p.relative_to(out / "0")) for p in (out / "0").rglob("*") if p.is_file())
    # 128-px storage chunks: only the two the tissue patch (rows 300-379, columns 320-399)
    # touches were written
    assert [f for f in files if not f.startswith(".")] == ["0/2/2", "0/2/3"]
    level0 = _zarr_level(out)
    assert (level0[:, :256, :] == 255).all() and (level0[:, 400:, :] == 255).all()

    gan = tmp_path / "gan.ome.zarr"
    export_slide(mosaic, gan, settings=GAN, product="gan", region="0:256,0:256", tile=128,
                 context=32)  # fmt: skip
    img = _zarr_level(gan)
    assert (img == img[:, :1, :1]).all()  # one background colour, from the model's response
