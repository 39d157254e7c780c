"""open_mosaic / find_mosaics on real files written with pyvips, tifffile and zarr."""

from __future__ import annotations

import json
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
from _tiff_factories import (
    image,
    rchar,
    tree_snapshot,
    write_omezarr,
    write_pyvips,
    write_tiff,
    write_tiff_pyramid,
    write_vivascope,
)

from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io.mosaic import ConfocalMosaic
from napari_confocal_stain.io.pyramid import TARGET_CHUNK
from napari_confocal_stain.io.readers import find_mosaics, open_mosaic
from napari_confocal_stain.io.tiff import open_tiff


def _norm(x: np.ndarray, stats: dict) -> np.ndarray:
    lo, hi = stats["low"], stats["high"]
    return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1)


def _assert_mosaic_equals(m: ConfocalMosaic, r: np.ndarray, f: np.ndarray) -> None:
    """Level 0 equals the raw data under the mosaic's own (recorded) normalisation."""
    stats = m.metadata["norm_stats"]
    rr, ff = dask.compute(m.r[0], m.f[0])
    assert rr.dtype == ff.dtype == np.float32
    np.testing.assert_allclose(rr, _norm(r, stats["r"]), atol=2e-6)
    np.testing.assert_allclose(ff, _norm(f, stats["f"]), atol=2e-6)


def _mean2(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    return x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


# ----------------------------------------------------------------------------- inputs
def test_vivascope_folder_pyvips_pyramid(tmp_path):
    r, f = image((1500, 2100), np.uint8, 1), image((1500, 2100), np.uint8, 2)
    folder = write_vivascope(
        tmp_path / "slide_A", r, f, pyramid=True, compression="deflate", pixel_size_um=0.5
    )
    m = open_mosaic(folder)
    assert m.layout == "vivascope" and m.name == "slide_A" and m.source == str(folder)
    assert m.files == {
        "r": str(folder / "DET#1" / "highres_raw.tif"),
        "f": str(folder / "DET#2" / "highres_raw.tif"),
    }
    assert m.shape == (1500, 2100) and m.dtype == "uint8" and m.normalization == "percentile"
    assert m.pixel_size_um == pytest.approx(0.5)
    # File levels 2100 -> 1050 -> 525 (pyvips): cut at the first side <= 1024.
    assert m.level_shapes == [(1500, 2100), (750, 1050), (375, 525)]
    assert m.downsample == [1.0, 2.0, 4.0]
    assert m.metadata["levels_from_file"] is True and m.metadata["n_built_levels"] == 0
    _assert_mosaic_equals(m, r, f)
    # Stored levels are the file's own (pyvips 2x2 means), normalised the same way.
    lv1 = tifffile.imread(folder / "DET#1" / "highres_raw.tif", level=1)
    np.testing.assert_allclose(
        m.r[1].compute(), _norm(lv1, m.metadata["norm_stats"]["r"]), atol=2e-6
    )


def test_a_detector_file_opens_its_mosaic(tmp_path):
    r = image((300, 400), np.uint8, 1)
    folder = write_vivascope(tmp_path / "m", r, r)
    m = open_mosaic(folder / "DET#2" / "highres_raw.tif")
    assert m.layout == "vivascope" and m.name == "m"


def test_folder_with_one_mosaic_and_with_several(tmp_path):
    r = image((200, 300), np.uint8, 1)
    one = tmp_path / "one"
    write_vivascope(one / "patient1" / "mosaic_b", r, r)
    m = open_mosaic(one)
    assert m.name == "mosaic_b" and m.layout == "vivascope"

    many = tmp_path / "many"
    a = write_vivascope(many / "p2" / "mosaic_z", r, r)
    b = write_vivascope(many / "p1" / "mosaic_y", r, r)
    c = write_vivascope(many / "mosaic_x", r, r)
    assert find_mosaics(many) == sorted([a, b, c])
    with pytest.raises(MosaicError, match="3 Vivascope mosaics") as err:
        open_mosaic(many)
    for p in (a, b, c):
        assert str(p) in str(err.value)
    # Each listed mosaic opens on its own.
    assert [open_mosaic(p).name for p in find_mosaics(many)] == [c.name, b.name, a.name]


def test_find_mosaics_lists_incomplete_ones_and_skips_zarr(tmp_path):
    r = image((64, 64), np.uint8)
    write_pyvips(tmp_path / "half" / "DET#1" / "highres_raw.tif", r)
    write_omezarr(tmp_path / "img.zarr", np.stack([r, r]), n_levels=1)
    assert find_mosaics(tmp_path) == [tmp_path / "half"]
    with pytest.raises(MosaicError, match="does not exist"):
        find_mosaics(tmp_path / "nope")
    with pytest.raises(MosaicError, match="not a folder"):
        find_mosaics(tmp_path / "half" / "DET#1" / "highres_raw.tif")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_explicit_pair_tiled_and_stripped(tmp_path, dtype):
    r, f = image((700, 900), dtype, 1), image((700, 900), dtype, 2)
    rp = write_tiff(tmp_path / "a.tif", r, tile=(256, 256), compression="zlib")
    fp = write_tiff(tmp_path / "b.tif", f, rowsperstrip=64)  # uncompressed strips
    m = open_mosaic(rp, f_path=fp, normalization="independent")
    assert m.layout == "tiff-pair" and m.dtype == dtype and m.name == "a"
    assert m.files == {"r": str(rp), "f": str(fp)}
    assert m.metadata["r"]["storage"] == "tiled"
    assert m.metadata["f"]["storage"] == "contiguous"
    assert m.metadata["norm_stats"]["r"] == {"low": float(r.min()), "high": float(r.max())}
    _assert_mosaic_equals(m, r, f)
    assert m.pixel_size_um == 0.75  # tifffile writes no physical resolution


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_folder_with_one_named_pair(tmp_path, suffix):
    r, f = image((300, 500), np.uint16, 1), image((300, 500), np.uint16, 2)
    write_tiff(tmp_path / f"case7_R{suffix}", r, compression="lzw")
    write_tiff(tmp_path / f"case7_F{suffix}", f, compression="lzw")
    m = open_mosaic(tmp_path)
    assert m.layout == "tiff-pair" and m.name == "case7"
    assert m.files["r"].endswith(f"case7_R{suffix}") and m.files["f"].endswith(f"case7_F{suffix}")
    _assert_mosaic_equals(m, r, f)
    # Either file alone finds its partner.
    for half in ("R", "F"):
        m2 = open_mosaic(tmp_path / f"case7_{half}{suffix}")
        assert m2.files == m.files


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("layout", ["CYX-tiled", "YXC-contig", "SYX-planar", "CYX-strips"])
def test_two_channel_tiff_layouts(tmp_path, dtype, layout):
    data = np.stack([image((600, 500), dtype, 1), image((600, 500), dtype, 2)])
    path = tmp_path / "two.tif"
    if layout == "CYX-tiled":
        write_tiff(path, data, tile=(128, 128), compression="zlib")
    elif layout == "YXC-contig":
        write_tiff(path, np.moveaxis(data, 0, -1), photometric="minisblack", planarconfig="contig")
    elif layout == "SYX-planar":
        write_tiff(path, data, photometric="minisblack", planarconfig="separate")
    else:
        write_tiff(path, data, rowsperstrip=32, compression="lzw")
    m = open_mosaic(path, normalization="independent")
    assert m.layout == "multichannel-tiff" and m.dtype == dtype and m.name == "two"
    assert m.files == {"r": str(path), "f": str(path)}
    assert m.metadata["channel_order_source"].startswith("default")
    _assert_mosaic_equals(m, data[0], data[1])


def test_pyvips_two_band_tiff(tmp_path):
    data = np.stack([image((400, 520), np.uint8, 1), image((400, 520), np.uint8, 2)], axis=-1)
    path = write_pyvips(tmp_path / "bands.tif", data, compression="deflate", pixel_size_um=0.4)
    m = open_mosaic(path)
    assert m.pixel_size_um == pytest.approx(0.4)
    _assert_mosaic_equals(m, data[..., 0], data[..., 1])


@pytest.mark.parametrize("names", [["Reflectance", "Fluorescence"], ["FCM 488", "RCM 785"]])
def test_ome_tiff_channel_names_give_the_order(tmp_path, names):
    a, b = image((500, 400), np.uint16, 1), image((500, 400), np.uint16, 2)
    path = tmp_path / "x.ome.tif"
    write_tiff(
        path,
        np.stack([a, b]),
        tile=(256, 256),
        metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": 0.6},
    )
    m = open_mosaic(path, normalization="independent")
    assert m.name == "x" and m.metadata["channel_names"] == names
    assert m.metadata["channel_order_source"].startswith("channel names")
    assert m.pixel_size_um == pytest.approx(0.6)
    r, f = (a, b) if names[0].startswith("Refl") else (b, a)
    _assert_mosaic_equals(m, r, f)


def test_channels_argument(tmp_path):
    a, b, c = (image((200, 300), np.uint8, s) for s in (1, 2, 3))
    two = write_tiff(tmp_path / "two.tif", np.stack([a, b]))
    for channels in (("F", "R"), (1, 0), {"r": 1, "f": 0}, ["fluorescence", "reflectance"]):
        m = open_mosaic(two, channels=channels, normalization="independent")
        assert m.metadata["channel_indices"] == {"r": 1, "f": 0}
        assert m.metadata["channel_order_source"] == "argument"
        _assert_mosaic_equals(m, b, a)
    three = write_tiff(tmp_path / "three.tif", np.stack([a, b, c]))
    m = open_mosaic(three, channels=("R", None, "F"), normalization="independent")
    _assert_mosaic_equals(m, a, c)
    m = open_mosaic(three, channels={"r": 2, "f": 1}, normalization="independent")
    _assert_mosaic_equals(m, c, b)
    named = tmp_path / "named.ome.tif"
    write_tiff(
        named,
        np.stack([a, b, c]),
        metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "A", "B"]}},
    )
    m = open_mosaic(named, channels={"r": "B", "f": "DAPI"}, normalization="independent")
    _assert_mosaic_equals(m, c, a)
    with pytest.raises(MosaicError, match="no single channel named"):
        open_mosaic(named, channels={"r": "Q", "f": "DAPI"})
    with pytest.raises(ValueError, match="exactly one channel 'R' and one 'F'"):
        open_mosaic(two, channels=("R", "R"))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("labels", [["R", "F"], ["fluorescence", "reflectance"]])
def test_ome_zarr(tmp_path, version, labels):
    a, b = image((900, 1300), np.uint16, 1), image((900, 1300), np.uint16, 2)
    path = write_omezarr(
        tmp_path / "img.ome.zarr",
        np.stack([a, b]),
        version=version,
        labels=labels,
        pixel_size_um=0.3,
    )
    m = open_mosaic(path, normalization="independent")
    assert m.layout == "ome-zarr" and m.name == "img" and m.dtype == "uint16"
    assert m.pixel_size_um == pytest.approx(0.3)
    assert m.metadata["ngff_version"] == version
    assert m.level_shapes == [(900, 1300), (450, 650)]
    assert m.metadata["levels_from_file"] is True
    r, f = (a, b) if labels[0] == "R" else (b, a)
    _assert_mosaic_equals(m, r, f)


def test_ome_zarr_pixel_size_units_and_default(tmp_path):
    data = np.stack([image((100, 120), np.uint8, 1), image((100, 120), np.uint8, 2)])
    nm = write_omezarr(
        tmp_path / "nm.zarr", data, pixel_size_um=700.0, unit="nanometer", n_levels=1
    )
    assert open_mosaic(nm).pixel_size_um == pytest.approx(0.7)
    none = write_omezarr(tmp_path / "none.zarr", data, pixel_size_um=None, unit=None, n_levels=1)
    m = open_mosaic(none)
    assert m.pixel_size_um == 0.75 and m.metadata["pixel_size_source"].startswith("default")
    assert open_mosaic(none, pixel_size_um=0.2).pixel_size_um == 0.2


def test_pixel_size_from_each_tiff_metadata_kind(tmp_path):
    a = image((64, 80), np.uint8)
    two = np.stack([a, a])
    cm = write_tiff(
        tmp_path / "cm.tif", two, resolution=(1e4 / 0.6, 1e4 / 0.6), resolutionunit="CENTIMETER"
    )
    inch = write_tiff(
        tmp_path / "in.tif", two, resolution=(25400 / 0.9, 25400 / 0.9), resolutionunit="INCH"
    )
    ij = write_tiff(
        tmp_path / "ij.tif",
        two,
        imagej=True,
        resolution=(2.5, 2.5),
        metadata={"axes": "CYX", "unit": "um"},
    )
    ome = write_tiff(
        tmp_path / "o.ome.tif",
        two,
        metadata={"axes": "CYX", "PhysicalSizeX": 450, "PhysicalSizeXUnit": "nm"},
    )
    pv = write_pyvips(tmp_path / "pv.tif", np.moveaxis(two, 0, -1), pixel_size_um=0.35)
    dpi = write_tiff(tmp_path / "dpi.tif", two, resolution=(72, 72), resolutionunit="INCH")
    pv_default = write_pyvips(tmp_path / "pvd.tif", np.moveaxis(two, 0, -1))
    expected = {cm: 0.6, inch: 0.9, ij: 0.4, ome: 0.45, pv: 0.35, dpi: 0.75, pv_default: 0.75}
    for path, um in expected.items():
        m = open_mosaic(path)
        assert m.pixel_size_um == pytest.approx(um, rel=1e-5), path.name
    assert open_mosaic(cm, pixel_size_um=1.5).pixel_size_um == 1.5
    assert open_mosaic(cm, pixel_size_um=1.5).metadata["pixel_size_source"] == "argument"


def test_pyvips_subifd_and_tifffile_subifd_pyramids(tmp_path):
    a = image((2048, 1536), np.uint8, 4)
    sub = write_pyvips(tmp_path / "sub.tif", np.stack([a, a], -1), pyramid=True, subifd=True)
    m = open_mosaic(sub)
    assert m.level_shapes == [(2048, 1536), (1024, 768)] and m.metadata["levels_from_file"]
    b = image((1200, 3000), np.uint16, 5)
    levels = [np.stack([b, b]), np.stack([_mean2(b), _mean2(b)]).astype(np.uint16)]
    ome = write_tiff_pyramid(tmp_path / "p.ome.tif", levels, metadata={"axes": "CYX"})
    m = open_mosaic(ome)
    # The file stops at 600x1500 (> 1024 px): one more level is built lazily below it.
    assert m.level_shapes == [(1200, 3000), (600, 1500), (300, 750)]
    assert m.metadata["n_file_levels"] == 2 and m.metadata["n_built_levels"] == 1
    np.testing.assert_allclose(m.r[2].compute(), _mean2(m.r[1].compute()), atol=1e-6)


def test_single_level_file_gets_lazily_built_levels(tmp_path):
    r, f = image((2048, 2000), np.uint8, 1), image((2048, 2000), np.uint8, 2)
    rp = write_tiff(tmp_path / "s_R.tif", r)
    write_tiff(tmp_path / "s_F.tif", f)
    m = open_mosaic(rp)
    assert m.level_shapes == [(2048, 2000), (1024, 1000)]
    assert m.metadata["levels_from_file"] is False and m.metadata["n_built_levels"] == 1
    # The statistics came from sampled blocks, not from a pass over level 0.
    assert "sampled" in m.metadata["norm_stats"]["source"]
    lv0 = m.r[0].compute()
    np.testing.assert_allclose(m.r[1].compute(), _mean2(lv0), atol=1e-6)
    # A tall thin image keeps halving until its larger side is <= 1024.
    t = write_tiff(tmp_path / "tall.tif", np.stack([image((4000, 60), np.uint8)] * 2))
    assert [s[0] for s in open_mosaic(t).level_shapes] == [4000, 2000, 1000]


def test_info_is_json_and_complete(tmp_path):
    r = image((1300, 1100), np.uint8, 1)
    folder = write_vivascope(tmp_path / "mm", r, r, pyramid=True, pixel_size_um=0.75)
    info = open_mosaic(folder).info()
    text = json.dumps(info)
    back = json.loads(text)
    for key in (
        "shape",
        "levels",
        "level_shapes",
        "pixel_size_um",
        "dtype",
        "layout",
        "files",
        "chunks",
        "normalization",
        "name",
    ):
        assert key in back
    assert back["shape"] == [1300, 1100] and back["layout"] == "vivascope"
    assert back["level_shapes"] == [[1300, 1100], [650, 550]]
    assert back["metadata"]["norm_stats"]["mode"] == "percentile"


@pytest.mark.parametrize("mode", ["percentile", "independent", "global", "average", "dtype"])
def test_normalization_modes_through_the_reader(tmp_path, mode):
    r, f = image((300, 400), np.uint16, 1), (image((300, 400), np.uint16, 2) // 3)
    path = write_tiff(tmp_path / "t.tif", np.stack([r, f]))
    m = open_mosaic(path, normalization=mode)
    st = m.metadata["norm_stats"]
    assert m.normalization == st["mode"] == mode
    if mode == "global":
        assert st["r"]["low"] == st["f"]["low"] == min(r.min(), f.min())
        assert st["r"]["high"] == st["f"]["high"] == max(r.max(), f.max())
    elif mode == "dtype":
        assert st["r"] == {"low": 0.0, "high": 65535.0}
    elif mode == "percentile":
        assert st["r"]["low"] == pytest.approx(np.percentile(r, 0.5))
    _assert_mosaic_equals(m, r, f)


# ---------------------------------------------------------------------------- laziness
def test_dask_chunks_follow_tiles_and_graphs_stay_small(tmp_path):
    a = image((2048, 2048), np.uint8)
    tiled = write_pyvips(tmp_path / "t.tif", np.stack([a, a], -1), tile_size=128)
    m = open_mosaic(tiled)
    assert m.r[0].chunksize == (TARGET_CHUNK, TARGET_CHUNK)
    assert all(c % 128 == 0 for c in m.r[0].chunks[0][:-1])
    strips = write_tiff(tmp_path / "s.tif", np.stack([a, a]), rowsperstrip=48, compression="zlib")
    m = open_mosaic(strips)
    assert all(c % 48 == 0 for c in m.r[0].chunks[0][:-1])
    assert m.r[0].chunks[1] == (2048,)  # full-width strips: no point splitting columns
    # Slicing one region builds a graph of a few tasks, not one per chunk.
    region = m.r[0][:1024, :1024]
    assert len(dict(region.__dask_graph__())) < 12


def _region_bytes(fn):
    before = rchar()
    out = fn()
    return rchar() - before, out


@pytest.mark.parametrize("kind", ["tiled-pyramid", "contiguous-single-level"])
def test_open_reads_headers_and_a_coarse_level_only(tmp_path, kind):
    r, f = image((2048, 2048), np.uint8, 1), image((2048, 2048), np.uint8, 2)
    if kind == "tiled-pyramid":
        folder = write_vivascope(tmp_path / "m", r, f, pyramid=True)
    else:
        folder = tmp_path / "m"
        write_tiff(folder / "DET#1" / "highres_raw.tif", r)
        write_tiff(folder / "DET#2" / "highres_raw.tif", f)
    level0_bytes = 2 * r.nbytes
    open_mosaic(folder)  # warm up imports and codecs
    nbytes, m = _region_bytes(lambda: open_mosaic(folder))
    # Headers plus the 512x512 stats level (pyramid) or 64 sampled 256x256 blocks at
    # most: a small fraction of the 8 MiB of level-0 pixels.
    assert nbytes < 0.2 * level0_bytes, nbytes
    # A chunk-aligned 1024² region at level 0 reads its own pixels and little more.
    nbytes, (rr, ff) = _region_bytes(
        lambda: dask.compute(m.r[0][1024:2048, 0:1024], m.f[0][1024:2048, 0:1024])
    )
    assert 2 * 1024 * 1024 <= nbytes < 1.15 * 2 * 1024 * 1024, nbytes
    stats = m.metadata["norm_stats"]
    np.testing.assert_allclose(rr, _norm(r[1024:, :1024], stats["r"]), atol=2e-6)
    np.testing.assert_allclose(ff, _norm(f[1024:, :1024], stats["f"]), atol=2e-6)


def test_region_of_a_tiff_plane_reads_only_its_tiles(tmp_path):
    a = image((2048, 2048), np.uint16, 3)
    path = write_tiff(tmp_path / "t.tif", a, tile=(256, 256))
    plane = open_tiff(path).levels[0][0]
    before = plane.bytes_read
    nbytes, block = _region_bytes(lambda: plane[300:700, 200:500])  # 2x2 tiles of 256²
    assert plane.bytes_read - before == 4 * 256 * 256 * 2
    assert nbytes < 4 * 256 * 256 * 2 + 4096
    np.testing.assert_array_equal(block, a[300:700, 200:500])


def test_compressed_strips_cost_whole_strips_only_under_the_region(tmp_path):
    a = image((2000, 1500), np.uint8, 3)
    path = write_tiff(tmp_path / "s.tif", a, rowsperstrip=100, compression="zlib")
    plane = open_tiff(path).levels[0][0]
    assert plane.kind == "strips"
    with tifffile.TiffFile(path) as tif:
        counts = tif.pages[0].databytecounts
    before = plane.bytes_read
    block = plane[250:420, 600:700]  # strips 2, 3, 4
    assert plane.bytes_read - before == sum(counts[2:5])
    np.testing.assert_array_equal(block, a[250:420, 600:700])


def test_ome_zarr_region_reads_only_its_chunks(tmp_path):
    data = np.stack([image((2048, 2048), np.uint8, 1), image((2048, 2048), np.uint8, 2)])
    path = write_omezarr(tmp_path / "z.zarr", data, version="0.5", n_levels=3)
    open_mosaic(path)
    nbytes, m = _region_bytes(lambda: open_mosaic(path))
    assert nbytes < 0.2 * data.nbytes  # metadata + the 512² level of both channels
    nbytes, out = _region_bytes(lambda: m.r[0][0:1024, 1024:2048].compute())
    # 16 chunks of 256² (zarr's default compression makes them smaller still).
    assert nbytes < 1.1 * 1024 * 1024, nbytes
    np.testing.assert_allclose(
        out, _norm(data[0, :1024, 1024:], m.metadata["norm_stats"]["r"]), atol=2e-6
    )


def test_built_level_region_reads_only_the_region_above(tmp_path):
    a = image((2048, 2048), np.uint8, 5)
    path = write_tiff(tmp_path / "one.tif", np.stack([a, a]), tile=(256, 256))
    m = open_mosaic(path)
    assert m.metadata["n_built_levels"] == 1
    plane_bytes = 2048 * 2048
    nbytes, _ = _region_bytes(lambda: m.r[1][0:256, 0:256].compute())
    # One 1024² chunk of level 0 (a quarter of the channel), not the whole level.
    assert nbytes < 0.3 * plane_bytes, nbytes


def test_dask_graphs_pickle(tmp_path):
    a = image((600, 700), np.uint16, 1)
    path = write_tiff(
        tmp_path / "p.tif", np.stack([a, a[::-1]]), tile=(128, 128), compression="zlib"
    )
    m = open_mosaic(path)
    expected = m.f[0].compute()
    again = pickle.loads(pickle.dumps(m.f[0]))
    np.testing.assert_array_equal(again.compute(), expected)


def test_nothing_is_written(tmp_path):
    r = image((1100, 900), np.uint8, 1)
    folder = write_vivascope(tmp_path / "w", r, r, pyramid=True)
    write_tiff(tmp_path / "w_bad.tif", r)  # an extra file nearby, untouched too
    before = tree_snapshot(tmp_path)
    m = open_mosaic(folder)
    dask.compute(m.r[0], m.f[-1])
    with pytest.raises(MosaicError):
        open_mosaic(tmp_path / "w_bad.tif")  # one channel: an error, nothing created
    assert tree_snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- bad input
def test_missing_det2_and_det1(tmp_path):
    r = image((100, 100), np.uint8)
    write_pyvips(tmp_path / "a" / "DET#1" / "highres_raw.tif", r)
    with pytest.raises(MosaicError, match="DET#2") as err:
        open_mosaic(tmp_path / "a")
    assert "F" in str(err.value)
    write_pyvips(tmp_path / "b" / "DET#2" / "highres_raw.tif", r)
    with pytest.raises(MosaicError, match="DET#1"):
        open_mosaic(tmp_path / "b")
    (tmp_path / "c" / "DET#1").mkdir(parents=True)
    write_pyvips(tmp_path / "c" / "DET#2" / "highres_raw.tif", r)
    with pytest.raises(MosaicError, match=r"highres_raw\.tif") as err:
        open_mosaic(tmp_path / "c")
    assert err.value.path == tmp_path / "c" / "DET#1" / "highres_raw.tif"


def test_r_and_f_of_different_sizes(tmp_path):
    rp = write_tiff(tmp_path / "x_R.tif", image((300, 400), np.uint8))
    fp = write_tiff(tmp_path / "x_F.tif", image((300, 401), np.uint8))
    with pytest.raises(MosaicError, match="differ in size") as err:
        open_mosaic(rp, f_path=fp)
    msg = str(err.value)
    assert "300x400" in msg and "300x401" in msg and str(rp) in msg and str(fp) in msg


def test_truncated_tiffs(tmp_path):
    a = image((512, 512), np.uint8)
    for name, kw in (("tiled.tif", {"tile": (128, 128)}), ("strip.tif", {})):
        path = write_tiff(tmp_path / name, np.stack([a, a]), **kw)
        data = path.read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(MosaicError, match="truncated") as err:
            open_mosaic(cut)
        assert err.value.path == cut
    head = tmp_path / "head.tif"
    head.write_bytes((tmp_path / "tiled.tif").read_bytes()[:6])
    with pytest.raises(MosaicError) as err:
        open_mosaic(head)
    assert err.value.path == head


def test_non_tiff_files(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(MosaicError, match="not a TIFF") as err:
        open_mosaic(png)
    assert err.value.path == png
    txt = tmp_path / "notes_R.tif"
    txt.write_text("hello")
    with pytest.raises(MosaicError, match="not a TIFF"):
        open_mosaic(txt, f_path=png)


def test_three_channels_where_two_are_expected(tmp_path):
    rgb = np.stack([image((100, 120), np.uint8, s) for s in (1, 2, 3)], -1)
    path = write_pyvips(tmp_path / "rgb.tif", rgb)
    with pytest.raises(MosaicError, match="3 channels where 2") as err:
        open_mosaic(path)
    assert err.value.path == path
    with pytest.raises(MosaicError, match="3 channels"):
        open_mosaic(
            write_tiff(tmp_path / "c3.tif", np.moveaxis(rgb, -1, 0), photometric="minisblack")
        )


def test_empty_folder_and_folder_without_slides(tmp_path):
    with pytest.raises(MosaicError, match="is empty") as err:
        open_mosaic(tmp_path)
    assert err.value.path == tmp_path
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(MosaicError, match="holds no slide"):
        open_mosaic(tmp_path)


def test_folder_with_several_pairs_or_images(tmp_path):
    a = image((50, 60), np.uint8)
    for stem in ("s1", "s2"):
        write_tiff(tmp_path / f"{stem}_R.tif", a)
        write_tiff(tmp_path / f"{stem}_F.tif", a)
    with pytest.raises(MosaicError, match="2 R/F TIFF pairs") as err:
        open_mosaic(tmp_path)
    assert "s1_R.tif" in str(err.value) and "s2_F.tif" in str(err.value)
    other = tmp_path / "other"
    write_tiff(other / "a.tif", np.stack([a, a]))
    write_tiff(other / "b.tif", np.stack([a, a]))
    with pytest.raises(MosaicError, match="2 images"):
        open_mosaic(other)
    lone = tmp_path / "lone"
    write_tiff(lone / "q_R.tif", a)
    write_tiff(lone / "zz_R.tif", a)
    with pytest.raises(MosaicError, match="no partner"):
        open_mosaic(lone)


def test_single_channel_file_without_partner(tmp_path):
    path = write_tiff(tmp_path / "one.tif", image((50, 60), np.uint8))
    with pytest.raises(MosaicError, match=r"one channel.*f_path"):
        open_mosaic(path)
    with pytest.raises(MosaicError, match="does not exist"):
        open_mosaic(tmp_path / "missing.tif")
    with pytest.raises(MosaicError, match="does not exist"):
        open_mosaic(path, f_path=tmp_path / "missing_F.tif")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_float_data(tmp_path, bad):
    a = image((300, 300), np.float32)
    b = a.copy()
    b[10, 20] = bad
    path = write_tiff(tmp_path / "nan.tif", np.stack([a, b]))
    with pytest.raises(MosaicError, match=r"NaN|infinite") as err:
        open_mosaic(path)
    assert err.value.path == path and "F" in str(err.value)


def test_nan_missed_by_the_statistics_is_an_error_where_it_is_read(tmp_path):
    # The stats level (the stored 512² one) is clean; level 0 holds NaN and +/-inf.
    a = image((2048, 1024), np.float32, 1)
    coarse = [_mean2(a), _mean2(_mean2(a))]
    a[5, 5], a[6, 6], a[7, 7] = np.nan, np.inf, -np.inf
    levels = [np.stack([a, a]), *(np.stack([c, c]).astype(np.float32) for c in coarse)]
    path = write_tiff_pyramid(tmp_path / "f.tif", levels, metadata={"axes": "CYX"})
    m = open_mosaic(path, normalization="dtype")
    assert np.isfinite(m.r[0][1024:1100, :64].compute()).all()  # another chunk is clean
    with pytest.raises(MosaicError, match=r"NaN or infinite.*level 0 \(R\), rows 5:8, cols 5:8"):
        m.r[0][:16, :16].compute()


def test_unsupported_dtypes(tmp_path):
    c = (image((40, 50), np.float32) + 1j).astype(np.complex64)
    path = write_tiff(tmp_path / "c.tif", np.stack([c, c]))
    with pytest.raises(MosaicError, match="complex"):
        open_mosaic(path)
    neg = np.stack([np.arange(2000, dtype=np.int64).reshape(40, 50) - 5] * 2)
    path = write_tiff(tmp_path / "i.tif", neg)
    with pytest.raises(MosaicError, match="negative values"):
        open_mosaic(path)
    # Signed integers without negative values are fine.
    m = open_mosaic(write_tiff(tmp_path / "ok.tif", neg + 5), normalization="independent")
    _assert_mosaic_equals(m, neg[0] + 5, neg[1] + 5)


def test_constant_images(tmp_path):
    zero = np.zeros((200, 300), np.uint16)
    flat = np.full((200, 300), 900, np.uint16)
    path = write_tiff(tmp_path / "const.tif", np.stack([flat, zero]))
    for mode in ("percentile", "independent", "global", "average"):
        m = open_mosaic(path, normalization=mode)
        r, f = dask.compute(m.r[0], m.f[0])
        assert np.isfinite(r).all() and np.isfinite(f).all()
        assert (f == 0).all()
    m = open_mosaic(path, normalization="independent")
    assert m.metadata["norm_stats"]["constant"] == {"r": True, "f": True}
    np.testing.assert_allclose(m.r[0][:2, :2].compute(), 900 / 65535, rtol=1e-6)


def test_stacks_and_volumes_are_refused(tmp_path):
    stack = np.stack([image((40, 50), np.uint8, s) for s in range(6)]).reshape(3, 2, 40, 50)
    path = write_tiff(tmp_path / "zc.ome.tif", stack, metadata={"axes": "ZCYX"})
    with pytest.raises(MosaicError, match="non-spatial dimensions"):
        open_mosaic(path)


def test_bad_arguments(tmp_path):
    path = write_tiff(tmp_path / "t.tif", np.stack([image((40, 50), np.uint8)] * 2))
    with pytest.raises(ValueError, match="unknown normalization"):
        open_mosaic(path, normalization="minmax")
    with pytest.raises(ValueError, match="pixel_size_um"):
        open_mosaic(path, pixel_size_um=-1)
    with pytest.raises(MosaicError, match="is a folder"):
        open_mosaic(tmp_path, f_path=path)


def test_mosaic_object_checks_its_levels():
    a = da.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="must be equal"):
        ConfocalMosaic(
            r=[a],
            f=[da.zeros((4, 5), dtype=np.float32)],
            pixel_size_um=0.75,
            source="x",
            layout="tiff-pair",
            name="x",
            dtype="uint8",
            normalization="dtype",
            files={"r": "x", "f": "x"},
        )
