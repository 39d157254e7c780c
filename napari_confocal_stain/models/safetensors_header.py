"""Read and check a safetensors header without reading any tensor.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then
the tensor data. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the data section) and may hold ``"__metadata__"``, a string → string map.
Everything a loader needs to decide whether to go on (names, shapes, dtypes, how many bytes)
is in those ``n`` bytes, so a file is judged before its data is read: the header length is
bounded, the tensors must tile the data section exactly (no gap, no overlap, nothing after
the last one), and the data section must be exactly as long as the file says, which tells a
truncated file from a tampered one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load

from napari_confocal_stain.errors import CheckpointError

__all__ = [
    "MAX_DATA_BYTES",
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorEntry",
    "read_header",
    "read_tensors",
]

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Longest header accepted. Ours are ~100 bytes per tensor plus a few kB of metadata: the
largest architecture the kwarg limits allow has ~2000 tensors (0.2 MB)."""
MAX_DATA_BYTES = 8 * 2**28
"""Most tensor data accepted (2 GiB: :data:`~napari_confocal_stain.models.limits.MAX_PARAMETERS`
float64 values), whatever size the file system reports for a (perhaps sparse) file."""
_MAX_RANK = 16

_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "I16": (2, torch.int16),
    "U16": (2, getattr(torch, "uint16", None)),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32),
    "I64": (8, torch.int64),
    "U64": (8, getattr(torch, "uint64", None)),
    "F64": (8, torch.float64),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header.

    Attributes
    ----------
    header_bytes
        ``n``, the length of the JSON header.
    data_bytes
        Length of the data section (the file size minus ``8 + n``).
    tensors
        Each tensor's entry, by name.
    metadata
        The ``__metadata__`` map, or None.
    raw
        The header's JSON bytes as read (to notice a file that changes before its data is read).
    """

    header_bytes: int
    data_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    raw: bytes


def _fail(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json: a repeated key is an error, not a silent overwrite."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pickle_hint(start: bytes) -> str:
    # Only consulted once parsing failed: a valid header length may also start with these bytes.
    if start[:2] == b"PK" or start[:1] == b"\x80":
        return (
            "; it looks like a PyTorch pickle/zip file: name it .pt and call load_model(path, "
            "architecture=..., kwargs=...), which reads it with weights_only=True"
        )
    return ""


def read_header(f: BinaryIO, size: int, path: str | Path) -> SafetensorsHeader:
    """Read and check the header of the safetensors file ``f`` (``size`` bytes long).

    Only the header is read. Every problem is a :class:`CheckpointError` naming ``path``.
    """
    n, raw, header = _header_json(f, size, path)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(path, "safetensors __metadata__ must map strings to strings")
    tensors = {name: _entry(name, entry, path) for name, entry in header.items()}
    data_bytes = size - 8 - n
    _check_data_layout(tensors, data_bytes, path)
    return SafetensorsHeader(n, data_bytes, tensors, metadata, raw)


def _header_json(f: BinaryIO, size: int, path: str | Path) -> tuple[int, bytes, dict]:
    """The header's length, raw bytes and parsed JSON object (bounded, checked)."""
    f.seek(0)
    start = f.read(8)
    hint = _pickle_hint(start)
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not a checkpoint")
    if size < 8:
        raise _fail(path, f"not a safetensors file (only {size} bytes){hint}")
    n = int.from_bytes(start, "little")
    if n > MAX_HEADER_BYTES or n < 2:
        raise _fail(
            path,
            f"not a safetensors file: its header length field reads {n} bytes (a header is "
            f"2 to {MAX_HEADER_BYTES} bytes){hint}",
        )
    raw = f.read(n)
    if len(raw) < n:
        looks_like_one = raw[:1] == b"{"
        raise _fail(
            path,
            ("truncated" if looks_like_one else "truncated or not a safetensors file")
            + f": the header needs {n} bytes, only {len(raw)} follow its length field{hint}",
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(
            path, f"not a safetensors file: its header is not valid JSON ({exc}){hint}"
        ) from None
    if not isinstance(header, dict):
        raise _fail(path, f"not a safetensors file: its header is not a JSON object{hint}")
    return n, raw, header


def _entry(name: str, entry: Any, path: str | Path) -> TensorEntry:
    """One tensor's header entry, checked: dtype known, shape and span consistent."""
    try:
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        begin, end = offsets
        ok = (
            isinstance(code, str)
            and isinstance(shape, list)
            and len(shape) <= _MAX_RANK
            and all(_is_count(s) for s in shape)
            and _is_count(begin)
            and _is_count(end)
            and begin <= end
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _fail(path, f"tensor {name!r}: malformed header entry {_short(entry)}")
    if code not in _DTYPES or _DTYPES[code][1] is None:
        raise _fail(path, f"tensor {name!r}: unsupported dtype {_short(code)}")
    itemsize, dtype = _DTYPES[code]
    need = math.prod(shape) * itemsize
    if end - begin != need:
        raise _fail(
            path,
            f"tensor {name!r}: header says shape {list(shape)} {code} ({need} bytes) but "
            f"its data span {end - begin} bytes — header edited or file corrupt",
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_data_layout(tensors: dict[str, TensorEntry], data_bytes: int, path: str | Path) -> None:
    """The tensors must tile the data section exactly, and it must be of a loadable size.

    Sorted by offset, each starts where the previous one ended (safetensors itself refuses
    gaps; an overlap would alias two tensors).
    """
    expected_end = 0
    previous = None
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin < expected_end:
            raise _fail(
                path,
                f"tensors {previous.name!r} and {entry.name!r} overlap in the data section "
                f"(bytes {previous.begin}–{previous.end} and {entry.begin}–{entry.end}): "
                f"header edited or file corrupt",
            )
        if entry.begin > expected_end:
            raise _fail(
                path,
                f"{entry.begin - expected_end} unused bytes before tensor {entry.name!r} in the "
                f"data section: header edited or file corrupt",
            )
        expected_end = entry.end
        previous = entry
    if expected_end > data_bytes:
        raise _fail(
            path,
            f"truncated: tensor data should be {expected_end} bytes, only {data_bytes} are "
            f"present",
        )
    if expected_end < data_bytes:
        raise _fail(
            path,
            f"{data_bytes - expected_end} unexpected bytes after the tensor data (its header "
            f"accounts for {expected_end}): file corrupt or appended to",
        )
    if data_bytes > MAX_DATA_BYTES:
        raise _fail(
            path,
            f"holds {data_bytes} bytes of tensor data, more than this package loads "
            f"({MAX_DATA_BYTES})",
        )


def read_tensors(
    f: BinaryIO, header: SafetensorsHeader, path: str | Path
) -> dict[str, torch.Tensor]:
    """Read the tensors of a file whose header :func:`read_header` accepted, on the CPU."""
    n = header.header_bytes
    size = 8 + n + header.data_bytes
    f.seek(0)
    blob = f.read(size)
    if len(blob) != size:
        raise _fail(path, f"truncated while being read: {len(blob)} of {size} bytes")
    if int.from_bytes(blob[:8], "little") != n or blob[8 : 8 + n] != header.raw:
        raise _fail(path, "the file changed while being read")
    try:
        # safetensors checks the layout again and builds exactly the tensors the file stores.
        tensors = _st_load(blob)
    except SafetensorError as exc:
        raise _fail(path, f"corrupt safetensors file: {exc}") from None
    if set(tensors) != set(header.tensors) or any(
        tuple(t.shape) != header.tensors[k].shape or t.dtype != header.tensors[k].dtype
        for k, t in tensors.items()
    ):
        raise _fail(path, "the file changed while being read")
    return tensors
