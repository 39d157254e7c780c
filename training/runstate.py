"""What every training command shares: configs, resumable state files, CSV logs, seeding.

Resume state (models, optimizers, GradScaler, image pools, iteration) is written as a
safetensors file whose tensors are the leaves of a nested structure and whose header holds the
JSON skeleton of that structure — no pickle is ever written or read, like the plugin's model
checkpoints. Every file is written atomically (temporary name in the destination folder, then
rename), so an interrupted run leaves the previous state intact.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from napari_confocal_stain._fs import write_atomic
from napari_confocal_stain.errors import CheckpointError

__all__ = [
    "CONFIG_DIR",
    "CsvLog",
    "apply_overrides",
    "deep_update",
    "expand_paths",
    "load_config",
    "load_state",
    "portable_paths",
    "save_state",
    "seed_everything",
    "write_atomic",
]

CONFIG_DIR = Path(__file__).parent / "configs"
"""Bundled configurations (``<command>_<preset>.json``)."""
STATE_KEY = "training_state"
_REPO = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """Where ``${NCS_DATA}`` points: the env var, else ``../shared/data`` next to the repo."""
    env = os.environ.get("NCS_DATA")
    return Path(env) if env else (_REPO.parent / "shared" / "data")


# ---------------------------------------------------------------------------------- files


def _encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON skeleton of ``obj``; tensor / ndarray leaves move into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        # Optimizer states are keyed by int parameter ids: keep the keys' type.
        return {
            "__items__": [
                [_encode(k, tensors, prefix), _encode(v, tensors, prefix)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, prefix) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix or 'top level'} in a state")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    return obj


def save_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Save a nested training state (dicts, lists, tuples, tensors, arrays, scalars).

    Parameters
    ----------
    path
        Destination ``*.safetensors`` (written atomically).
    state
        E.g. ``{"iteration": 120, "G_A": model.state_dict(), "opt_G": opt.state_dict()}``.

    Returns
    -------
    pathlib.Path
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(dict(state), tensors, "")
    blob = st_save(tensors, metadata={STATE_KEY: json.dumps(skeleton)})
    return write_atomic(path, blob)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state`.

    Raises
    ------
    CheckpointError
        Missing or not a training state file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: training state not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        skeleton = json.loads(meta[STATE_KEY])
    except Exception as exc:
        raise CheckpointError(f"{path}: not a training state file ({exc})") from None
    return _decode(skeleton, tensors)


# --------------------------------------------------------------------------------- configs


def deep_update(base: dict, update: Mapping[str, Any]) -> dict:
    """``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as JSON, else kept as strings).

    Examples
    --------
    >>> apply_overrides({"train": {"lr": 1}}, ["train.lr=0.5", "seed=3"])
    {'train': {'lr': 0.5}, 'seed': 3}
    """
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def expand_paths(value: Any) -> Any:
    """Replace ``${NCS_DATA}`` in every string of a config by :func:`default_data_dir`."""
    if isinstance(value, str):
        return value.replace("${NCS_DATA}", str(default_data_dir()))
    if isinstance(value, list):
        return [expand_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_paths(v) for k, v in value.items()}
    return value


def _read_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python ≥ 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        raise ValueError("TOML configs need Python ≥ 3.11 (tomllib); use JSON") from None
    return tomllib.loads(text)


def portable_paths(value: Any) -> Any:
    """The inverse of :func:`expand_paths`: the data folder becomes ``${NCS_DATA}`` again.

    Checkpoint metadata records data paths this way, so it names the same public files on
    every machine instead of one machine's folders.
    """
    root = str(default_data_dir())
    if isinstance(value, str):
        return value.replace(root, "${NCS_DATA}")
    if isinstance(value, list):
        return [portable_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    return value


def load_config(
    name_or_path: str | Path | None, defaults: Mapping[str, Any], command: str
) -> dict[str, Any]:
    """A command's configuration: defaults, updated by a preset or file.

    Parameters
    ----------
    name_or_path
        ``None`` (defaults only), a preset name (``"smoke"``, ``"full"``, …: the file
        ``configs/<command>_<name>.json`` or ``.toml``) or a path to a JSON / TOML file.
    defaults
        The command's defaults.
    command
        Command name, for preset lookup and messages.

    Returns
    -------
    dict
        With ``${NCS_DATA}`` expanded.

    Raises
    ------
    ValueError
        Unknown preset, unreadable file.
    """
    config = copy.deepcopy(dict(defaults))
    if name_or_path is not None:
        path = Path(name_or_path)
        if not path.suffix:
            stem = f"{command.replace('-', '_')}_{name_or_path}"
            candidates = [CONFIG_DIR / f"{stem}.json", CONFIG_DIR / f"{stem}.toml"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                presets = sorted(
                    p.stem.split("_", 1 + command.count("-"))[-1]
                    for p in CONFIG_DIR.glob(f"{command.replace('-', '_')}_*")
                )
                raise ValueError(
                    f"no {command} preset {str(name_or_path)!r}; presets: {', '.join(presets)}"
                )
            path = found[0]
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            text = path.read_text()
            loaded = _read_toml(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the config ({exc})") from None
        loaded.pop("_comment", None)
        config = deep_update(config, loaded)
    return expand_paths(config)


# ------------------------------------------------------------------------------------- logs


class CsvLog:
    """Append rows to a CSV file, writing the header once (the file survives resumes).

    On resume, rows of iterations at or after the resume point are dropped first, so the log
    of a resumed run equals that of an uninterrupted one.

    Parameters
    ----------
    path
        The CSV file.
    fields
        Column names.
    """

    def __init__(self, path: str | Path, fields: Iterable[str]) -> None:
        self.path = Path(path)
        self.fields = list(fields)

    def truncate_from(self, column: str, value: float) -> None:
        """Drop rows whose ``column`` is ≥ ``value`` (the part a resumed run will redo)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if float(r[column]) < value]
        text = _csv_text(self.fields, rows)
        write_atomic(self.path, text)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing fields are blank; floats are written with 6 significant
        digits)."""
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _csv_text(fields: list[str], rows: list[Mapping[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------------- seeding


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python and torch; optionally fix torch's CPU thread count.

    Parameters
    ----------
    seed
        The seed.
    threads
        ``torch.set_num_threads`` (on a shared machine one thread per run avoids the
        oversubscription that makes convolutions many times slower).
    """
    # numpy's global RNG is not seeded: all our sampling uses explicit Generators.
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
