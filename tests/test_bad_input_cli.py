"""Bad input on the command line: one line naming the file and the problem, exit status 2,
and nothing left behind (except the work folder a ``--resume`` can finish).

Every class of failure is caused for real: a read-only and a full file system are small
tmpfs mounts (skipped where mounting is not allowed), permission denied is a folder the
(unprivileged) effective user cannot write, a symlink loop is a real one, a corrupt slide
has a damaged compressed tile. The CLI runs in-process through ``cli.main`` (what the
``confocal-stain`` entry point calls) and, for the entry point itself, as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from _faults import leftovers, tmpfs, unprivileged

from napari_confocal_stain.cli import main
from napari_confocal_stain.cli.common import report_error
from napari_confocal_stain.errors import explain
from napari_confocal_stain.export import export_slide
from napari_confocal_stain.export.tasks import TASK_LOG_ENV

pytestmark = pytest.mark.timeout(300)

LINEAR = ["--method", "linear", "--quiet"]
SMALL = [*LINEAR, "--region", "0:256,0:256", "--tile", "128"]


# ------------------------------------------------------------------------------ helpers


def run(argv: list[str]) -> int:
    """``cli.main`` as the entry point runs it (argparse errors exit via SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code)


def one_error_line(capsys) -> str:
    """The single line the CLI wrote to stderr (asserting there is exactly one)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


REPO = Path(__file__).resolve().parents[1]


def cli_exe() -> list[str]:
    exe = shutil.which("confocal-stain")
    return [exe] if exe else [sys.executable, "-m", "napari_confocal_stain.cli"]


def cli_env() -> dict[str, str]:
    """The entry point's environment, importing this checkout (not another editable one)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


@pytest.fixture
def shared_dir():
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="ncs-bad-input-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def slide_copy(synthetic_slide, tmp_path) -> Path:
    """A private copy of the session's synthetic slide (some tests damage it)."""
    return Path(shutil.copytree(synthetic_slide, tmp_path / "slide_copy"))


def corrupt_tile(slide: Path) -> Path:
    """Damage one compressed level-0 tile of R (the coarse levels, stats, stay intact)."""
    path = slide / "DET#1" / "highres_raw.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        i = len(page.dataoffsets) - 2
        offset, nbytes = page.dataoffsets[i], page.databytecounts[i]
    with open(path, "r+b") as fh:
        fh.seek(offset + 4)
        fh.write(b"\xff" * min(200, nbytes - 8))
    return slide


def level0(path: Path) -> np.ndarray:
    if path.name.endswith(".ome.zarr"):
        return np.asarray(zarr.open_group(str(path), mode="r")["0"])
    return tifffile.imread(path)


# ------------------------------------------------------------------------------ permission


def test_output_folder_without_write_permission(synthetic_slide, shared_dir, capsys):
    slide = Path(shutil.copytree(synthetic_slide, shared_dir / "slide"))
    for p in [slide, *slide.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    with unprivileged():
        code = run(["stain", slide, "--out", locked / "x.ome.zarr", *SMALL])
    line = one_error_line(capsys)
    assert code == 2
    assert str(locked) in line and "permission denied" in line, line
    assert leftovers(locked) == []


def test_unreadable_slide(synthetic_slide, shared_dir, capsys):
    slide = Path(shutil.copytree(synthetic_slide, shared_dir / "slide"))
    r = slide / "DET#1" / "highres_raw.tif"
    r.chmod(0o600)
    out = shared_dir / "out"
    with unprivileged():
        code = run(["info", slide])
        assert code == 2
        line = one_error_line(capsys)
        code = run(["stain", slide, "--out", out / "x.ome.zarr", *SMALL])
    assert code == 2
    assert str(r) in line and "permission denied" in line.lower(), line
    assert str(r) in one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------ read-only


def test_read_only_file_system(synthetic_slide, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        for argv in (
            ["stain", synthetic_slide, "--out", ro / "x.ome.tif", *SMALL],
            ["stain", synthetic_slide, "--out", ro / "sub" / "x.ome.zarr", *SMALL],
            ["synth", ro / "slide", "--size", "128", "--quiet"],
        ):
            assert run(argv) == 2, argv
            line = one_error_line(capsys)
            assert str(ro) in line and "read-only file system" in line, line
            assert leftovers(ro) == []


# ------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize(("fmt", "size"), [("ome.zarr", "1m"), ("ome.tif", "3m")])
def test_full_disk_keeps_the_work_for_resume(synthetic_slide, tmp_path, capsys, fmt, size):
    """The disk fills while chunks are written (zarr) or later (the larger TIFF disk)."""
    argv = [*LINEAR, "--tile", "256"]
    reference = export_slide(synthetic_slide, tmp_path / f"ref.{fmt}", product="linear", tile=256)
    with tmpfs(tmp_path / "small", size) as disk:
        out = disk / f"x.{fmt}"
        work = disk / f".x.{fmt}.partial"
        assert run(["stain", synthetic_slide, "--out", out, *argv]) == 2
        line = one_error_line(capsys)
        assert str(out) in line and "disk full" in line, line
        assert f"kept in {work}" in line and "--resume" in line, line
        assert leftovers(disk) == [work.name]  # no output, no temporary TIFF
        assert (work / "manifest.json").is_file()

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        assert run(["stain", synthetic_slide, "--out", out, *argv, "--resume"]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        assert leftovers(disk) == [out.name]
        np.testing.assert_array_equal(level0(out), level0(reference))


def test_file_size_limit_is_one_line_and_leaves_nothing(synthetic_slide, tmp_path):
    """RLIMIT_FSIZE makes the OS refuse the write (EFBIG): a limit a resume cannot lift."""
    out_dir = tmp_path / "limited"
    script = textwrap.dedent(
        f"""
        import resource, sys
        from napari_confocal_stain.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        sys.exit(main(["stain", {str(synthetic_slide)!r}, "--out",
                       {str(out_dir / "x.ome.tif")!r}, "--method", "linear", "--quiet"]))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=cli_env()
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "file too large" in lines[0], res.stderr
    assert str(out_dir) in lines[0]
    assert not out_dir.exists()  # the work folder and the folder made for it are gone


# ------------------------------------------------------------------------------ wrong kind


def test_folder_where_a_file_belongs_and_file_where_a_folder_belongs(
    synthetic_slide, tmp_path, capsys
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    a_folder = tmp_path / "taken.ome.tif"
    a_folder.mkdir()
    cases = [
        (["stain", synthetic_slide, "--out", a_file / "x.ome.zarr", *SMALL],
         f"{a_file} is a file, not a folder"),
        (["stain", synthetic_slide, "--out", a_folder, *SMALL, "--overwrite"],
         f"{a_folder}: is a folder"),
        (["batch", synthetic_slide, "--out-dir", a_file, *LINEAR],
         f"{a_file}: is a file, not a folder"),
        (["metrics", synthetic_slide, "--csv", a_folder, "--quiet"],
         f"{a_folder}: is a folder"),
        (["synth", a_file / "slide", "--size", "128", "--quiet"],
         f"{a_file}: is a file, not a folder"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert run(argv) == 2, argv
        line = one_error_line(capsys)
        assert expected in line, line
    assert a_file.read_text() == "not a folder"
    assert leftovers(tmp_path) == ["notes.txt", "taken.ome.tif"]
    assert leftovers(a_folder) == []


# ------------------------------------------------------------------------------ symlink loops


def test_symlink_loop_in_the_output_path(synthetic_slide, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert run(["stain", synthetic_slide, "--out", loop / "x.ome.zarr", *SMALL]) == 2
    line = one_error_line(capsys)
    assert str(loop) in line and "symbolic link loop" in line, line
    # A looping link where the output goes counts as an existing file: never replaced.
    out_link = tmp_path / "y.ome.zarr"
    out_link.symlink_to(out_link)
    assert run(["stain", synthetic_slide, "--out", out_link, *SMALL]) == 2
    line = one_error_line(capsys)
    assert str(out_link) in line and "already exists" in line, line
    assert out_link.is_symlink() and leftovers(tmp_path) == ["loop", "y.ome.zarr"]


def test_symlink_loop_as_the_slide(tmp_path, capsys):
    loop = tmp_path / "slide"
    loop.symlink_to(loop)
    assert run(["info", loop]) == 2
    line = one_error_line(capsys)
    assert str(loop) in line and "loop" in line.replace(str(loop), ""), line


# ------------------------------------------------------------------------------ inputs


def test_output_inside_the_input_is_refused(synthetic_slide, capsys):
    before = sorted(p.name for p in synthetic_slide.rglob("*"))
    for argv in (
        ["stain", synthetic_slide, "--out", synthetic_slide / "x.ome.zarr", *SMALL],
        ["batch", synthetic_slide, "--out-dir", synthetic_slide / "stained", *LINEAR],
    ):
        assert run(argv) == 2
        line = one_error_line(capsys)
        assert str(synthetic_slide) in line and "never written" in line, line
    assert sorted(p.name for p in synthetic_slide.rglob("*")) == before


def test_missing_slide(tmp_path, capsys):
    missing = tmp_path / "no_such_slide"
    for argv in (
        ["info", missing],
        ["stain", missing, "--out", tmp_path / "out" / "x.ome.zarr", *SMALL],
        ["metrics", missing, "--quiet"],
    ):
        assert run(argv) == 2
        line = one_error_line(capsys)
        assert str(missing) in line and "does not exist" in line, line
    assert leftovers(tmp_path) == []


def test_corrupt_tile_found_mid_export_leaves_nothing(slide_copy, tmp_path, capsys, monkeypatch):
    slide = corrupt_tile(slide_copy)
    log = tmp_path / "tasks.log"
    monkeypatch.setenv(TASK_LOG_ENV, str(log))
    out_dir = tmp_path / "new" / "outputs"
    code = run(["stain", slide, "--out", out_dir / "x.ome.zarr", *LINEAR, "--tile", "256"])
    line = one_error_line(capsys)
    assert code == 2
    assert str(slide / "DET#1" / "highres_raw.tif") in line and "corrupt" in line, line
    assert log.read_text().count("chunk") >= 1  # it failed while exporting, not at open
    assert not (tmp_path / "new").exists()  # no work folder, no output, no folders made


@pytest.mark.timeout(180)
def test_corrupt_tile_on_a_local_cluster_is_the_same_one_line(slide_copy, tmp_path, capfd):
    """A worker process's error reaches the user as itself (it pickles), and only once."""
    pytest.importorskip("distributed")
    slide = corrupt_tile(slide_copy)
    out_dir = tmp_path / "outputs"
    argv = [*LINEAR, "--tile", "256", "--scheduler", "local", "--workers", "1"]
    assert run(["stain", slide, "--out", out_dir / "x.ome.zarr", *argv]) == 2
    line = one_error_line(capfd)  # the workers' stderr too
    assert str(slide / "DET#1" / "highres_raw.tif") in line and "corrupt" in line, line
    assert not out_dir.exists()


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "argv",
    [
        ["stain", "{slide}", "--out", "{tmp}/x.ome.zarr", "--tile", "100"],
        ["stain", "{slide}", "--out", "{tmp}/x.ome.zarr", "--workers", "0"],
        ["stain", "{slide}", "--out", "{tmp}/x.ome.zarr", "--device", "banana"],
        ["stain", "{slide}", "--out", "{tmp}/x.ome.zarr", "--context", "-3"],
        ["info", "{slide}", "--pixel-size", "-1"],
        ["synth", "{tmp}/s", "--looks", "nan"],
        ["metrics", "{slide}", "--chunk", "0"],
    ],
)
def test_option_values_argparse_can_check(argv, synthetic_slide, tmp_path, capsys):
    argv = [a.format(slide=synthetic_slide, tmp=tmp_path) for a in argv]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("confocal-stain"), err
    assert f"argument {argv[-2]}" in err
    assert leftovers(tmp_path) == []


def test_option_values_checked_against_the_slide(synthetic_slide, tmp_path, capsys):
    cases = [
        (["stain", synthetic_slide, "--out", tmp_path / "x.ome.zarr", *LINEAR,
          "--region", "0:5000,0:10"], [str(synthetic_slide), "beyond the slide"]),
        (["stain", synthetic_slide, "--out", tmp_path / "x.ome.zarr", "--quiet",
          "--tile", "128", "--context", "100"], ["context must be in 1..tile/2"]),
        (["metrics", synthetic_slide, "--quiet", "--cell", "100"], ["power of two"]),
        (["metrics", synthetic_slide, "--quiet", "--level", "7"], ["--level 7 out of range"]),
    ]  # fmt: skip
    for argv, expected in cases:
        assert run(argv) == 2
        line = one_error_line(capsys)
        assert all(e in line for e in expected), line
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ checkpoints


def test_bad_checkpoint_fails_before_anything_is_written(synthetic_slide, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    missing = tmp_path / "missing.safetensors"
    out_dir = tmp_path / "outputs"
    for argv, named in (
        (["stain", synthetic_slide, "--out", out_dir / "x.ome.zarr", "--model", missing,
          "--quiet"], missing),
        (["stain", synthetic_slide, "--out", out_dir / "x.ome.zarr", "--model", junk,
          "--quiet"], junk),
        (["stain", synthetic_slide, "--out", out_dir / "x.ome.zarr", *LINEAR,
          "--despeckle", junk], junk),
        (["metrics", synthetic_slide, "--model", junk, "--quiet"], junk),
    ):  # fmt: skip
        assert run(argv) == 2
        line = one_error_line(capsys)
        assert str(named) in line, line
    assert not out_dir.exists()
    assert junk.read_bytes() == b"\x00" * 64


# ------------------------------------------------------------------------------ batch


def test_batch_goes_on_after_bad_slides_and_lists_them(
    synthetic_slide, slide_copy, tmp_path, capsys
):
    missing = tmp_path / "missing_slide"
    corrupt = corrupt_tile(slide_copy)
    not_a_slide = tmp_path / "holiday_photos"
    not_a_slide.mkdir()
    (not_a_slide / "beach.txt").write_text("sand")
    out_dir = tmp_path / "stained"
    slides = [missing, synthetic_slide, corrupt, not_a_slide]
    code = run(["batch", *slides, "--out-dir", out_dir, *LINEAR, "--tile", "512"])
    captured = capsys.readouterr()
    assert code == 2
    good = out_dir / f"{synthetic_slide.name}.ome.zarr"
    assert captured.out.strip() == str(good)
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert lines[-1] == "confocal-stain batch: 3 of 4 slides failed", lines
    assert len(lines) == 4, lines
    for bad, line in zip([missing, corrupt, not_a_slide], lines[:3], strict=True):
        assert line.startswith("confocal-stain batch: error: ") and str(bad) in line, line
    assert leftovers(out_dir) == [good.name]  # no work folders of the failed slides
    assert level0(good).shape == (3, 1024, 1536)
    # Resumed: the done slide is skipped, the bad ones are reported again.
    code = run(["batch", *slides, "--out-dir", out_dir, *LINEAR, "--tile", "512", "--resume"])
    assert code == 2 and "already done" in capsys.readouterr().out


# ------------------------------------------------------------------------------ internal errors


def test_internal_error_is_one_line_and_debug_shows_the_traceback(capsys):
    def bug() -> None:
        raise TypeError("unsupported operand\nsecond line")

    try:
        bug()
    except TypeError as exc:
        assert report_error("stain", exc) == 1
        line = one_error_line(capsys)
        assert line == (
            "confocal-stain stain: error: internal error: TypeError: unsupported operand; "
            "second line (run with --debug for the traceback)"
        )
        assert report_error("stain", exc, debug=True) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "in bug" in err
        assert err.strip().splitlines()[-1].endswith("second line")


def test_debug_flag_before_or_after_the_subcommand(tmp_path, capsys):
    for argv in (["--debug", "info", tmp_path / "x"], ["info", tmp_path / "x", "--debug"]):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err
        assert err.strip().splitlines()[-1].endswith(f"{tmp_path / 'x'}: does not exist")


def test_errors_wrapped_by_libraries_are_named_for_their_cause(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    try:
        loop.resolve()  # Python < 3.13 raises RuntimeError for a loop
    except RuntimeError as exc:
        message, status = explain(exc)
        assert status == 2 and str(loop) in message and "symbolic link loop" in message
    full = tmp_path / "full"
    try:
        try:
            with open("/dev/full", "wb", buffering=0) as fh:
                fh.write(b"x")  # the kernel's always-full device: a real ENOSPC
        except OSError as exc:
            raise RuntimeError("store write failed") from exc
    except RuntimeError as exc:
        message, status = explain(exc, subject=full)
        assert status == 2 and message == f"{full}: disk full (no space left on the device)"
    message, status = explain(MemoryError(), subject=full)
    assert (message, status) == (f"{full}: out of memory", 2)


def test_path_errors_survive_pickling_to_and_from_worker_processes(tmp_path):
    import pickle

    from napari_confocal_stain.errors import MosaicError, OutputError

    for exc in (MosaicError(tmp_path / "s.tif", "is truncated"), OutputError(None, "disk full")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert (back.path, back.problem) == (exc.path, exc.problem)


# ------------------------------------------------------------------------------ entry point


def test_entry_point_one_line_exit_2(tmp_path):
    missing = tmp_path / "missing"
    res = subprocess.run(
        [*cli_exe(), "stain", str(missing), "--out", str(tmp_path / "o" / "x.ome.zarr")],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"confocal-stain stain: error: {missing}: does not exist"
    assert leftovers(tmp_path) == []


def test_output_piped_into_a_closed_pipe_is_quiet(synthetic_slide):
    """`confocal-stain info SLIDE | head -0`: not an error of the slide, no traceback."""
    proc = subprocess.Popen(
        [*cli_exe(), "info", str(synthetic_slide)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_ctrl_c_exits_130_and_resume_finishes(synthetic_slide, tmp_path):
    out = tmp_path / "x.ome.zarr"
    work = tmp_path / ".x.ome.zarr.partial"
    # The U-Net, not the fast default: the run must still be going when Ctrl-C arrives.
    gan = ["--method", "gan", "--model", "stain-unet", "--stats-tile", "64", "--precision",
           "fp32", "--tile", "128", "--context", "32", "--region", "128:512,256:768",
           "--quiet"]  # fmt: skip
    proc = subprocess.Popen(
        [*cli_exe(), "stain", str(synthetic_slide), "--out", str(out), *gan],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if work.exists() and len(list((work / "pieces").glob("*.npy"))) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the export made no progress in 120 s")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted" in lines[0] and f"kept in {work}" in lines[0] and "--resume" in lines[0]
    assert not out.exists() and (work / "manifest.json").is_file()
    assert run(["stain", synthetic_slide, "--out", out, *gan, "--resume"]) == 0
    assert leftovers(tmp_path) == ["x.ome.zarr"]
