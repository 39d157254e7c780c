"""The ``confocal-stain`` command: info, synth, sample, help and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from napari_confocal_stain.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("confocal-stain")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "napari_confocal_stain.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_info_prints_json(synthetic_slide):
    res = run_cli("info", str(synthetic_slide))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert tuple(info["shape"]) == (1024, 1536)
    assert info["pixel_size_um"] == pytest.approx(0.75)
    assert info["layout"] == "vivascope"
    assert info["dtype"] == "uint8"
    assert info["levels"] >= 2


def test_info_in_process_with_options(synthetic_slide, capsys):
    assert (
        main(["info", str(synthetic_slide), "--normalization", "dtype", "--pixel-size", "0.5"])
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["pixel_size_um"] == pytest.approx(0.5)
    assert info["normalization"] == "dtype"


def test_synth_writes_a_mosaic_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "mosaic_a"
    assert main(["synth", str(out), "--size", "300x400", "--seed", "2", "--quiet"]) == 0
    assert (out / "DET#1" / "highres_raw.tif").is_file()
    assert (out / "DET#2" / "highres_raw.tif").is_file()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["synth", str(out), "--size", "300x400", "--quiet"]) == 2
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["synth", str(out), "--size", "300x400", "--quiet", "--overwrite"]) == 0


def test_bad_path_is_one_line_error_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("info", str(empty))
    assert res.returncode == 2
    assert str(empty) in res.stderr
    assert "Traceback" not in res.stderr
    assert list(empty.iterdir()) == []  # nothing written into the input folder


def test_bad_size_option():
    res = run_cli("synth", "x", "--size", "banana")
    assert res.returncode == 2 and "size must look like" in res.stderr


@pytest.mark.parametrize("sub", [[], ["info"], ["synth"], ["sample"]])
def test_help(sub):
    res = run_cli(*sub, "--help")
    assert res.returncode == 0 and "usage: confocal-stain" in res.stdout
