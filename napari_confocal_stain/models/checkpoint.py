"""Model checkpoints: safetensors weights plus a JSON description, never pickles.

A checkpoint is a safetensors file (tensors + a string→string header) whose header metadata
holds one key, ``"napari_confocal_stain"``, with a JSON object:

``format_version``   int, :data:`FORMAT_VERSION` when written
``package_version``  napari-confocal-stain version that wrote it
``torch_version``    torch version that wrote it
``architecture``     registry name (see :func:`~napari_confocal_stain.models.available_models`)
``kwargs``           constructor kwargs: ``build_model(architecture, **kwargs)`` rebuilds it
``normalization``    the input the model expects, e.g. ``{"input": "dscm", "range": [-1, 1]}``
``training``         free-form training summary (dataset, epochs, losses …) or null
``extra``            anything else the writer wants to keep, or null
``n_parameters``     parameter count, for listings

The file decides nothing about how much memory loading takes. :func:`read_model` reads only
the safetensors header first (see :mod:`~napari_confocal_stain.models.safetensors_header`) and
checks it; checks the architecture name and each kwarg's type and range (see
:mod:`~napari_confocal_stain.models.limits`); builds the architecture on the ``meta`` device,
which allocates nothing, and compares its tensor names, shapes and dtypes with the header's
(the message names the tensor and both shapes); and only then reads the tensors, checks they
are finite and builds the real model. Nothing in the file is ever executed. Legacy ``.pt`` /
``.pth`` files are read only with ``torch.load(..., weights_only=True)``, which refuses
anything but tensors and plain containers, and need the architecture from the caller.

Every problem with the file is one :class:`~napari_confocal_stain.errors.CheckpointError`,
``"<path>: <what is wrong>"``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as _st_save
from torch import nn

from napari_confocal_stain._fs import write_atomic as _write_atomic
from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.models.limits import MAX_PARAMETERS
from napari_confocal_stain.models.registry import (
    ModelSpec,
    architecture_of,
    available_models,
    build_model,
    checked_kwargs,
    model_spec,
)
from napari_confocal_stain.models.safetensors_header import (
    MAX_DATA_BYTES,
    read_header,
    read_tensors,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "WEIGHTS_DIR",
    "available_weights",
    "checkpoint_path",
    "known_limits",
    "load_checkpoint",
    "read_metadata",
    "read_model",
    "save_checkpoint",
]

FORMAT_VERSION = 1
"""Version of the metadata layout written by :func:`save_checkpoint`."""
METADATA_KEY = "napari_confocal_stain"
"""The safetensors header metadata key holding our JSON description."""
WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Bundled weight files, ``<name>.safetensors``, loadable by name."""
LEGACY_SUFFIXES = (".pt", ".pth")

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
_MAX_LISTED = 8


def _fail(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _names(names: list[str] | set[str]) -> str:
    """At most a few tensor names, sorted, for an error message."""
    names = sorted(names)
    more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _json_dict(value: Any, what: str) -> dict[str, Any] | None:
    """``value`` as a plain JSON-able dict (tuples become lists), or None."""
    if value is None:
        return None
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be a JSON-serialisable dict: {exc}") from None


def available_weights() -> tuple[str, ...]:
    """Names of the bundled weight files (``models/weights/<name>.safetensors``), sorted."""
    if not WEIGHTS_DIR.is_dir():
        return ()
    return tuple(sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors")))


# ---------------------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    architecture: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    normalization: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and description to a safetensors file, atomically.

    Parameters
    ----------
    path
        Destination (conventionally ``*.safetensors``). The file appears complete or not at all:
        it is written to a temporary name in the same folder, then renamed.
    model
        A registered architecture (see :func:`~napari_confocal_stain.models.available_models`).
    architecture
        Registry name to record; default: the canonical name of ``model``'s class.
    kwargs
        Constructor kwargs to record; default: ``model.config`` (set by every model here).
    normalization
        Input normalisation, e.g. ``{"input": "dscm", "range": [-1, 1]}`` or
        ``{"input": "reflectance", "range": [0, 1]}``; default: the architecture's.
    training
        Training summary (JSON-serialisable), e.g. dataset, epochs, final losses.
    extra
        Anything else JSON-serialisable.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CheckpointError
        Unknown architecture, a class that does not match it, kwargs that do not rebuild
        ``model``'s tensors, non-JSON metadata, or non-finite weights.
    """
    path = Path(path)
    architecture, spec = _saved_architecture(model, architecture)
    if kwargs is None:
        kwargs = getattr(model, "config", None)
        if kwargs is None:
            raise CheckpointError("save_checkpoint: pass kwargs= (the model has no .config)")
    kwargs = _json_dict(kwargs, "save_checkpoint: kwargs")
    normalization = _json_dict(
        spec.normalization if normalization is None else normalization,
        "save_checkpoint: normalization",
    )

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The recorded kwargs must rebuild these exact tensors within the loader's limits, or the
    # file could never be loaded.
    _, rebuilt = _expected_state("save_checkpoint", architecture, kwargs)
    _check_tensors("save_checkpoint", rebuilt.state_dict(), state)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"save_checkpoint: tensor {name!r} has NaN or inf values")

    from napari_confocal_stain import __version__

    meta = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "architecture": architecture,
        "kwargs": kwargs,
        "normalization": normalization,
        "training": _json_dict(training, "save_checkpoint: training"),
        "extra": _json_dict(extra, "save_checkpoint: extra"),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    blob = _st_save(state, metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    _write_atomic(path, blob)
    return path


def _saved_architecture(model: nn.Module, architecture: str | None) -> tuple[str, Any]:
    """The registry name to record for ``model`` and its spec (checked against its class)."""
    if architecture is None:
        try:
            architecture = architecture_of(model)
        except KeyError as exc:
            raise CheckpointError(f"save_checkpoint: {exc.args[0]}") from None
    try:
        spec = model_spec(architecture)
    except KeyError as exc:
        raise CheckpointError(f"save_checkpoint: {exc.args[0]}") from None
    if not isinstance(model, spec.cls):
        raise CheckpointError(
            f"save_checkpoint: architecture {architecture!r} is a {spec.cls.__name__}, "
            f"but the model is a {type(model).__name__}"
        )
    return architecture, spec


# ---------------------------------------------------------------------------------------- load


def _os_problem(path: Path, exc: OSError) -> str:
    """What an OSError from opening or reading ``path`` means, in words."""
    code = exc.errno
    if code == errno.ENOENT:
        if os.path.islink(path):
            return f"symbolic link to a missing file ({os.readlink(path)})"
        return "checkpoint file not found"
    if code == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links), not a file"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied: the checkpoint cannot be read"
    if code == errno.ENOTDIR:
        return "checkpoint file not found (a folder in its path is a file)"
    if code == errno.EISDIR:
        return "is a directory, not a file"
    return f"cannot be read: {exc.strerror or exc}"


@contextmanager
def _open_checkpoint(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """The regular file at ``path`` open for reading, and its size; any OS error as one line.

    A FIFO, device or directory is refused before it is read (``/dev/zero`` never ends; a FIFO
    would block ``open`` until a writer comes).
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _fail(path, _os_problem(path, exc)) from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(path, "is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(path, "not a regular file (a device, pipe or socket)")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _fail(path, _os_problem(path, exc)) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)  # the file opened, whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise _fail(path, "not a regular file (a device, pipe or socket)")
        try:
            yield f, info.st_size
        except OSError as exc:
            raise _fail(path, _os_problem(path, exc)) from None


def _check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise _fail(path, f"tensor {name!r} has {bad} NaN/inf value(s)")


def _type_name(value: Any) -> str:
    """The JSON type of a parsed value, with its article: "an array", "a number" …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _parse_meta(path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """The JSON description from the header metadata, with its required fields checked."""
    if not metadata or METADATA_KEY not in metadata:
        raise _fail(
            path,
            f"no {METADATA_KEY!r} entry in the safetensors metadata (not written by "
            f"save_checkpoint); for foreign weights call load_model(path, architecture=..., "
            f"kwargs=...)",
        )
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"the {METADATA_KEY!r} metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "metadata lacks an integer 'format_version'")
    if version > FORMAT_VERSION:
        raise _fail(
            path,
            f"checkpoint format version {version} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade napari-confocal-stain",
        )
    for key, kind, name in (
        ("architecture", str, "string"),
        ("kwargs", dict, "object"),
        ("normalization", dict, "object"),
    ):
        if key not in meta:
            raise _fail(path, f"metadata lacks {key!r} (a JSON {name})")
        if not isinstance(meta[key], kind):
            raise _fail(
                path,
                f"metadata {key!r} must be a JSON {name}, not {_type_name(meta[key])}",
            )
    return meta


def read_metadata(name_or_path: str | Path) -> dict[str, Any]:
    """A checkpoint's package metadata (architecture, kwargs, training, extra, …), header only.

    Parameters
    ----------
    name_or_path
        A bundled weight name or a ``.safetensors`` path.

    Returns
    -------
    dict
        The JSON description :func:`save_checkpoint` wrote, plus ``"path"``.

    Raises
    ------
    CheckpointError
        The file is missing, unreadable, not a safetensors checkpoint of this package, or its
        header is damaged (one line naming the file). No tensor is read.
    """
    path = checkpoint_path(name_or_path)
    with _open_checkpoint(path) as (f, size):
        header = read_header(f, size, path)
    return {**_parse_meta(path, header.metadata), "path": str(path)}


KNOWN_LIMITS_KEY = "known_limits"
"""Key in a checkpoint's ``extra`` metadata: the model card's known limits, one line each."""


def known_limits(model_or_meta: Any) -> list[str]:
    """The known limits a checkpoint's model card declares (``extra.known_limits``).

    Parameters
    ----------
    model_or_meta
        A loaded model (its ``checkpoint_meta``) or a metadata dict (:func:`read_metadata`).

    Returns
    -------
    list of str
        One sentence each, in the card's order; empty when the file declares none (or
        declares them in a shape other than a list of strings).
    """
    meta = getattr(model_or_meta, "checkpoint_meta", model_or_meta)
    extra = meta.get("extra") if isinstance(meta, Mapping) else None
    limits = extra.get(KNOWN_LIMITS_KEY) if isinstance(extra, Mapping) else None
    if not isinstance(limits, list):
        return []
    return [str(x) for x in limits if isinstance(x, str) and x.strip()]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path
        A ``.safetensors`` checkpoint.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        The tensors, on the CPU, all finite.
    meta : dict
        The JSON description (see the module docstring).

    Raises
    ------
    CheckpointError
        Missing file, not safetensors, truncated, inconsistent header, missing or invalid
        metadata JSON, NaN/inf weights.
    """
    path = Path(path)
    with _open_checkpoint(path) as (f, size):
        header = read_header(f, size, path)
        meta = _parse_meta(path, header.metadata)
        tensors = read_tensors(f, header, path)
    _check_finite(path, tensors)
    return tensors, meta


def _expected_state(
    where: str | Path, architecture: Any, kwargs: Any
) -> tuple[ModelSpec, nn.Module]:
    """The architecture's spec and the model built on the meta device (no memory), kwargs checked.

    The kwargs are checked against their limits first: building on the meta device costs no
    memory but its time grows with the number of modules the kwargs ask for.
    """
    try:
        spec = model_spec(architecture)
    except (KeyError, TypeError):
        raise _fail(
            where,
            f"unknown architecture {architecture!r}; known: {', '.join(available_models())}",
        ) from None
    try:
        full = checked_kwargs(spec.name, kwargs)
        with torch.device("meta"):
            model = build_model(spec.name, **full)
    except (TypeError, ValueError) as exc:
        raise _fail(where, f"kwargs do not build {spec.name!r}: {exc}") from None
    return spec, model


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def _count(n: int) -> str:
    """A parameter count for a message: 1,234,567 or 1.2e+13."""
    return f"{n:,}" if n < 10**12 else f"{n:.1e}"


def _check_tensors(
    where: str | Path, expected: Mapping[str, Any], found: Mapping[str, Any]
) -> None:
    """Refuse unless ``found`` has exactly ``expected``'s names, shapes and dtype kinds.

    Both map names to anything with ``shape`` and ``dtype`` (tensors, meta tensors, header
    entries), so a file is judged from its header before its data is read. Also refuses an
    architecture beyond :data:`~napari_confocal_stain.models.limits.MAX_PARAMETERS`.
    """
    want_total = sum(math.prod(t.shape) for t in expected.values())
    got_total = sum(math.prod(t.shape) for t in found.values())
    totals = (
        f" (the architecture has {_count(want_total)} parameters, the file {_count(got_total)})"
        if want_total != got_total
        else ""
    )
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names(unexpected)}")
        raise _fail(where, "; ".join(parts) + totals)
    for name, want in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(want.shape):
            raise _fail(
                where,
                f"tensor {name!r} has shape {list(got.shape)} in the file, the architecture "
                f"expects {list(want.shape)}{totals}",
            )
        if _kind(got.dtype) != _kind(want.dtype):
            raise _fail(
                where,
                f"tensor {name!r} is {got.dtype} in the file, the architecture expects "
                f"{_kind(want.dtype)} ({want.dtype})",
            )
    if want_total > MAX_PARAMETERS:
        raise _fail(
            where,
            f"the architecture has {_count(want_total)} parameters, more than this package "
            f"loads ({_count(MAX_PARAMETERS)})",
        )


def checkpoint_path(name_or_path: str | Path) -> Path:
    """The file of a bundled weight name, or a path as given (whether it can be read is
    checked when it is read).

    Raises
    ------
    CheckpointError
        A name that is neither a path nor bundled weights (the message lists them).
    """
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or os.sep in text
        or "/" in text
        or text.endswith((".safetensors", *LEGACY_SUFFIXES))
        or os.path.lexists(text)  # lexists: a broken link or a link loop is still a path
    )
    if looks_like_path:
        return Path(name_or_path).expanduser()
    path = WEIGHTS_DIR / f"{text}.safetensors"
    if path.is_file():
        return path
    bundled = available_weights()
    listing = ", ".join(bundled) if bundled else f"none ({WEIGHTS_DIR} holds no .safetensors)"
    hint = (
        f"; {text!r} is an architecture: build_model({text!r}) gives untrained weights"
        if text in available_models()
        else ""
    )
    raise CheckpointError(
        f"no bundled weights named {text!r}; bundled weights: {listing}. Pass a checkpoint "
        f"path instead{hint}"
    )


def _torch_load_problem(exc: Exception) -> str:
    """What ``torch.load(..., weights_only=True)`` failed on, in one line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, pickle.UnpicklingError) and first.startswith("Weights only load failed"):
        # The reason sits between paragraphs of advice (their wording varies by torch version).
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        reasons = [
            p.replace("WeightsUnpickler error:", "").strip()
            for p in paragraphs[1:]
            if not p.startswith(("Check the documentation", "Please file an issue", "Re-running"))
        ]
        reason = " ".join(" ".join(reasons).split()) or first
        return (
            f"refused: not a plain tensor state dict readable with weights_only=True "
            f"({reason[:300]}); nothing in it was run"
        )
    detail = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    if isinstance(exc, EOFError) or "EOF" in first:
        return f"truncated: the file ends early ({detail})"
    if "can't allocate memory" in first or isinstance(exc, MemoryError):
        # A legacy pickle states each storage's size before its bytes; torch allocates first.
        return f"declares more tensor data than can be allocated ({first[:200]})"
    return f"truncated or corrupt PyTorch file ({detail})"


def _check_legacy_zip(path: Path, f: BinaryIO, size: int) -> None:
    """Refuse a corrupt or truncated zip, or one whose members would expand beyond the limit.

    ``torch.load`` allocates each member at the size its zip entry declares and inflates
    compressed members (``torch.save`` stores them uncompressed), so a small zip could ask
    for any amount of memory.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        f.seek(0)
        # A zip's directory is at its end: a zip that starts well but has none was cut short.
        if f.read(4) == b"PK\x03\x04" and "not a zip file" in str(exc):
            raise _fail(
                path, "truncated PyTorch zip file (its zip directory is missing)"
            ) from None
        raise _fail(path, f"corrupt PyTorch zip file ({exc})") from None
    if declared > MAX_DATA_BYTES or declared > 16 * size + 2**20:
        raise _fail(
            path,
            f"its zip members expand to {declared} bytes from a {size}-byte file: not a "
            f"torch.save file",
        )
    f.seek(0)


def _load_legacy(path: Path, f: BinaryIO, size: int) -> dict[str, torch.Tensor]:
    """Read a pickle-based .pt/.pth state dict with ``weights_only=True`` only."""
    start = f.read(16)
    f.seek(0)
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not a checkpoint")
    if size > MAX_DATA_BYTES:
        raise _fail(path, f"{size} bytes, more than this package loads ({MAX_DATA_BYTES})")
    if start[:2] == b"PK":
        _check_legacy_zip(path, f, size)
    elif start[:1] != b"\x80":
        hint = (
            "; it looks like a safetensors file: name it .safetensors"
            if int.from_bytes(start[:8], "little") < size and start[8:9] == b"{"
            else ""
        )
        raise _fail(path, f"not a PyTorch file (neither a zip archive nor a pickle){hint}")
    try:
        # weights_only=True: the unpickler only builds tensors and plain containers; any other
        # global (a class, os.system …) makes it raise instead of running.
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _fail(path, _torch_load_problem(exc)) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise _fail(path, "the legacy file does not hold a state dict of named tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _caller_meta(architecture: str, kwargs: Mapping[str, Any] | None, source: str) -> dict:
    """Metadata for a file that records no architecture: what the caller told us."""
    return {
        "format_version": 0,
        "architecture": architecture,
        "kwargs": _json_dict(kwargs, "load_model: kwargs") or {},
        "normalization": None,
        "training": None,
        "extra": {"source": source},
    }


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPE_NAMES))}"
        ) from None


def read_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    architecture: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Read a checkpoint into its architecture, on the CPU, in eval mode.

    Inference code loads models through
    :func:`napari_confocal_stain.inference.device.load_model`, which also places them on a
    device.

    Parameters
    ----------
    name_or_path
        The name of a bundled weight file (``models/weights/<name>.safetensors``, see
        :func:`available_weights`) or the path of a checkpoint: a ``.safetensors`` file from
        :func:`save_checkpoint`, or a legacy ``.pt`` / ``.pth`` state dict (read with
        ``weights_only=True``; needs ``architecture``).
    dtype
        Cast floating-point weights, e.g. ``torch.float16`` or ``"bf16"``; ``None`` keeps them.
    architecture, kwargs
        Registry name and constructor kwargs for files that do not record them (legacy
        ``.pt``, foreign safetensors). For our checkpoints they may be omitted; if given they
        must agree with the file.

    Returns
    -------
    nn.Module
        In eval mode on the CPU, with a ``checkpoint_meta`` dict attribute (the file's
        metadata plus ``"path"``).

    Raises
    ------
    CheckpointError
        Any problem with the file or its match to the architecture, one line naming the file
        (and the tensor and both shapes for a mismatch). The architecture is compared with
        the file's header before any tensor is read or any real tensor is allocated.
    """
    path = checkpoint_path(name_or_path)
    target_dtype = _resolve_dtype(dtype)
    spec, model, meta, state, expected = _checked_state(path, architecture, kwargs)
    # The meta model becomes the real one: strict loading overwrites every parameter and
    # persistent buffer, so a random initialisation would be wasted work. A non-persistent
    # buffer is not in the file and needs the constructor's value: then build for real.
    held = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    if held <= set(expected):
        model = model.to_empty(device="cpu")
    else:
        model = build_model(spec.name, **meta["kwargs"])
    model.load_state_dict(state, strict=True)
    cast = target_dtype is not None or any(
        state[name].dtype != t.dtype for name, t in expected.items()
    )
    meta = {**meta, "kwargs": dict(model.config), "path": str(path)}
    if meta.get("normalization") is None:
        meta["normalization"] = dict(spec.normalization)
    model.to(dtype=target_dtype)
    if cast:  # a float64 file, or dtype=, may hold values that become inf in the model's dtype
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _fail(path, f"tensor {name!r} has values too large for {t.dtype}")
    model.eval()
    model.checkpoint_meta = meta
    return model


def _checked_state(
    path: Path, architecture: str | None, kwargs: Mapping[str, Any] | None
) -> tuple[Any, nn.Module, dict, Mapping[str, torch.Tensor], dict]:
    """Judge a checkpoint file, then read its tensors.

    Returns ``(spec, meta_model, meta, state, expected)``: the architecture's spec, the model
    built on the meta device (no memory), the file's metadata, the checked finite tensors and
    the architecture's expected state dict. Nothing is read before the header (or, for a
    legacy file, the caller's architecture) has been checked against the architecture.
    """
    header = None
    with _open_checkpoint(path) as (f, size):
        if path.suffix.lower() in LEGACY_SUFFIXES:
            if architecture is None:
                raise _fail(
                    path,
                    f"a legacy PyTorch file carries no architecture: call load_model(path, "
                    f"architecture=..., kwargs=...) with one of {', '.join(available_models())}",
                )
            meta = _caller_meta(architecture, kwargs, "legacy-pickle")
            # The caller's kwargs are checked before the file is unpickled.
            spec, model = _expected_state(path, architecture, meta["kwargs"])
            state = _load_legacy(path, f, size)
            found: Mapping[str, Any] = state
        else:
            header = read_header(f, size, path)
            meta = _header_meta(path, header, architecture, kwargs)
            # Judge the file against the architecture built on the meta device (no memory)
            # before reading its tensors or allocating the real model.
            spec, model = _expected_state(path, meta["architecture"], meta["kwargs"])
            found = header.tensors
        expected = model.state_dict()
        _check_tensors(path, expected, found)
        if header is not None:
            state = read_tensors(f, header, path)
    _check_finite(path, state)
    return spec, model, meta, state, expected


def _header_meta(
    path: Path, header: Any, architecture: str | None, kwargs: Mapping[str, Any] | None
) -> dict:
    """The package metadata of a safetensors header, agreeing with what the caller gave."""
    if architecture is not None and not (header.metadata and METADATA_KEY in header.metadata):
        return _caller_meta(architecture, kwargs, "foreign-safetensors")
    meta = _parse_meta(path, header.metadata)
    if architecture is not None and architecture != meta["architecture"]:
        raise _fail(
            path,
            f"the file is a {meta['architecture']!r} checkpoint, not {architecture!r}",
        )
    given = _json_dict(kwargs, "load_model: kwargs") or {}
    differ = {k: v for k, v in given.items() if meta["kwargs"].get(k) != v}
    if differ:
        raise _fail(path, f"the file records kwargs {meta['kwargs']}, not {differ}")
    return meta
