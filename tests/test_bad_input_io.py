"""Bad input on the reading side: every kind a user can cause gets one clear error.

Each test takes one class of bad input over several instances, generated in the test, and
checks the three front ends: ``open_mosaic`` (a ``MosaicError`` naming the file),
``confocal-stain info`` (exit status 2, one line on stderr naming the file) and the napari
reader (no exception, no layer, one error notification naming the file). Inputs that
declare a huge size cost little disk and run in a subprocess whose time and peak memory
are measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from _tiff_factories import (
    image,
    write_declared_tiff,
    write_declared_zarr,
    write_omezarr,
    write_pyvips,
    write_tiff,
    write_tiff_pyramid,
    write_vivascope,
)

import napari_confocal_stain
from napari_confocal_stain.cli import main as cli_main
from napari_confocal_stain.engine.linear_view import LinearStainView
from napari_confocal_stain.engine.pipeline import read_normalized
from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io.naming import rf_role
from napari_confocal_stain.io.readers import open_mosaic
from napari_confocal_stain.napari._reader import get_reader

napari = pytest.importorskip("napari")

REPO = Path(napari_confocal_stain.__file__).resolve().parents[1]
NOTHING = [(None,)]  # napari's "read, but nothing to show": no second error from napari
PLUGIN = "napari-confocal-stain"


# ------------------------------------------------------------------------------ helpers
@pytest.fixture
def notifications():
    """The napari notifications (what the user would see) emitted during a test."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture
def refused(capsys, notifications) -> Callable[..., MosaicError]:
    """Check that all three front ends refuse an input with one message naming ``culprit``."""

    def check(
        path: Path, pattern: str, culprit: Path | None = None, f_path: Path | None = None
    ) -> MosaicError:
        culprit = path if culprit is None else culprit
        with pytest.raises(MosaicError) as err:
            open_mosaic(path, f_path=f_path)
        msg = str(err.value)
        assert str(culprit) in msg and re.search(pattern, msg), msg
        assert "\n" not in msg

        capsys.readouterr()
        argv = ["info", str(path)] + (["--f-path", str(f_path)] if f_path else [])
        assert cli_main(argv) == 2
        out, stderr = capsys.readouterr()
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and not out, stderr
        assert str(culprit) in lines[0] and re.search(pattern, lines[0]), lines[0]

        target = [str(path), str(f_path)] if f_path else str(path)
        reader = get_reader(target)
        assert reader is not None, f"napari does not claim {target}"
        notifications.clear()
        assert reader(target) == NOTHING
        errors = [n for n in notifications if str(n.severity) == "error"]
        assert len(errors) == 1, [str(n.message) for n in notifications]
        shown = str(errors[0].message)
        assert str(culprit) in shown and re.search(pattern, shown), shown
        return err.value

    return check


def _pair(folder: Path, r: np.ndarray, f: np.ndarray, stem: str = "s1") -> tuple[Path, Path]:
    return write_tiff(folder / f"{stem}_R.tif", r), write_tiff(folder / f"{stem}_F.tif", f)


def _two(shape=(64, 80), dtype=np.uint8) -> np.ndarray:
    return np.stack([image(shape, dtype, 1), image(shape, dtype, 2)])


def _mean2(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1)).astype(x.dtype)


# ------------------------------------------------------------ bounded work, any size
_PROBE = r"""
import contextlib, io, json, resource, sys, time
import napari.utils.notifications
from napari_confocal_stain.cli import main
from napari_confocal_stain.io.readers import open_mosaic
from napari_confocal_stain.napari import _layers
from napari_confocal_stain.napari._reader import get_reader

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

path = sys.argv[1]
base, out = peak(), {}
t = time.perf_counter()
out["open"] = list(open_mosaic(path).shape)
out["open_s"] = time.perf_counter() - t
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as text:
    status = main(["info", path])
out["info"] = [status, json.loads(text.getvalue())["shape"]]
out["info_s"] = time.perf_counter() - t
t = time.perf_counter()
layers = get_reader(path)(path)
out["napari"] = [list(kw["contrast_limits"]) for _, kw, _ in layers]
out["napari_s"] = time.perf_counter() - t
out["growth"] = peak() - base
print(json.dumps(out))
"""


def _probe(path: Path) -> dict:
    """Open, ``info`` and the napari reader in a fresh process: results, times, memory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _huge_tiff(tmp: Path) -> tuple[Path, tuple[int, int]]:
    return write_declared_tiff(tmp / "huge.tif", (200_000, 200_000), samples=2), (200_000,) * 2


def _huge_tiff_pair(tmp: Path) -> tuple[Path, tuple[int, int]]:
    shape = (120_000, 250_000)
    write_declared_tiff(tmp / "big_F.tif", shape, dtype=np.uint16, tile=(256, 256), fill=7)
    return write_declared_tiff(tmp / "big_R.tif", shape, dtype=np.uint16, tile=(256, 256)), shape


def _huge_zarr_levels(tmp: Path) -> tuple[Path, tuple[int, int]]:
    # Statistics come from level 1 (100000² px), the coarsest with >= 512² px.
    return write_declared_zarr(tmp / "huge.zarr", (200_000, 200_000), n_levels=2), (200_000,) * 2


def _huge_zarr_v3(tmp: Path) -> tuple[Path, tuple[int, int]]:
    path = write_declared_zarr(
        tmp / "huge3.ome.zarr", (150_000, 300_000), n_levels=1, version="0.5", dtype=np.float32
    )
    return path, (150_000, 300_000)


def _huge_zarr_deep(tmp: Path) -> tuple[Path, tuple[int, int]]:
    # Seven levels: the statistics level is 3125² px (10 Mpx), sampled too.
    return write_declared_zarr(tmp / "deep.zarr", (200_000, 200_000), n_levels=7), (200_000,) * 2


@pytest.mark.parametrize(
    "make", [_huge_tiff, _huge_tiff_pair, _huge_zarr_levels, _huge_zarr_v3, _huge_zarr_deep]
)
def test_declared_huge_slides_open_in_bounded_time_and_memory(tmp_path, make):
    path, shape = make(tmp_path)
    on_disk = sum(p.stat().st_size for p in [path, *path.rglob("*")] if p.is_file())
    assert on_disk < 20 << 20
    run = _probe(path)
    # Each front end within 20 s; the three together grow the process by < 1 GiB.
    assert max(run["open_s"], run["info_s"], run["napari_s"]) < 20, run
    assert run["growth"] < 1 << 30, run
    assert run["open"] == list(shape) and run["info"] == [0, list(shape)]
    # Explicit contrast limits for R and F, from the bounded sample.
    assert len(run["napari"]) == 2 and all(0.0 <= lo < hi for lo, hi in run["napari"]), run


def test_statistics_sample_a_large_level_within_the_budget(tmp_path):
    # Short wide strips: square blocks would decode hundreds of full-width strips each.
    a = np.stack([image((3000, 6000), np.uint8, s) for s in (1, 2)])
    strips = write_tiff(tmp_path / "strips.tif", a, rowsperstrip=2, compression="zlib")
    tiles = write_tiff(tmp_path / "tiles.tif", a, tile=(512, 512), compression="zlib")
    for path in (strips, tiles):
        m = open_mosaic(path)
        plane = m.r_raw[0]
        assert plane.bytes_read < 0.25 * a.nbytes, (path.name, plane.bytes_read)
        assert "sampled from level 0" in m.metadata["norm_stats"]["source"]
        lo, hi = m.metadata["contrast_limits"]["r"]
        assert 0.0 <= lo < hi <= 1.0


@pytest.mark.parametrize(
    "make",
    [
        # One tile of 32768² px and two samples: 2 GiB to decode for any pixel.
        lambda d: write_declared_tiff(
            d / "t_R.tif", (40_000, 40_000), samples=2, tile=(32768, 32768), tile_bytes=b"x"
        ),
        # A zarr store written as one chunk per channel.
        lambda d: _one_chunk_zarr(d / "one.zarr"),
    ],
)
def test_chunks_too_large_to_read_are_refused(tmp_path, refused, make):
    path = make(tmp_path)
    if path.name.endswith("_R.tif"):
        shutil.copy(path, tmp_path / "t_F.tif")
    refused(path, r"chunks of \d+x\d+ px .* save it tiled")


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda d: write_declared_zarr(d / "tera.zarr", (1_000_000, 1_000_000), n_levels=1),
            r"declares 1000000x1000000 px \(1000 Gpx\).*header damaged",
        ),
        (
            lambda d: write_declared_tiff(
                d / "big.tif", (300_000, 300_000), samples=2, tile=(4096, 4096)
            ),
            r"declares 300000x300000 px \(90 Gpx\)",
        ),
        (
            lambda d: write_declared_zarr(d / "thin.zarr", (1, 1 << 34), n_levels=1),
            r"cut into 16777216 pieces of 1x1024 px",
        ),
    ],
)
def test_sizes_beyond_any_slide_are_refused_at_once(tmp_path, refused, make, pattern):
    path = make(tmp_path)
    if path.suffix == ".tif":
        path = path.rename(path.with_name("big_R.tif"))
        shutil.copy(path, tmp_path / "big_F.tif")
    refused(path, pattern)


def _one_chunk_zarr(path: Path) -> Path:
    write_declared_zarr(path, (100_000, 100_000), n_levels=1, chunks=100_000)
    return path


# -------------------------------------------------------------- no silent garbage
def _float_pyramid(tmp: Path, dtype=np.float32) -> tuple[Path, tuple[int, int]]:
    a = _two((2048, 1024), np.float32).astype(dtype)
    levels = [a, _mean2(a), _mean2(_mean2(a))]
    levels[0][1, 1500, 700] = np.nan  # F, level 0; the statistics use level 2
    return write_tiff_pyramid(tmp / "nan.tif", levels, metadata={"axes": "CYX"}), (1500, 700)


def _inf_in_level1(tmp: Path) -> tuple[Path, tuple[int, int]]:
    a = _two((4096, 2048), np.float32)
    levels = [a, _mean2(a), _mean2(_mean2(a)), _mean2(_mean2(_mean2(a)))]
    levels[1][1, 900, 33] = -np.inf
    path = write_tiff_pyramid(tmp / "inf.tif", levels, metadata={"axes": "CYX"})
    return path, (900, 33)


def _float16_pyramid(tmp: Path) -> tuple[Path, tuple[int, int]]:
    return _float_pyramid(tmp, np.float16)


def _negative_int16(tmp: Path) -> tuple[Path, tuple[int, int]]:
    a = _two((2048, 1024), np.int16)
    levels = [a, _mean2(a), _mean2(_mean2(a))]
    levels[0][1, 1500, 700] = -3
    return write_tiff_pyramid(tmp / "neg.tif", levels, metadata={"axes": "CYX"}), (1500, 700)


def _nan_zarr_chunk(tmp: Path) -> tuple[Path, tuple[int, int]]:
    path = write_declared_zarr(tmp / "nan.zarr", (4096, 4096), n_levels=3, dtype=np.float32)
    zarr.open_array(str(path / "0"), mode="r+")[1, 1500, 700] = np.inf
    return path, (1500, 700)


@pytest.mark.parametrize(
    "make", [_float_pyramid, _inf_in_level1, _float16_pyramid, _negative_int16, _nan_zarr_chunk]
)
def test_bad_values_outside_the_sample_are_an_error_where_read(tmp_path, make, capsys):
    path, (y, x) = make(tmp_path)
    m = open_mosaic(path)  # the statistics' level is clean
    level = 1 if path.name == "inf.tif" else 0
    box = (y - 10, y + 30, x - 20, x + 5)
    where = rf"level {level} \(F\), rows {y}:{y + 1}, cols {x}:{x + 1}"
    # Every read for display, staining or export: the dask level, the pipeline's
    # read of stored planes, the viewer's linear view.
    with pytest.raises(MosaicError, match=where) as err:
        m.f[level][box[0] : box[1], box[2] : box[3]].compute()
    assert err.value.path == path
    with pytest.raises(MosaicError, match=where):
        read_normalized(m, "f", level, box)
    with pytest.raises(MosaicError, match=where):
        LinearStainView(m).read(level, box)
    # Other dask chunks (1024 rows) are fine.
    rows = slice(0, 64) if y >= 1024 else slice(1024, 1088)
    assert np.isfinite(m.f[level][rows, :64].compute()).all()
    # The CLI export (of level 0; it builds its own coarser levels) stops with one line
    # naming the file and the region.
    capsys.readouterr()
    out = Path(tempfile.mkdtemp()) / "out.ome.zarr"
    try:
        argv = ["stain", str(path), "--method", "linear", "--out", str(out), "--quiet"]
        assert cli_main(argv) == (2 if level == 0 else 0)
        if level == 0:
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and re.search(where, lines[0])
    finally:
        shutil.rmtree(out.parent)


def test_a_bad_value_error_crosses_to_the_caller_from_worker_processes(tmp_path):
    path, (y, x) = _float_pyramid(tmp_path)
    m = open_mosaic(path)
    region = m.f[0][y - 5 : y + 5, x - 5 : x + 5]
    with pytest.raises(MosaicError, match=rf"rows {y}:{y + 1}, cols {x}:{x + 1}") as err:
        region.compute(scheduler="processes", num_workers=1)
    assert err.value.path == path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_values_in_the_sample_refuse_the_slide(tmp_path, refused, bad):
    a = _two((300, 300), np.float32)
    a[0, 10, 20] = bad
    path = write_tiff(tmp_path / "nan.tif", a)
    refused(path, r"NaN or infinite values in level 0 \(R\), rows 10:11, cols 20:21")


# -------------------------------------------------------------------- wrong dtypes
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: write_tiff(d / "bool.tif", _two() > 100), "boolean"),
        (lambda d: write_tiff(d / "c.tif", (_two() + 1j).astype(np.complex64)), "complex"),
        (lambda d: write_omezarr(d / "bool.zarr", _two() > 100, n_levels=1), "boolean"),
        (
            lambda d: write_omezarr(d / "c.zarr", (_two() + 1j).astype(np.complex128)),
            "complex",
        ),
        (lambda d: write_tiff(d / "i8.tif", _two().astype(np.int8)), r"negative values"),
        (
            lambda d: write_tiff(d / "i64.tif", _two().astype(np.int64) - 2**40),
            r"negative values \(int64",
        ),
        (
            lambda d: _pair(d, image((64, 80), np.uint8), image((64, 80), np.uint8) > 9)[0],
            "boolean",
        ),
    ],
)
def test_wrong_dtypes(tmp_path, refused, make, pattern):
    path = make(tmp_path)
    culprit = tmp_path / "s1_F.tif" if path.name == "s1_R.tif" else path
    refused(path, pattern, culprit)


@pytest.mark.parametrize("dtype", [np.float16, np.uint64, np.uint32, np.int16, np.float64])
def test_unusual_but_valid_dtypes_open(tmp_path, dtype):
    a = _two((300, 200), np.uint16)
    if np.dtype(dtype).kind == "f":
        a = a / 65535.0
    elif dtype is np.int16:
        a = a // 2
    m = open_mosaic(write_tiff(tmp_path / "ok.tif", a.astype(dtype)))
    r = m.r[0].compute()
    assert r.dtype == np.float32 and np.isfinite(r).all() and 0 <= r.min() < r.max() <= 1


# ----------------------------------------------------------------- symbolic link loops
def _loop(a: Path, b: Path) -> Path:
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return a


def _loop_partner(d: Path) -> tuple[Path, Path, None]:
    rp = write_tiff(d / "s2_R.tif", image((40, 50)))
    return rp, _loop(d / "s2_F.tif", d / "y"), None


def _loop_explicit_f(d: Path) -> tuple[Path, Path, Path]:
    rp = write_tiff(d / "r.tif", image((40, 50)))
    f = _loop(d / "g_F.tif", d / "h")
    return rp, f, f


def _loop_detector_file(d: Path) -> tuple[Path, Path, None]:
    slide, raw = _vivascope_with(d, lambda det: _loop(det / "highres_raw.tif", det / "z"))
    return slide, raw, None


def _loop_detector_folder(d: Path) -> tuple[Path, Path, None]:
    slide, raw = _vivascope_with(d, lambda det: det)
    shutil.rmtree(raw.parent)
    return slide, _loop(slide / "DET#2", slide / "DET#3"), None


@pytest.mark.parametrize(
    "make",
    [
        lambda d: (_loop(d / "s1_R.tif", d / "x.tif"),) * 2 + (None,),
        _loop_partner,
        _loop_explicit_f,
        _loop_detector_file,
        _loop_detector_folder,
        lambda d: (_loop(d / "slide.zarr", d / "other.zarr"),) * 2 + (None,),
    ],
)
def test_symbolic_link_loops(tmp_path, refused, make):
    path, culprit, f_path = make(tmp_path)
    refused(path, "symbolic link loop", culprit, f_path=f_path)


def test_a_loop_beside_a_good_pair_is_ignored(tmp_path):
    _pair(tmp_path, image((40, 50), np.uint8, 1), image((40, 50), np.uint8, 2))
    _loop(tmp_path / "a.tif", tmp_path / "b")
    (tmp_path / "dir_loop").symlink_to(tmp_path)
    m = open_mosaic(tmp_path)
    assert m.layout == "tiff-pair" and m.shape == (40, 50)
    assert callable(get_reader(str(tmp_path)))


def _vivascope_with(folder: Path, spoil: Callable[[Path], Path]) -> tuple[Path, Path]:
    """A Vivascope slide whose ``DET#2/highres_raw.tif`` is replaced by ``spoil(DET#2)``."""
    r = image((60, 70), np.uint8)
    slide = write_vivascope(folder / "slide", r, r)
    det = slide / "DET#2"
    (det / "highres_raw.tif").unlink()
    spoil(det)
    return slide, det / "highres_raw.tif"


# ---------------------------------------------------- a folder where a file belongs
@pytest.mark.parametrize(
    "case",
    ["raw-file-is-folder", "det-is-file", "partner-is-folder", "f-path-is-folder", "zarr-level"],
)
def test_folder_where_a_file_belongs_and_back(tmp_path, refused, case):
    r = image((60, 70), np.uint8)
    if case == "raw-file-is-folder":
        slide, culprit = _vivascope_with(tmp_path, lambda det: (det / "highres_raw.tif").mkdir())
        refused(slide, "is a folder, not a file", culprit)
    elif case == "det-is-file":
        slide = write_vivascope(tmp_path / "slide", r, r)
        shutil.rmtree(slide / "DET#2")
        (slide / "DET#2").write_bytes(b"II*\x00")
        refused(slide, "is a file, not a folder", slide / "DET#2")
    elif case == "partner-is-folder":
        rp = write_tiff(tmp_path / "s1_R.tif", r)
        (tmp_path / "s1_F.tif").mkdir()
        refused(rp, "is a folder, not a file", tmp_path / "s1_F.tif")
    elif case == "f-path-is-folder":
        rp = write_tiff(tmp_path / "a.tif", r)
        (tmp_path / "b.tif").mkdir()
        refused(rp, "is a folder, not a file", tmp_path / "b.tif", f_path=tmp_path / "b.tif")
    else:  # a level of an OME-Zarr that is a file
        store = write_omezarr(tmp_path / "s.zarr", _two(), n_levels=1)
        shutil.rmtree(store / "0")
        (store / "0").write_bytes(b"\x00" * 10)
        refused(store, "dataset '0', which is a file, not a zarr array")


def test_a_file_named_like_an_ome_zarr(tmp_path):
    path = tmp_path / "x.zarr"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(MosaicError, match=r"is not a TIFF file.*OME-Zarr folder") as err:
        open_mosaic(path)
    assert err.value.path == path


# -------------------------------------------------------------- permission denied
@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user may enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="confocal-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for p in [folder, *folder.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(folder)


@contextlib.contextmanager
def _as_unprivileged_user() -> Iterator[None]:
    """Make chmod count: root reads any file, so act as ``nobody`` while checking."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("running as root without CAP_SETUID: chmod cannot deny reads here")
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("case", ["file", "pair-half", "slide-folder", "det-folder", "zarr"])
def test_permission_denied(shared_tmp, refused, case):
    r = image((60, 70), np.uint8)
    if case == "file":
        path = culprit = write_tiff(shared_tmp / "s1_R.tif", np.stack([r, r]))
        culprit.chmod(0)
        pattern = "permission denied"
    elif case == "pair-half":
        path, culprit = _pair(shared_tmp, r, r)
        culprit.chmod(0)
        pattern = "permission denied"
    elif case == "slide-folder":
        path = culprit = write_vivascope(shared_tmp / "slide", r, r)
        culprit.chmod(0)
        pattern = "permission denied"
    elif case == "det-folder":
        path = write_vivascope(shared_tmp / "slide", r, r)
        culprit = path / "DET#1"
        culprit.chmod(0)
        pattern = "permission denied"
    else:
        path = culprit = write_omezarr(shared_tmp / "s.zarr", _two(), n_levels=1)
        culprit.chmod(0)
        pattern = "permission denied"
    with _as_unprivileged_user():
        refused(path, pattern, culprit)


def test_permission_denied_on_a_chunk_is_an_error_where_read(shared_tmp):
    data = _two((2048, 2048))
    store = write_omezarr(shared_tmp / "s.zarr", data, n_levels=2, chunks=512)
    (store / "0" / "0.1.2").chmod(0)  # channel 0, rows 512:1024, cols 1024:1536
    with _as_unprivileged_user():
        m = open_mosaic(store)
        with pytest.raises(MosaicError, match=r"rows 0:1024, cols 1024:2048 .*permission"):
            m.r[0][:1024, 1024:2048].compute()


# ----------------------------------------------------------------- corrupt chunks
def _tiff_with_bad_tile(tmp: Path, index: int) -> Path:
    # Small enough (1.5 Mpx) to be read whole for the statistics.
    return write_declared_tiff(
        tmp / "bad.tif", (1024, 1536), samples=2, fill=9, tiles={index: b"\x78\x9cgarbage!"}
    )


def test_corrupt_tiff_tile_read_for_staining_names_file_and_tile(tmp_path, capsys):
    a = _two((2048, 1024))
    levels = [a, _mean2(a), _mean2(_mean2(a))]
    path = write_tiff_pyramid(
        tmp_path / "p.tif", levels, metadata={"axes": "CYX"}, compression="zlib"
    )
    with tifffile.TiffFile(path) as tif:  # spoil tile 5 of level 0 (rows 256:512, cols 256:512)
        offset = tif.pages[0].dataoffsets[5]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 64)
    m = open_mosaic(path)  # the statistics' level is intact
    where = r"tile 5 of level 0 \(rows 256:512, cols 256:512\) cannot be decoded"
    with pytest.raises(MosaicError, match=where) as err:
        m.r[0][300:400, 300:400].compute()
    assert err.value.path == path and err.value.__cause__ is not None
    with pytest.raises(MosaicError, match=where):
        read_normalized(m, "r", 0, (0, 600, 0, 600))
    with pytest.raises(MosaicError, match=where):
        LinearStainView(m).read(0, (250, 260, 250, 260))
    capsys.readouterr()
    out = Path(tempfile.mkdtemp()) / "out.ome.zarr"
    try:
        argv = ["stain", str(path), "--method", "linear", "--out", str(out), "--quiet"]
        assert cli_main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and re.search(where, lines[0])
    finally:
        shutil.rmtree(out.parent)


def _spoil_jpeg_tile(tmp: Path) -> Path:
    a = np.stack([image((512, 512), np.uint8, s) for s in (1, 2, 3)], -1)
    rp = write_tiff(tmp / "j_R.tif", a[..., 0], tile=(256, 256), compression="jpeg")
    write_tiff(tmp / "j_F.tif", a[..., 1], tile=(256, 256), compression="jpeg")
    with tifffile.TiffFile(rp) as tif:
        offset = tif.pages[0].dataoffsets[3]
    with open(rp, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 16)  # no JPEG start-of-image marker any more
    return rp


def _spoil_zarr_chunk(tmp: Path, version: str) -> Path:
    store = write_omezarr(tmp / "z.zarr", _two((1024, 1024)), n_levels=1, version=version)
    chunk = store / "0" / ("c/1/0/2" if version == "0.5" else "1.0.2")
    assert chunk.is_file()
    chunk.write_bytes(b"\x02\x01garbage, not a blosc or zstd frame" * 3)
    return store


@pytest.mark.parametrize(
    "make, culprit_name, pattern",
    [
        (lambda d: _tiff_with_bad_tile(d, 0), "bad.tif", r"tile 0 of level 0 \(rows 0:512"),
        (lambda d: _tiff_with_bad_tile(d, 4), "bad.tif", r"tile 4 of level 0 .*cols 512:1024"),
        (_spoil_jpeg_tile, "j_R.tif", r"tile 3 of level 0 \(rows 256:512, cols 256:512\)"),
        (lambda d: _spoil_zarr_chunk(d, "0.4"), "z.zarr", r"rows 0:1024, cols 0:1024"),
        (lambda d: _spoil_zarr_chunk(d, "0.5"), "z.zarr", r"rows 0:1024, cols 0:1024"),
    ],
)
def test_corrupt_chunk_in_the_sample_refuses_the_slide(
    tmp_path, refused, make, culprit_name, pattern
):
    path = make(tmp_path)
    try:
        open_mosaic(path)
    except MosaicError:
        pass
    else:
        pytest.fail("the corrupt chunk was not in the statistics sample")
    refused(path, pattern + ".*corrupt|" + pattern + ".*damaged", tmp_path / culprit_name)


# ------------------------------------------------------------------ truncated files
def _cut(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[:n])
    path.unlink()
    return out


@pytest.mark.parametrize(
    "make",
    [
        # tifffile writes directories first: the cut loses pixel data.
        lambda d: _cut(write_tiff(d / "t.tif", _two((512, 512)), tile=(128, 128)), 0.5),
        lambda d: _cut(write_tiff(d / "s.tif", _two((512, 512))), 0.66),
        # libtiff (pyvips) writes directories last: the cut loses the directory.
        lambda d: _cut(write_pyvips(d / "v.tif", np.moveaxis(_two((512, 512)), 0, -1)), 0.5),
        # Channels as pages: the second page's directory is past the cut.
        lambda d: _cut(write_tiff(d / "p.tif", _two((512, 512)), photometric="minisblack"), 0.52),
        lambda d: _cut(write_tiff(d / "b.tif", _two((256, 256)), bigtiff=True), 0.7),
        lambda d: _cut(write_tiff(d / "h.tif", _two((64, 64))), 6),
    ],
)
def test_truncated_tiffs_are_called_truncated(tmp_path, refused, make):
    path = make(tmp_path).rename(tmp_path / "cut_R.tif")
    shutil.copy(path, tmp_path / "cut_F.tif")  # napari claims it as one half of a pair
    err = refused(path, "is truncated")
    assert "layout" not in str(err)


# ------------------------------------------------------- empty and non-TIFF files
@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", r"is empty \(0 bytes\)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "is not a TIFF file"),
        (b"hello, I am text", "is not a TIFF file"),
        (b"PK\x03\x04" + os.urandom(200), "is not a TIFF file"),
        (b"II*\x00\x00\x00\x00\x00", "holds no image"),
    ],
)
@pytest.mark.parametrize("where", ["pair-half", "explicit-f", "vivascope"])
def test_empty_and_non_tiff_files(tmp_path, refused, content, pattern, where):
    r = image((40, 50), np.uint8)
    if where == "pair-half":
        write_tiff(tmp_path / "s1_R.tif", r)
        bad = tmp_path / "s1_F.tif"
        bad.write_bytes(content)
        refused(tmp_path / "s1_R.tif", pattern, bad)
    elif where == "explicit-f":
        rp = write_tiff(tmp_path / "r.tif", r)
        bad = tmp_path / "f.tif"
        bad.write_bytes(content)
        refused(rp, pattern, bad, f_path=bad)
    else:
        slide = write_vivascope(tmp_path / "slide", r, r)
        bad = slide / "DET#1" / "highres_raw.tif"
        bad.write_bytes(content)
        refused(slide, pattern, bad)


# -------------------------------------------------------- OME-Zarr bad metadata
def _zattrs(store: Path) -> dict:
    return json.loads((store / ".zattrs").read_text())


def _spoil_zarr(tmp: Path, how: str) -> Path:
    store = write_omezarr(tmp / "s.zarr", _two(), n_levels=2)
    attrs = _zattrs(store)
    ms = attrs["multiscales"][0]
    if how == "invalid-json":
        (store / ".zattrs").write_text("{not json")
    elif how == "no-multiscales":
        attrs = {"hello": 1}
    elif how == "multiscales-dict":
        attrs["multiscales"] = ms
    elif how == "no-datasets":
        ms["datasets"] = []
    elif how == "missing-dataset":
        ms["datasets"][1]["path"] = "nope"
    elif how == "dataset-without-path":
        del ms["datasets"][0]["path"]
    elif how == "axes-mismatch":
        ms["axes"] = ms["axes"][1:]
    elif how == "scale-text":
        ms["datasets"][0]["coordinateTransformations"][0]["scale"] = ["a", "b", "c"]
    elif how == "bad-zarray":
        (store / "0" / ".zarray").write_text('{"shape": "wide"}')
    elif how == "no-metadata":
        shutil.rmtree(store)
        store.mkdir()
        (store / "readme.txt").write_text("not zarr")
    if how not in ("invalid-json", "bad-zarray", "no-metadata"):
        (store / ".zattrs").write_text(json.dumps(attrs))
    return store


@pytest.mark.parametrize(
    "how, pattern",
    [
        ("invalid-json", "cannot be opened as zarr"),
        ("no-multiscales", "without OME-NGFF 'multiscales'"),
        ("multiscales-dict", "invalid OME-NGFF metadata: 'multiscales' is not a list"),
        ("no-datasets", "without datasets"),
        ("missing-dataset", "lacks the dataset 'nope'"),
        ("dataset-without-path", "invalid OME-NGFF metadata: a dataset has no 'path'"),
        ("axes-mismatch", "lists 2 axes for 3-D arrays"),
        ("scale-text", "invalid OME-NGFF metadata"),
        ("bad-zarray", "dataset '0', whose zarr metadata is invalid"),
        ("no-metadata", "has no zarr metadata"),
    ],
)
def test_ome_zarr_with_bad_or_missing_metadata(tmp_path, refused, how, pattern):
    refused(_spoil_zarr(tmp_path, how), pattern)


def test_ome_zarr_v3_with_bad_metadata(tmp_path, refused):
    store = write_omezarr(tmp_path / "s.zarr", _two(), n_levels=1, version="0.5")
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attri')
    refused(store, "cannot be opened as zarr")


# ------------------------------------------- R and F of different sizes; channels
@pytest.mark.parametrize("kind", ["pair", "vivascope", "explicit", "levels"])
def test_r_and_f_of_different_sizes(tmp_path, refused, kind):
    r, f = image((300, 400)), image((300, 401))
    if kind == "pair":
        path, _ = _pair(tmp_path, r, f)
        refused(path, r"differ in size: R is 300x400 px .* F is 300x401 px")
    elif kind == "vivascope":
        slide = write_vivascope(tmp_path / "v", r, image((299, 400)))
        refused(slide, r"differ in size: R is 300x400 px .* F is 299x400 px")
    elif kind == "explicit":
        rp, fp = write_tiff(tmp_path / "a.tif", r), write_tiff(tmp_path / "b.tif", f.T)
        refused(rp, r"differ in size", fp, f_path=fp)
    else:  # same level 0, the pyramids differ: the common levels are used
        big = image((2100, 1500))
        rp = write_pyvips(tmp_path / "p_R.tif", big, pyramid=True)
        write_tiff(tmp_path / "p_F.tif", big)
        m = open_mosaic(rp)
        assert m.metadata["n_file_levels"] == 1 and m.levels == 3


@pytest.mark.parametrize(
    "make, culprit, pattern",
    [
        (lambda d: write_omezarr(d / "one.zarr", _two()[:1]), "one.zarr", "has one channel"),
        (
            lambda d: write_omezarr(d / "three.zarr", np.concatenate([_two(), _two()[:1]])),
            "three.zarr",
            "has 3 channels where 2",
        ),
        (
            lambda d: write_omezarr(d / "four.zarr", np.concatenate([_two(), _two()])),
            "four.zarr",
            "has 4 channels where 2",
        ),
        (
            lambda d: _explicit(d, np.moveaxis(np.concatenate([_two(), _two()[:1]]), 0, -1)),
            "f.tif",
            "has 3 channels; the F image of a pair must have one",
        ),
        (
            lambda d: _vivascope_rgb(d),
            "slide/DET#1/highres_raw.tif",
            "has 3 channels; the R image of a pair must have one",
        ),
    ],
)
def test_one_or_three_channels_where_two_are_expected(tmp_path, refused, make, culprit, pattern):
    path = make(tmp_path)
    f_path = tmp_path / "f.tif" if culprit == "f.tif" else None
    refused(path, pattern, tmp_path / culprit, f_path=f_path)


def _explicit(folder: Path, f: np.ndarray) -> Path:
    write_tiff(folder / "f.tif", f, photometric="rgb")
    return write_tiff(folder / "r.tif", f[..., 0])


def _vivascope_rgb(folder: Path) -> Path:
    rgb = np.moveaxis(np.concatenate([_two(), _two()[:1]]), 0, -1)
    return write_vivascope(folder / "slide", rgb, rgb[..., 0])


# --------------------------------------------------------------- one R/F sniffer
_PAIR_NAMES = [
    ("s1_R.tif", "s1_F.tif"),
    ("s1-R.tif", "s1-F.tif"),
    ("s1_r.TIF", "s1_f.TIF"),
    ("S1-f.Tiff", "S1-r.TIFF"),
    ("a.b_R.tiff", "a.b-F.tif"),
    ("s1__R.tif", "s1__F.tif"),
]
_NOT_PAIR_NAMES = [
    ("s1R.tif", "s1F.tif"),
    ("s1_X.tif", "s1_F.tif"),
    ("_R.tif", "_F.tif"),
    ("s1_R.png", "s1_F.png"),
    ("s1_R.tif", "S1_F.tif"),  # stems differ in case
    ("s1_RF.tif", "s1_FR.tif"),
]


@pytest.mark.parametrize("names", _PAIR_NAMES + _NOT_PAIR_NAMES)
def test_napari_claims_exactly_the_pairs_open_mosaic_opens(tmp_path, names):
    a = image((40, 50), np.uint8)
    for name in names:
        write_tiff(tmp_path / name, a)
    path = tmp_path / names[0]
    try:
        opened = open_mosaic(path).layout == "tiff-pair"
    except MosaicError as exc:
        assert "one channel" in str(exc) or "not a TIFF" in str(exc), exc
        opened = False
    claimed = get_reader(str(path)) is not None
    assert opened == claimed == (names in _PAIR_NAMES)
    # The same rule finds pairs in a folder.
    if names in _PAIR_NAMES:
        assert open_mosaic(tmp_path).layout == "tiff-pair"
        assert rf_role(names[0]) is not None and callable(get_reader(str(tmp_path)))


def test_napari_orders_a_selected_pair_by_its_names(tmp_path):
    rp = write_tiff(tmp_path / "x-r.TIF", image((40, 50), np.uint8, 1))
    fp = write_tiff(tmp_path / "x-f.TIF", image((40, 50), np.uint8, 2))
    for chosen in ([str(fp), str(rp)], [str(rp), str(fp)]):
        layers = get_reader(chosen)(chosen)
        mosaic = layers[0][1]["metadata"]["confocal_mosaic"]
        assert mosaic.files == {"r": str(rp), "f": str(fp)}


# ---------------------------------------------------- the napari reader never raises
def _made_dir(path: Path) -> str:
    path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: str(_loop(d / "l_R.tif", d / "m")),
        lambda d: str(_loop(d / "loop.zarr", d / "n")),
        lambda d: str(d / "missing_R.tif"),
        lambda d: [str(d / "a.tif"), str(d / "b.tif")],
        lambda d: [str(d / "x.tif")] * 3,
        lambda d: _made_dir(d / "dir.tif"),
        lambda d: _made_dir(d / "empty.zarr"),
    ],
)
def test_napari_reader_never_raises(tmp_path, make, notifications):
    target = make(tmp_path)
    reader = get_reader(target)
    if reader is None:
        return
    notifications.clear()
    assert reader(target) == NOTHING
    errors = [n for n in notifications if str(n.severity) == "error"]
    assert len(errors) == 1


def test_napari_reader_reports_unexpected_failures_too(tmp_path, notifications, monkeypatch):
    from napari_confocal_stain.napari import _layers

    path = write_tiff(tmp_path / "two.tif", _two())

    def broken(_mosaic):
        raise RuntimeError("boom")

    monkeypatch.setattr(_layers, "mosaic_layer_data", broken)
    notifications.clear()
    assert get_reader(str(path))(str(path)) == NOTHING
    errors = [str(n.message) for n in notifications if str(n.severity) == "error"]
    assert len(errors) == 1 and str(path) in errors[0] and "boom" in errors[0]


@pytest.mark.parametrize("kind", ["truncated", "not-zarr", "bad-zarr", "pair"])
def test_a_real_viewer_shows_one_notification_and_no_layer(
    make_napari_viewer, tmp_path, notifications, kind
):
    if kind == "truncated":
        target = str(_cut(write_tiff(tmp_path / "t_R.tif", _two((256, 256))), 0.5))
        shutil.copy(target, tmp_path / "cut_t_F.tif")
    elif kind == "not-zarr":  # (napari itself refuses a path it cannot stat, e.g. a loop)
        target = str(_spoil_zarr(tmp_path, "no-metadata"))
    elif kind == "bad-zarr":
        target = str(_spoil_zarr(tmp_path, "scale-text"))
    else:
        rp, fp = write_tiff(tmp_path / "a.tif", image((30, 40))), tmp_path / "b.tif"
        fp.write_bytes(b"")
        target = [str(rp), str(fp)]
    viewer = make_napari_viewer()
    notifications.clear()
    assert viewer.open(target, plugin=PLUGIN, stack=isinstance(target, list)) == []
    assert len(viewer.layers) == 0
    errors = [str(n.message) for n in notifications if str(n.severity) == "error"]
    assert (
        len(errors) == 1
        and Path(target[-1] if isinstance(target, list) else target).name in errors[0]
    )


def test_nothing_is_written_next_to_bad_inputs(tmp_path, capsys):
    bad = _cut(write_tiff(tmp_path / "t.tif", _two((512, 512)), tile=(128, 128)), 0.5)
    before = sorted(os.listdir(tmp_path))
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    with pytest.raises(MosaicError):
        open_mosaic(bad)
    assert cli_main(["info", str(bad)]) == 2
    assert sorted(os.listdir(tmp_path)) == before
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == modes
