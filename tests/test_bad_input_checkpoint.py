"""Bad checkpoints: every kind gives one CheckpointError naming the file and the problem.

Every file is generated here from a real small checkpoint (real tensors written by
save_checkpoint or torch.save) and then damaged the way a disk, a download or an attacker
would. The declared-huge cases run in a subprocess whose address space is capped at 6 GB.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.inference import load_model
from napari_confocal_stain.models import (
    METADATA_KEY,
    WEIGHTS_DIR,
    available_models,
    build_model,
    load_checkpoint,
    model_spec,
    save_checkpoint,
)
from napari_confocal_stain.models.limits import KWARG_LIMITS, IntList, IntRange

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "affine": {},
    "resnet": {"base_filters": 4, "n_down": 2, "n_blocks": 1},
    "resnet-thesis": {"base_filters": 4, "n_blocks": 1},
    "unet": {"base_filters": 4, "n_down": 2},
    "unet-light": {"base_filters": 4, "n_down": 2},
    "light": {"channels": [4, 8], "n_blocks": 1},
    "fast": {"channels": [4, 8], "n_blocks": 1},
    "patchgan": {"base_filters": 4},
    "despeckle": {"filters": 4, "layers": 2},
    "despeckle-thesis": {"filters": 4},
    "despeckle-combalia": {"filters": 4, "layers": 2},
    "despeckle-dilated": {"filters": 4, "layers": 3, "dilation": [1, 2, 1]},
}
# Another in-range size of each architecture: rebuilds other shapes from the same names.
OTHER_SIZE = {
    "affine": {"in_channels": 4},
    "resnet": {"base_filters": 8},
    "resnet-thesis": {"base_filters": 8},
    "unet": {"base_filters": 8},
    "unet-light": {"base_filters": 8},
    "light": {"channels": [4, 16]},
    "fast": {"channels": [4, 16]},
    "patchgan": {"base_filters": 8},
    "despeckle": {"filters": 8},
    "despeckle-thesis": {"filters": 8},
    "despeckle-combalia": {"filters": 8},
    "despeckle-dilated": {"filters": 8},
}
SHAPE_MISMATCH = (
    r"tensor '[^']+' has shape \[[\d, ]+\] in the file, the architecture expects \[[\d, ]+\]"
)


def small_checkpoint(folder: Path, name: str = "unet") -> Path:
    """A real checkpoint of a small ``name`` with non-initial weights."""
    model = build_model(name, **SMALL[name])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    return save_checkpoint(folder / f"{name}.safetensors", model, architecture=name)


def assert_error(call: Callable[[], object], path: Path, pattern: str) -> str:
    """``call`` raises one CheckpointError: one line, naming ``path``, matching ``pattern``."""
    with pytest.raises(CheckpointError, match=pattern) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    assert "Traceback" not in message
    return message


# ------------------------------------------------------------------------- file surgery


def split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    blob = header.encode() if isinstance(header, str) else header
    blob += b" " * (-len(blob) % 8)
    return (len(blob) if length is None else length).to_bytes(8, "little") + blob + data


def edit_header(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        header, data = split(path)
        edit(header)
        path.write_bytes(join(header, data))
        return path

    return make


def edit_meta(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def change(header: dict) -> None:
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        edit(meta)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)

    return edit_header(change)


def edit_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(edit(path.read_bytes()))
        return path

    return make


def edit_tensors(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    """Load the real tensors and metadata, let ``edit`` change the tensors, save them back."""

    def make(path: Path) -> Path:
        header, _ = split(path)
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata=header["__metadata__"])
        return path

    return make


def same_size_pair(header: dict) -> tuple[str, str]:
    """Two tensors whose data spans have the same length, the first one first in the file."""
    by_size: dict[int, str] = {}
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    for name in names:
        begin, end = header[name]["data_offsets"]
        if end - begin in by_size:
            return by_size[end - begin], name
        by_size[end - begin] = name
    raise AssertionError("no two tensors of the same size")


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _share_span(header: dict) -> None:
    a, b = same_size_pair(header)
    header[b]["data_offsets"] = header[a]["data_offsets"]


def _shift(name_of: Callable[[dict], str], by: int) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        entry = header[name_of(header)]
        entry["data_offsets"] = [o + by for o in entry["data_offsets"]]

    return change


def _second_tensor(header: dict) -> str:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return names[1]


def _duplicate_name(path: Path) -> Path:
    header, data = split(path)
    text = json.dumps(header)
    name = last_tensor(header)
    text = text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    path.write_bytes(join(text, data))
    return path


def _huge_sparse(path: Path) -> Path:
    """A header declaring one 3 GiB tensor, and a sparse file of exactly that size (cheap)."""
    header, _ = split(path)
    nbytes = 3 * 2**30
    header = {
        "__metadata__": header["__metadata__"],
        "stem.1.weight": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]},
    }
    blob = join(header, b"")
    path.write_bytes(blob)
    os.truncate(path, len(blob) + nbytes)
    return path


# (id, how to damage a real small U-Net checkpoint, what the message must say)
FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("zero-length", edit_bytes(lambda d: b""), r"empty file \(0 bytes\)"),
    ("3 bytes", edit_bytes(lambda d: d[:3]), r"not a safetensors file \(only 3 bytes\)"),
    ("truncated in the header", edit_bytes(lambda d: d[:40]), r"^\S+: truncated: the header"),
    ("truncated after the header", edit_bytes(lambda d: d[: 8 + split_n(d)]), r": truncated: "),
    ("truncated mid-data", edit_bytes(lambda d: d[:-100]), r": truncated: tensor data"),
    ("last byte cut", edit_bytes(lambda d: d[:-1]), r": truncated: tensor data"),
    (
        "header length 2**60",
        edit_bytes(lambda d: (2**60).to_bytes(8, "little") + d[8:]),
        r"header length field reads 1152921504606846976 bytes",
    ),
    (
        "header length 0",
        edit_bytes(lambda d: (0).to_bytes(8, "little") + d[8:]),
        r"not a safetensors file: its header length field reads 0",
    ),
    ("header not JSON", edit_bytes(lambda d: d[:8] + b"X" + d[9:]), r"header is not valid JSON"),
    ("header not UTF-8", edit_bytes(lambda d: d[:8] + b"\xff" + d[9:]), r"not valid JSON"),
    (
        "header nested 100000 deep",
        edit_bytes(lambda d: join("[" * 100_000, b"")),
        r"header is not valid JSON",
    ),
    ("header a JSON array", edit_bytes(lambda d: join("[1, 2]", b"")), r"not a JSON object"),
    ("tensor named twice", _duplicate_name, r"not valid JSON \(the key '[^']+' appears twice"),
    (
        "shape not a list",
        edit_header(lambda h: h["stem.1.weight"].update(shape="4x3x7x7")),
        r"tensor 'stem\.1\.weight': malformed header entry",
    ),
    (
        "negative dimension",
        edit_header(lambda h: h["stem.1.weight"].update(shape=[-4, 3, 7, 7])),
        r"malformed header entry",
    ),
    (
        "boolean dimension",
        edit_header(lambda h: h["stem.1.bias"].update(shape=[True])),
        r"malformed header entry",
    ),
    (
        "one data offset",
        edit_header(lambda h: h["stem.1.weight"].update(data_offsets=[0])),
        r"malformed header entry",
    ),
    (
        "entry a number",
        edit_header(lambda h: h.update({"stem.1.weight": 7})),
        r"tensor 'stem\.1\.weight': malformed header entry 7",
    ),
    (
        "rank 17",
        edit_header(lambda h: h["stem.1.bias"].update(shape=[1] * 16 + [4])),
        r"malformed header entry",
    ),
    (
        "unknown dtype",
        edit_header(lambda h: h["stem.1.weight"].update(dtype="Q8")),
        r"unsupported dtype 'Q8'",
    ),
    (
        "shape edited (span mismatch)",
        edit_header(lambda h: h["stem.1.weight"].update(shape=[4, 3, 5, 5])),
        r"header says shape \[4, 3, 5, 5\] F32 \(1200 bytes\) but its data span 2352 bytes",
    ),
    ("two tensors share bytes", edit_header(_share_span), r"overlap in the data section"),
    (
        "data offsets overlap",
        edit_header(_shift(_second_tensor, -4)),
        r"overlap in the data section",
    ),
    (
        "gap in the data",
        edit_header(_shift(last_tensor, 8)),
        r"8 unused bytes before tensor",
    ),
    (
        "bytes appended",
        edit_bytes(lambda d: d + b"\0" * 16),
        r"16 unexpected bytes after the tensor data",
    ),
    (
        "__metadata__ not strings",
        edit_header(lambda h: h["__metadata__"].update(format=3)),
        r"__metadata__ must map strings to strings",
    ),
    (
        "declares 3 GiB (sparse file)",
        _huge_sparse,
        r"holds 3221225472 bytes of tensor data, more than this package loads",
    ),
]


def split_n(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_damaged_safetensors_file(tmp_path, make, pattern):
    path = make(small_checkpoint(tmp_path))
    assert_error(lambda: load_model(path), path, pattern)
    assert_error(lambda: load_checkpoint(path), path, pattern)


META_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    (
        "no metadata at all",
        edit_header(lambda h: h.pop("__metadata__")),
        rf"no '{METADATA_KEY}' entry in the safetensors metadata",
    ),
    (
        "metadata key missing",
        edit_header(lambda h: h["__metadata__"].pop(METADATA_KEY)),
        rf"no '{METADATA_KEY}' entry",
    ),
    (
        "metadata not JSON",
        edit_header(lambda h: h["__metadata__"].update({METADATA_KEY: '{"architecture": '})),
        rf"'{METADATA_KEY}' metadata is not valid JSON",
    ),
    (
        "metadata a JSON list",
        edit_header(lambda h: h["__metadata__"].update({METADATA_KEY: "[1]"})),
        r"metadata is not a JSON object",
    ),
    (
        "format_version a string",
        edit_meta(lambda m: m.update(format_version="1")),
        r"lacks an integer 'format_version'",
    ),
    (
        "format_version a boolean",
        edit_meta(lambda m: m.update(format_version=True)),
        r"lacks an integer 'format_version'",
    ),
    (
        "format_version from the future",
        edit_meta(lambda m: m.update(format_version=99)),
        r"version 99 is newer than this package reads",
    ),
    (
        "architecture missing",
        edit_meta(lambda m: m.pop("architecture")),
        r"metadata lacks 'architecture' \(a JSON string\)",
    ),
    (
        "architecture a number",
        edit_meta(lambda m: m.update(architecture=3)),
        r"metadata 'architecture' must be a JSON string, not a number",
    ),
    (
        "kwargs a list",
        edit_meta(lambda m: m.update(kwargs=[4, 2])),
        r"metadata 'kwargs' must be a JSON object, not an array",
    ),
    (
        "normalization a string",
        edit_meta(lambda m: m.update(normalization="dscm")),
        r"metadata 'normalization' must be a JSON object, not a string",
    ),
]


@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES]
)
def test_bad_metadata(tmp_path, make, pattern):
    path = make(small_checkpoint(tmp_path))
    assert_error(lambda: load_model(path), path, pattern)
    assert_error(lambda: load_checkpoint(path), path, pattern)


ARCH_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    (
        "unknown architecture",
        edit_meta(lambda m: m.update(architecture="transformer-xl")),
        r"unknown architecture 'transformer-xl'; known: .*unet",
    ),
    (
        "unknown kwarg",
        edit_meta(lambda m: m["kwargs"].update(n_heads=8)),
        r"kwargs do not build 'unet': unknown kwarg 'n_heads' \(it takes in_channels,",
    ),
    (
        "kwarg a string",
        edit_meta(lambda m: m["kwargs"].update(base_filters="4")),
        r"base_filters='4' is a str, expected an int from 1 to 8192",
    ),
    (
        "kwarg a float",
        edit_meta(lambda m: m["kwargs"].update(base_filters=4.0)),
        r"base_filters=4\.0 is a float, expected an int",
    ),
    (
        "kwarg a boolean",
        edit_meta(lambda m: m["kwargs"].update(n_down=True)),
        r"n_down=True is a bool, expected an int from 0 to 12",
    ),
    (
        "kwarg negative",
        edit_meta(lambda m: m["kwargs"].update(base_filters=-4)),
        r"base_filters=-4 is out of range",
    ),
    (
        "kwargs the constructor refuses",
        edit_meta(lambda m: m["kwargs"].update(max_filters=2)),
        r"kwargs do not build 'unet': UNetGenerator: need n_down ≥ 1 and 1 ≤ base_filters",
    ),
    (
        "kwargs of another size",
        edit_meta(lambda m: m["kwargs"].update(base_filters=8)),
        r"tensor 'stem\.1\.weight' has shape \[4, 3, 7, 7\] in the file, the architecture "
        r"expects \[8, 3, 7, 7\] \(the architecture has [\d,]+ parameters, the file [\d,]+\)",
    ),
    (
        "shape permuted (same bytes)",
        edit_header(lambda h: h["stem.1.weight"].update(shape=[3, 4, 7, 7])),
        r"'stem\.1\.weight' has shape \[3, 4, 7, 7\] in the file, the architecture expects "
        r"\[4, 3, 7, 7\]",
    ),
    (
        "tensors missing",
        edit_tensors(lambda t: (t.pop("head.1.bias"), t.pop("middle.1.weight"))),
        r"missing tensors: head\.1\.bias, middle\.1\.weight \(the architecture has",
    ),
    (
        "tensor added",
        edit_tensors(lambda t: t.update({"backdoor.weight": torch.zeros(3)})),
        r"unexpected tensors: backdoor\.weight",
    ),
    (
        "int where float expected",
        edit_tensors(lambda t: t.update({"head.1.bias": torch.zeros(3, dtype=torch.int32)})),
        r"'head\.1\.bias' is torch\.int32 in the file, the architecture expects floating-point",
    ),
    (
        "bool where float expected",
        edit_tensors(lambda t: t.update({"head.1.bias": torch.zeros(3, dtype=torch.bool)})),
        r"'head\.1\.bias' is torch\.bool in the file, the architecture expects floating-point",
    ),
]


@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in ARCH_CASES], ids=[c[0] for c in ARCH_CASES]
)
def test_file_does_not_match_its_architecture(tmp_path, make, pattern):
    path = make(small_checkpoint(tmp_path))
    assert_error(lambda: load_model(path), path, pattern)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(tmp_path, bad):
    def poison(t):
        t["down.0.1.weight"][0, 0, 1, 1] = bad

    path = edit_tensors(poison)(small_checkpoint(tmp_path))
    pattern = r"tensor 'down\.0\.1\.weight' has 1 NaN/inf value\(s\)"
    assert_error(lambda: load_model(path), path, pattern)
    assert_error(lambda: load_checkpoint(path), path, pattern)


def test_float_where_int_expected(tmp_path):
    path = small_checkpoint(tmp_path, "despeckle")
    name = "net.0.2.num_batches_tracked"  # a BatchNorm counter, int64
    path = edit_tensors(lambda t: t.update({name: t[name].float()}))(path)
    pattern = rf"'{name}' is torch\.float32 in the file, the architecture expects integer"
    assert_error(lambda: load_model(path), path, pattern)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_load_as_the_model_dtype(tmp_path, dtype):
    """Accepted edge case: a model saved in another float dtype loads, cast to float32."""
    path = small_checkpoint(tmp_path)
    original = load_file(str(path))
    path = edit_tensors(lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))(path)
    model = load_model(path)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, original[name].to(dtype).float()), name


def test_float64_beyond_float32_range(tmp_path):
    def blow_up(t):
        for k in list(t):
            t[k] = t[k].double()
        t["head.1.bias"][0] = 1e300  # finite in float64, inf in float32

    path = edit_tensors(blow_up)(small_checkpoint(tmp_path))
    load_checkpoint(path)  # the file itself is finite
    pattern = r"tensor 'head\.1\.bias' has values too large for torch\.float32"
    assert_error(lambda: load_model(path), path, pattern)


def test_dtype_argument_that_overflows(tmp_path):
    path = edit_tensors(lambda t: t["head.1.bias"].fill_(1e6))(small_checkpoint(tmp_path))
    assert load_model(path, dtype="bf16").head[1].bias.dtype == torch.bfloat16  # 1e6 fits
    pattern = r"'head\.1\.bias' has values too large for torch\.float16"
    assert_error(lambda: load_model(path, dtype="fp16"), path, pattern)


@pytest.mark.parametrize("name", sorted(OTHER_SIZE))
def test_every_architecture_checks_shapes_against_the_header(tmp_path, name):
    path = edit_meta(lambda m: m["kwargs"].update(OTHER_SIZE[name]))(
        small_checkpoint(tmp_path, name)
    )
    assert_error(lambda: load_model(path), path, SHAPE_MISMATCH)


def test_every_registered_architecture_is_covered():
    assert set(SMALL) == set(OTHER_SIZE) == set(available_models())


def test_registered_variant_kwargs_need_declared_limits(tmp_path, monkeypatch):
    """Training code may register its own classes; their extra kwargs need a declared rule."""
    from napari_confocal_stain.models import ModelSpec, registry
    from napari_confocal_stain.models.generators import UNetGenerator

    class WideUNet(UNetGenerator):
        def __init__(self, widen: int = 1) -> None:
            super().__init__(base_filters=4 * widen, n_down=2)
            self.config = {"widen": widen}

    spec = ModelSpec("wide-unet", WideUNet, {"widen": 1})
    monkeypatch.setitem(registry._REGISTRY, "wide-unet", spec)
    monkeypatch.setitem(registry._CANONICAL, WideUNet, "wide-unet")
    with pytest.raises(CheckpointError, match=r"kwarg 'widen' has no declared limits"):
        save_checkpoint(tmp_path / "w.safetensors", WideUNet(widen=2))
    spec = ModelSpec("wide-unet", WideUNet, {"widen": 1}, limits={"widen": IntRange(1, 4)})
    monkeypatch.setitem(registry._REGISTRY, "wide-unet", spec)
    path = save_checkpoint(tmp_path / "w.safetensors", WideUNet(widen=2))
    assert load_model(path).config == {"widen": 2}
    path = edit_meta(lambda m: m["kwargs"].update(widen=10**6))(path)
    assert_error(
        lambda: load_model(path),
        path,
        r"widen=1000000 is out of range, expected an int from 1 to 4",
    )


def test_non_persistent_buffers_keep_their_constructor_values(tmp_path, monkeypatch):
    """A buffer the file does not hold is built for real, not left empty from the meta model."""
    from napari_confocal_stain.models import ModelSpec, registry
    from napari_confocal_stain.models.generators import AffineGenerator

    class Scaled(AffineGenerator):
        def __init__(self, in_channels: int = 3, out_channels: int = 3) -> None:
            super().__init__(in_channels, out_channels)
            self.register_buffer("scale", torch.arange(1.0, 4.0), persistent=False)

    monkeypatch.setitem(registry._REGISTRY, "scaled", ModelSpec("scaled", Scaled))
    monkeypatch.setitem(registry._CANONICAL, Scaled, "scaled")
    path = save_checkpoint(tmp_path / "s.safetensors", Scaled())
    loaded = load_model(path)
    assert torch.equal(loaded.scale, torch.arange(1.0, 4.0))
    assert torch.equal(loaded.conv.weight, Scaled().conv.weight)  # the identity start


def test_save_refuses_kwargs_it_could_not_load(tmp_path):
    model = build_model("resnet", base_filters=1, n_down=0, n_blocks=257)
    target = tmp_path / "deep.safetensors"
    with pytest.raises(CheckpointError, match=r"save_checkpoint: .*n_blocks=257 is out of range"):
        save_checkpoint(target, model)
    assert not target.exists()


# ------------------------------------------------------------------------------ paths


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    assert_error(lambda: load_model(path), path, r": checkpoint file not found$")
    assert_error(lambda: load_checkpoint(path), path, r": checkpoint file not found$")
    below = tmp_path / "plain.txt"
    below.write_text("x")
    path = below / "model.safetensors"
    assert_error(lambda: load_model(path), path, r"not found \(a folder in its path is a file\)")


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt", "weights"])
def test_directory_given_as_the_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    assert_error(lambda: load_model(path), path, r": is a directory, not a file$")
    assert_error(lambda: load_model(str(path)), path, r": is a directory, not a file$")


def test_symlink_loop_and_dangling_link(tmp_path, monkeypatch):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    assert_error(lambda: load_model(a), a, r"symbolic link loop")
    assert_error(lambda: load_model(str(a)), a, r"symbolic link loop")
    monkeypatch.chdir(tmp_path)
    Path("loop").symlink_to("loop")  # a bare name that exists is a path, not a bundled name
    assert_error(lambda: load_model("loop"), Path("loop"), r"symbolic link loop")
    dangling = tmp_path / "gone.pt"
    dangling.symlink_to(tmp_path / "deleted.pt")
    pattern = r"symbolic link to a missing file \(.*deleted\.pt\)"
    assert_error(lambda: load_model(dangling, architecture="unet"), dangling, pattern)


def test_device_file_and_fifo_are_not_read(tmp_path):
    path = Path("/dev/zero")  # endless: reading it would never finish
    assert_error(lambda: load_model(path), path, r"not a regular file")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_model(fifo)
        except BaseException as exc:  # reported to the main thread
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)  # open() of a FIFO blocks for a writer
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "load_model blocked on a FIFO"
    assert isinstance(outcome[0], CheckpointError)
    assert str(outcome[0]) == f"{fifo}: not a regular file (a device, pipe or socket)"


PERMISSION_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.inference import load_model
for path in sys.argv[2:]:
    try:
        load_model(path)
        print(f"{path}: loaded")
    except CheckpointError as exc:
        print(exc)
"""


def test_permission_denied(tmp_path):
    path = small_checkpoint(tmp_path)
    path.chmod(0)
    locked = tmp_path / "locked"  # a folder that cannot be searched
    locked.mkdir()
    inside = small_checkpoint(locked)
    locked.chmod(0)
    expected = [f"{p}: permission denied: the checkpoint cannot be read" for p in (path, inside)]
    if os.geteuid() != 0:
        assert_error(lambda: load_model(path), path, r": permission denied")
        assert_error(lambda: load_model(inside), inside, r": permission denied")
        return
    # Root reads any file through its DAC-override capabilities: load in a child process that
    # stays root but has them dropped from its capability bounding set.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to be denied a read")
    run = subprocess.run(
        [
            setpriv,
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-c",
            PERMISSION_SCRIPT,
            str(ROOT),
            str(path),
            str(inside),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    locked.chmod(0o700)  # let pytest clean up
    if run.returncode != 0 and "setpriv" in run.stderr:
        pytest.skip(f"running as root and cannot drop capabilities: {run.stderr.strip()}")
    assert run.stdout.strip().splitlines() == expected, run.stderr[-2000:]


# ------------------------------------------------------------------------------ legacy files


class Payload:
    """A pickle that runs ``os.mkdir(marker)`` when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def legacy_raw_pickle(path: Path, numel: int, stored: int) -> Path:
    """A pre-zip torch.save file: one storage declaring ``numel`` floats, holding ``stored``."""
    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    f = io.BytesIO()
    for header in (
        0x1950A86A20F9469CFC6C,  # torch's legacy magic number
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}},
    ):
        pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump({"stem.1.bias": marker})
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel) + b"\0" * 4 * stored)
    path.write_bytes(f.getvalue())
    return path


def _zip_with(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def test_legacy_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = build_model("unet", **SMALL["unet"]).state_dict()
    torch.save({"state_dict": state, "hook": Payload(marker)}, evil)
    pattern = (
        r"refused: not a plain tensor state dict .*GLOBAL posix\.mkdir.*; nothing in it was run$"
    )
    assert_error(
        lambda: load_model(evil, architecture="unet", kwargs=SMALL["unet"]), evil, pattern
    )
    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    assert_error(lambda: load_model(raw, architecture="unet"), raw, r"refused: .*mkdir")
    assert not marker.exists()
    pickle.loads(raw.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.is_dir()


LEGACY_CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("empty .pt", lambda good: b"", r"empty file \(0 bytes\)"),
    (
        "zip with garbage",
        lambda good: _zip_with(
            {"archive/data.pkl": b"garbage garbage", "archive/version": b"3\n"}
        ),
        r"refused: not a plain tensor state dict .*Unsupported operand",
    ),
    (
        "zip truncated",
        lambda good: good.read_bytes()[: good.stat().st_size // 2],
        r"truncated PyTorch zip file",
    ),
    (
        "zip bomb (64 MiB deflated to 64 kB)",
        lambda good: _zip_with({"archive/data/0": bytes(2**26)}, zipfile.ZIP_DEFLATED),
        r"its zip members expand to 67108864 bytes from a \d+-byte file: not a torch\.save",
    ),
    (
        "plain text",
        lambda good: b"these are not the weights you are looking for",
        r"not a PyTorch file \(neither a zip archive nor a pickle\)$",
    ),
    (
        "pre-zip file cut in its pickle",
        lambda good: _pre_zip()[:100],
        r": truncated: the file ends",
    ),
    (
        "pre-zip file cut in its data",
        lambda good: _pre_zip()[:-100],
        r": truncated: the file ends",
    ),
    ("not a dict of tensors", lambda good: _torch_bytes([1, 2, 3]), r"does not hold a state dict"),
]


def _pre_zip() -> bytes:
    """A real pre-zip (legacy pickle stream) torch.save file."""
    out = io.BytesIO()
    state = build_model("unet", **SMALL["unet"]).state_dict()
    torch.save(state, out, _use_new_zipfile_serialization=False)
    return out.getvalue()


def _torch_bytes(obj) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in LEGACY_CASES], ids=[c[0] for c in LEGACY_CASES]
)
def test_damaged_legacy_file(tmp_path, make, pattern):
    good = tmp_path / "good.pt"
    torch.save(build_model("unet", **SMALL["unet"]).state_dict(), good)
    path = tmp_path / "bad.pt"
    path.write_bytes(make(good))
    assert_error(
        lambda: load_model(path, architecture="unet", kwargs=SMALL["unet"]), path, pattern
    )


def test_legacy_checked_against_the_architecture(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(build_model("unet", **SMALL["unet"]).state_dict(), path)
    pattern = r"'stem\.1\.weight' has shape \[4, 3, 7, 7\] in the file, .* \[8, 3, 7, 7\]"
    assert_error(
        lambda: load_model(path, architecture="unet", kwargs={"base_filters": 8, "n_down": 2}),
        path,
        pattern,
    )
    pattern = r"kwargs do not build 'resnet': n_blocks=1000000 is out of range"
    assert_error(
        lambda: load_model(path, architecture="resnet", kwargs={"n_blocks": 10**6}), path, pattern
    )
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(small_checkpoint(tmp_path).read_bytes())
    pattern = r"not a PyTorch file .*it looks like a safetensors file: name it \.safetensors"
    assert_error(lambda: load_model(renamed, architecture="unet"), renamed, pattern)


# ---------------------------------------------------------------- declared-huge, memory capped

CAP = 6 << 30
# (architecture, kwargs written into a real small checkpoint's metadata, expected message)
HUGE_CASES: list[tuple[str, dict, str]] = [
    ("affine", {"in_channels": 10**6}, r"in_channels=1000000 is out of range"),
    ("resnet", {"n_blocks": 10**6}, r"n_blocks=1000000 is out of range"),
    ("resnet", {"base_filters": 9000}, r"base_filters=9000 is out of range"),
    ("resnet", {"base_filters": 8192, "n_down": 12, "n_blocks": 256}, r"missing tensors: .*e\+"),
    ("resnet-thesis", {"n_down": 10**9}, r"n_down=1000000000 is out of range"),
    ("resnet-thesis", {"base_filters": 8192, "n_blocks": 1}, SHAPE_MISMATCH),
    ("unet", {"base_filters": 9000, "max_filters": 9000}, r"base_filters=9000 is out of range"),
    ("unet", {"base_filters": 8192, "max_filters": 8192, "n_down": 12}, r"missing tensors"),
    ("unet-light", {"base_filters": 4096, "max_filters": 8192}, SHAPE_MISMATCH),
    ("light", {"channels": [9000] * 4}, r"channels=\[9000, .* is not a list of 2 to 13 ints"),
    ("light", {"channels": [8] * 100_000}, r"channels=.* has 100000 entries"),
    ("light", {"n_blocks": 10**9}, r"n_blocks=1000000000 is out of range"),
    ("light", {"channels": [8192] * 13, "n_blocks": 256}, r"missing tensors"),
    ("fast", {"channels": [9000] * 4}, r"channels=\[9000, .* is not a list of 2 to 13 ints"),
    ("fast", {"n_blocks": 10**9}, r"n_blocks=1000000000 is out of range"),
    ("fast", {"channels": [8192] * 13, "n_blocks": 256}, r"missing tensors"),
    ("patchgan", {"base_filters": 9000}, r"base_filters=9000 is out of range"),
    ("patchgan", {"n_layers": 10**6}, r"n_layers=1000000 is out of range"),
    ("patchgan", {"base_filters": 8192, "n_layers": 12}, r"missing tensors"),
    ("despeckle", {"layers": 10**9}, r"layers=1000000000 is out of range"),
    ("despeckle", {"filters": 8192, "layers": 256}, r"missing tensors"),
    ("despeckle-thesis", {"filters": 9000}, r"filters=9000 is out of range"),
    ("despeckle-combalia", {"filters": 8192, "kernel": 31}, SHAPE_MISMATCH),
    ("despeckle-dilated", {"dilation": [10**9] * 3}, r"dilation=.* is not an int from 1 to 64"),
    ("despeckle-dilated", {"layers": 256, "filters": 8192, "dilation": 64}, r"missing tensors"),
]

HUGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    sys.path.insert(0, sys.argv[1])
    from napari_confocal_stain.errors import CheckpointError
    from napari_confocal_stain.inference import load_model

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = []
    for case in json.load(open(sys.argv[2])):
        start = time.perf_counter()
        try:
            load_model(case.pop("path"), device="cpu", **case)
            outcome = ["loaded", ""]
        except CheckpointError as exc:
            outcome = ["CheckpointError", str(exc)]
        except BaseException as exc:
            outcome = [type(exc).__name__, str(exc)[:500]]
        results.append(outcome + [time.perf_counter() - start])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # the cap is real: this much cannot be had
        bytearray({cap})
        capped = False
    except MemoryError:
        capped = True
    print(json.dumps({{"results": results, "growth_kb": peak - base, "capped": capped}}))
    """
).format(cap=CAP)


@pytest.fixture(scope="module")
def huge_runs(tmp_path_factory) -> tuple[list[tuple[Path, str]], dict]:
    """Write every declared-huge file, load them all in one memory-capped subprocess."""
    folder = tmp_path_factory.mktemp("huge")
    cases, expected = [], []
    for i, (name, kwargs, pattern) in enumerate(HUGE_CASES):
        sub = folder / str(i)
        sub.mkdir()
        path = edit_meta(lambda m, kw=kwargs: m["kwargs"].update(kw))(small_checkpoint(sub, name))
        cases.append({"path": str(path)})
        expected.append((path, pattern))
    # The reported case: the bundled 7 MB U-Net told it has 9000 (or an in-range 4096) filters.
    for kwargs, pattern in [
        ({"base_filters": 9000, "max_filters": 9000}, r"base_filters=9000 is out of range"),
        ({"base_filters": 4096, "max_filters": 8192}, SHAPE_MISMATCH),
    ]:
        path = folder / f"stain-unet-{kwargs['base_filters']}.safetensors"
        path.write_bytes((WEIGHTS_DIR / "stain-unet.safetensors").read_bytes())
        edit_meta(lambda m, kw=kwargs: m["kwargs"].update(kw))(path)
        cases.append({"path": str(path)})
        expected.append((path, pattern))
    # A legacy pickle declaring a 20 GB storage in 300 bytes; caller kwargs out of range.
    legacy = legacy_raw_pickle(folder / "legacy-huge.pt", numel=5 * 10**9, stored=3)
    cases.append({"path": str(legacy), "architecture": "unet", "kwargs": SMALL["unet"]})
    expected.append((legacy, r"declares more tensor data than can be allocated|truncated"))
    cases.append({"path": str(legacy), "architecture": "light", "kwargs": {"n_blocks": 10**9}})
    expected.append((legacy, r"kwargs do not build 'light': n_blocks=1000000000 is out of range"))

    spec = folder / "cases.json"
    spec.write_text(json.dumps(cases))
    run = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT, str(ROOT), str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return expected, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(HUGE_CASES) + 4))
def test_declared_huge_checkpoint_fails_fast_in_bounded_memory(huge_runs, index):
    expected, report = huge_runs
    path, pattern = expected[index]
    kind, message, seconds = report["results"][index]
    assert kind == "CheckpointError", message
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(pattern, message), message
    assert seconds < 10, f"{seconds:.1f} s"


def test_declared_huge_checkpoints_allocate_nothing_big(huge_runs):
    _, report = huge_runs
    assert report["capped"], "RLIMIT_AS did not cap the subprocess"
    # Building any of these architectures for real would take gigabytes.
    assert report["growth_kb"] < 512 * 1024, report["growth_kb"]


def test_huge_cases_cover_every_architecture_with_size_kwargs():
    sized = {
        name
        for name in available_models()
        if any(
            isinstance(KWARG_LIMITS.get(k), (IntRange, IntList))
            for k in inspect.signature(model_spec(name).cls).parameters
        )
    }
    assert sized == {name for name, _, _ in HUGE_CASES}
