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

Loading rebuilds the architecture from its name and kwargs and copies the tensors in, after
checking every tensor (present, expected, same shape, floating where the model is floating,
finite). Nothing in the file is ever executed. Legacy ``.pt`` / ``.pth`` files are read only
with ``torch.load(..., weights_only=True)``, which refuses anything but tensors and plain
containers, and need the architecture from the caller.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.io.atomic import write_atomic as _write_atomic
from napari_confocal_stain.models.device import select_device
from napari_confocal_stain.models.registry import (
    architecture_of,
    available_models,
    build_model,
    model_spec,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "WEIGHTS_DIR",
    "available_weights",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "select_device",
]

FORMAT_VERSION = 1
"""Version of the metadata layout written by :func:`save_checkpoint`."""
METADATA_KEY = "napari_confocal_stain"
"""The safetensors header metadata key holding our JSON description."""
WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Bundled weight files, ``<name>.safetensors``, loadable by name."""
LEGACY_SUFFIXES = (".pt", ".pth")

# A safetensors header is a few kB per hundred tensors; anything this big is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
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
    # The recorded kwargs must rebuild these exact tensors, or the file could never be loaded.
    with torch.device("meta"):
        try:
            rebuilt = build_model(architecture, **kwargs).state_dict()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"save_checkpoint: kwargs do not build {architecture!r}: {exc}"
            ) from None
    _check_tensors("save_checkpoint", rebuilt, state)
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


# ---------------------------------------------------------------------------------------- load


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Validate the safetensors layout ourselves (for precise errors), then load the tensors."""
    if not path.exists():
        raise _fail(path, "checkpoint file not found")
    if not path.is_file():
        raise _fail(path, "not a file")
    data = path.read_bytes()
    # Only consulted once parsing failed: a valid header length may also start with these bytes.
    hint = (
        "; it looks like a PyTorch pickle/zip file: name it .pt and call load_model(path, "
        "architecture=..., kwargs=...), which reads it with weights_only=True"
        if data[:2] == b"PK" or data[:1] == b"\x80"
        else ""
    )
    if len(data) < 8:
        raise _fail(path, f"not a safetensors file (only {len(data)} bytes){hint}")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER_BYTES:
        raise _fail(path, f"not a safetensors file (header length field reads {n} bytes){hint}")
    if 8 + n > len(data):
        raise _fail(
            path,
            f"truncated or not a safetensors file: the header needs {n} bytes, only "
            f"{len(data) - 8} follow its length field{hint}",
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(
            path, f"not a safetensors file: its header is not valid JSON ({exc}){hint}"
        ) from None
    if not isinstance(header, dict):
        raise _fail(path, f"not a safetensors file: its header is not a JSON object{hint}")

    metadata = header.pop("__metadata__", None)
    data_len = len(data) - 8 - n
    end_max = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(s, int) and s >= 0 for s in shape) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _fail(path, f"tensor {name!r}: malformed header entry {entry!r}")
        if dtype not in _DTYPE_BYTES:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {dtype!r}")
        need = math.prod(shape) * _DTYPE_BYTES[dtype]
        if end - begin != need:
            raise _fail(
                path,
                f"tensor {name!r}: header says shape {list(shape)} {dtype} ({need} bytes) but "
                f"its data span {end - begin} bytes — header edited or file corrupt",
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise _fail(
            path,
            f"truncated: tensor data should be {end_max} bytes, only {data_len} are present",
        )
    try:
        tensors = _st_load(data)
    except SafetensorError as exc:
        raise _fail(path, f"corrupt safetensors file: {exc}") from None
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(path, "safetensors __metadata__ must map strings to strings")
    _check_finite(path, tensors)
    return tensors, metadata


def _check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise _fail(path, f"tensor {name!r} has {bad} NaN/inf value(s)")


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
    except json.JSONDecodeError as exc:
        raise _fail(path, f"the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"the {METADATA_KEY!r} metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise _fail(path, "metadata lacks an integer 'format_version'")
    if version > FORMAT_VERSION:
        raise _fail(
            path,
            f"checkpoint format version {version} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade napari-confocal-stain",
        )
    for key, kind in (("architecture", str), ("kwargs", dict), ("normalization", dict)):
        if not isinstance(meta.get(key), kind):
            raise _fail(path, f"metadata lacks {key!r} (a JSON {kind.__name__})")
    return meta


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
    tensors, metadata = _read_safetensors(path)
    return tensors, _parse_meta(path, metadata)


def _check_tensors(
    where: str | Path, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> None:
    """Raise naming every missing/unexpected tensor, or the first shape or dtype mismatch."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names(unexpected)}")
        raise _fail(where, "; ".join(parts))
    for name, want in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(want.shape):
            raise _fail(
                where,
                f"tensor {name!r} has shape {list(got.shape)} in the file, the architecture "
                f"expects {list(want.shape)}",
            )
        if got.is_floating_point() != want.is_floating_point():
            kind = "floating-point" if want.is_floating_point() else "integer"
            raise _fail(
                where,
                f"tensor {name!r} is {got.dtype} in the file, the architecture expects "
                f"{kind} ({want.dtype})",
            )


def _resolve(name_or_path: str | Path) -> Path:
    """A bundled weight name or a path → an existing file path."""
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or os.sep in text
        or "/" in text
        or text.endswith((".safetensors", *LEGACY_SUFFIXES))
        or Path(text).exists()
    )
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise _fail(path, "checkpoint file not found")
        return path
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


def _load_legacy(
    path: Path, architecture: str | None, kwargs: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a pickle-based .pt/.pth state dict with ``weights_only=True`` only."""
    if architecture is None:
        raise _fail(
            path,
            f"a legacy PyTorch file carries no architecture: call load_model(path, "
            f"architecture=..., kwargs=...) with one of {', '.join(available_models())}",
        )
    try:
        # weights_only=True: the unpickler only builds tensors and plain containers; any other
        # global (a class, os.system …) makes it raise instead of running.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(
            path,
            f"refused: not a plain tensor state dict readable with weights_only=True "
            f"({type(exc).__name__}: {first[:300]})",
        ) from None
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
    _check_finite(path, obj)
    return obj, _caller_meta(architecture, kwargs, "legacy-pickle")


def _caller_meta(architecture: str, kwargs: Mapping[str, Any] | None, source: str) -> dict:
    """Metadata for a file that records no architecture: what the caller told us."""
    return {
        "format_version": 0,
        "architecture": architecture,
        "kwargs": dict(kwargs or {}),
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


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    architecture: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    fallback: bool = False,
) -> nn.Module:
    """Load a model, ready for inference.

    Parameters
    ----------
    name_or_path
        The name of a bundled weight file (``models/weights/<name>.safetensors``, see
        :func:`available_weights`) or the path of a checkpoint: a ``.safetensors`` file from
        :func:`save_checkpoint`, or a legacy ``.pt`` / ``.pth`` state dict (read with
        ``weights_only=True``; needs ``architecture``).
    device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; see
        :func:`select_device`.
    dtype
        Cast floating-point weights, e.g. ``torch.float16`` or ``"bf16"``; ``None`` keeps them.
    architecture, kwargs
        Registry name and constructor kwargs for files that do not record them (legacy
        ``.pt``, foreign safetensors). For our checkpoints they may be omitted; if given they
        must agree with the file.
    fallback
        Fall back to the CPU with a warning when ``device`` is unavailable.

    Returns
    -------
    nn.Module
        In eval mode on the device, with a ``checkpoint_meta`` dict attribute (the file's
        metadata plus ``"path"``).

    Raises
    ------
    CheckpointError
        Any problem with the file or its match to the architecture (the message names the
        tensor and the shapes).
    DeviceError
        The device is unavailable and ``fallback`` is false.
    """
    path = _resolve(name_or_path)
    if path.suffix.lower() in LEGACY_SUFFIXES:
        state, meta = _load_legacy(path, architecture, kwargs)
    else:
        state, metadata = _read_safetensors(path)
        if architecture is not None and not (metadata and METADATA_KEY in metadata):
            meta = _caller_meta(architecture, kwargs, "foreign-safetensors")
        else:
            meta = _parse_meta(path, metadata)
            if architecture is not None and architecture != meta["architecture"]:
                raise _fail(
                    path,
                    f"the file is a {meta['architecture']!r} checkpoint, not {architecture!r}",
                )
            given = _json_dict(kwargs, "load_model: kwargs") or {}
            differ = {k: v for k, v in given.items() if meta["kwargs"].get(k) != v}
            if differ:
                raise _fail(path, f"the file records kwargs {meta['kwargs']}, not {differ}")

    arch = meta["architecture"]
    try:
        spec = model_spec(arch)
    except KeyError:
        raise _fail(
            path, f"unknown architecture {arch!r}; known: {', '.join(available_models())}"
        ) from None
    try:
        model = build_model(arch, **meta["kwargs"])
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"kwargs {meta['kwargs']} do not build {arch!r}: {exc}") from None
    _check_tensors(path, model.state_dict(), state)
    model.load_state_dict(state, strict=True)

    meta = {**meta, "kwargs": dict(model.config), "path": str(path)}
    if meta.get("normalization") is None:
        meta["normalization"] = dict(spec.normalization)
    target = select_device(device, fallback=fallback)
    model.to(device=target, dtype=_resolve_dtype(dtype))
    model.eval()
    model.checkpoint_meta = meta
    return model
