"""Command configurations: defaults, presets, ``--set`` overrides and the data folder.

A command's configuration is its defaults, updated by a preset (``configs/<command>_<name>``
``.json`` / ``.toml``) or a file, then by ``key.sub=value`` overrides. ``${NCS_DATA}`` in a
string stands for the data folder (:func:`default_data_dir`); :func:`portable_paths` turns
that folder back into ``${NCS_DATA}`` for what a run records in its checkpoints.

No torch here: ``python -m training --help`` lists the presets and should answer at once.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from napari_confocal_stain._fs import write_atomic

__all__ = [
    "CONFIG_DIR",
    "apply_overrides",
    "deep_update",
    "default_data_dir",
    "expand_paths",
    "load_config",
    "portable_paths",
    "portable_record",
    "presets",
    "write_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"
"""Bundled configurations (``<command>_<preset>.json``)."""
_REPO = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """Where ``${NCS_DATA}`` points: the env var, else ``../shared/data`` next to the repo."""
    env = os.environ.get("NCS_DATA")
    return Path(env) if env else (_REPO.parent / "shared" / "data")


def presets(command: str) -> list[str]:
    """The preset names of ``command`` (``despeckle`` → ``["combalia_cpu", "full", ...]``)."""
    stem = command.replace("-", "_") + "_"
    return sorted({p.stem[len(stem) :] for p in CONFIG_DIR.glob(f"{stem}*")})


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


def portable_record(record: Mapping[str, Any]) -> Any:
    """``record`` as plain JSON values (others as strings) with :func:`portable_paths`.

    What a trainer stores as a checkpoint's ``training`` metadata.
    """
    return portable_paths(json.loads(json.dumps(record, default=str)))


def write_config(out: str | Path, config: Mapping[str, Any]) -> Path:
    """Create the run folder ``out`` and record the resolved configuration as ``config.json``.

    Values JSON cannot hold are written as strings.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_atomic(out / "config.json", json.dumps(config, indent=2, default=str))


def _read_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python ≥ 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        raise ValueError("TOML configs need Python ≥ 3.11 (tomllib); use JSON") from None
    return tomllib.loads(text)


def _preset_path(name: str, command: str) -> Path:
    stem = f"{command.replace('-', '_')}_{name}"
    for candidate in (CONFIG_DIR / f"{stem}.json", CONFIG_DIR / f"{stem}.toml"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"no {command} preset {name!r}; presets: {', '.join(presets(command))}")


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
            path = _preset_path(str(name_or_path), command)
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
