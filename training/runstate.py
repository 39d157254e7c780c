"""A resumable run: its state file, its folder and seeding.

Resume state (models, optimizers, GradScaler, image pools, iteration) is written as a
safetensors file whose tensors are the leaves of a nested structure and whose header holds the
JSON skeleton of that structure — no pickle is ever written or read, like the plugin's model
checkpoints. Every file is written atomically (temporary name in the destination folder, then
rename), so an interrupted run leaves the previous state intact.

:class:`RunFolder` is the one resume protocol of the trainers (``cyclegan``, ``distill``, each
``despeckle`` variant): refuse to overwrite a run unless resuming, restore the last state, and
drop the log rows a resumed run will write again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from napari_confocal_stain._fs import write_atomic
from napari_confocal_stain.errors import CheckpointError
from napari_confocal_stain.inference import select_device
from training.config import write_config
from training.tables import CsvLog

__all__ = ["RunFolder", "Stateful", "load_state", "save_state", "seed_everything", "start_run"]

STATE_KEY = "training_state"


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


# ------------------------------------------------------------------------------- run folder


class Stateful(Protocol):
    """What a resume state is made of: models, optimizers, a GradScaler, image pools."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class RunFolder:
    """A trainer's output folder: ``state.safetensors`` and the CSV logs that go with it.

    Parameters
    ----------
    out
        The folder.
    logs
        Log file name → columns, e.g. ``{"log.csv": LOG_FIELDS, "val.csv": VAL_FIELDS}``;
        every log has an ``iteration`` column.
    resume
        Continue from ``state.safetensors`` if it is there.
    """

    def __init__(
        self, out: str | Path, logs: Mapping[str, Sequence[str]], *, resume: bool
    ) -> None:
        self.out = Path(out)
        self.state_path = self.out / "state.safetensors"
        self.logs = {name: CsvLog(self.out / name, fields) for name, fields in logs.items()}
        self.resuming = resume

    def refuse_existing(self) -> None:
        """Raise ``FileExistsError`` if the folder holds a run and we are not resuming."""
        if self.state_path.exists() and not self.resuming:
            raise FileExistsError(
                f"{self.out} already holds a run (state.safetensors); pass --resume to "
                f"continue it or choose another --out"
            )

    def _restore(self) -> dict[str, Any] | None:
        """The saved state when resuming, else None.

        Resuming drops the log rows from the state's next iteration on (the resumed run
        writes them again); otherwise stale logs and state of an earlier run are removed, so
        a fresh run starts from empty files.
        """
        if self.resuming and self.state_path.is_file():
            state = load_state(self.state_path)
            for log in self.logs.values():
                log.truncate_from("iteration", int(state["iteration"]) + 1)
            return state
        for log in self.logs.values():
            log.remove()
        if self.state_path.is_file():
            self.state_path.unlink()
        return None

    def resume(self, parts: Mapping[str, Stateful]) -> int:
        """Load the last state into ``parts`` when resuming; the iteration to start from.

        ``parts`` maps state keys to objects with ``load_state_dict`` (models, optimizers,
        a GradScaler, image pools), loaded in order. A part saved empty (a disabled GradScaler,
        an empty pool) is left as built. A fresh run starts at 0 (see :meth:`_restore`).
        """
        state = self._restore()
        if state is None:
            return 0
        for key, part in parts.items():
            if len(state[key]):
                part.load_state_dict(state[key])
        return int(state["iteration"])

    def save(self, iteration: int, parts: Mapping[str, Stateful]) -> Path:
        """Write ``state.safetensors``: the iteration and every part's ``state_dict()``."""
        state = {"iteration": iteration, **{k: p.state_dict() for k, p in parts.items()}}
        return save_state(self.state_path, state)


def start_run(
    config: Mapping[str, Any], logs: Mapping[str, Sequence[str]], *, resume: bool
) -> tuple[RunFolder, torch.device]:
    """Open a trainer's run in ``config["out"]`` and seed it; its folder and device.

    Refuses an existing run unless resuming, records ``config.json``, seeds Python and torch
    (``config["seed"]``, ``config["threads"]``) and picks ``config["device"]``, falling back
    to the CPU when the requested device is missing.
    """
    run = RunFolder(config["out"], logs, resume=resume)
    run.refuse_existing()
    write_config(run.out, config)
    seed_everything(int(config["seed"]), config.get("threads"))
    return run, select_device(config.get("device", "auto"), fallback=True)
