"""``python -m training evaluate``: score finished stain models and despecklers on held-out data.

The scores and their columns are :mod:`training.validation`'s, the ones the trainers log while
they train; this command puts trained checkpoints (or bundled models) side by side in
``stain.csv`` / ``.md`` and ``despeckle.csv`` / ``.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from napari_confocal_stain.inference import load_model
from napari_confocal_stain.models import available_weights
from training.data import (
    TissueRegion,
    band_split_defaults,
    load_he_regions,
    regions_in,
    split_regions,
)
from training.runstate import seed_everything
from training.tables import write_table
from training.validation import (
    DESPECKLE_METRICS,
    INPUT_ROW,
    STAIN_METRICS,
    TRUTH_ROW,
    ValidationSet,
    despeckle_eval_sets,
    evaluate_despeckler,
    image_entry,
    make_validation_set,
    truth_reference,
    validate,
)

__all__ = ["DEFAULTS", "DESPECKLE_COLUMNS", "STAIN_COLUMNS", "load_stain_models", "run_evaluate"]

STAIN_COLUMNS = ("model", "eval_set", *STAIN_METRICS)
"""Columns of ``stain.csv`` / ``stain.md``."""
DESPECKLE_COLUMNS = ("model", "eval_set", *DESPECKLE_METRICS)
"""Columns of ``despeckle.csv`` / ``despeckle.md``."""

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "out": "runs/evaluate",
    # Every bundled stain model (stain-*.safetensors), next to the linear stain.
    "stain": [n for n in available_weights() if n.startswith("stain")],
    "despeckle": ["despeckle-combalia"],
    "data": {
        **band_split_defaults(),
        "splits": ["heldout"],
        "extra_eval": [],
        "extra_he": [],
        "extra_tile": 96,
        "tile": 256,
        "tiles": 16,
        "min_tissue": 0.5,
        "speckle": {"model": "gaussian", "sigma": 0.2},
    },
    "despeckle_noise": {"model": "gaussian", "sigma": 0.2},
    "despeckle_tile": 128,
    "despeckle_tiles": 48,
    "median": 3,
}


def load_stain_models(entries: Sequence[Any], device: str) -> dict[str, nn.Module]:
    """The stain models of a config, by row label.

    An entry is a bundled name or checkpoint path (its own label), or
    ``{"label": ..., "model": name_or_path}`` to name the row.
    """
    models = {}
    for entry in entries:
        if isinstance(entry, Mapping):
            label, name = str(entry["label"]), entry["model"]
        else:
            label, name = str(entry), entry
        models[label] = load_model(name, device=device)
    return models


def _stain_sets(
    config: Mapping[str, Any], held: Sequence[TissueRegion]
) -> dict[str, ValidationSet]:
    """The held-out bands' tiles, and every ``data.extra_he`` image whole in smaller tiles."""
    d, seed = config["data"], int(config["seed"])
    sets = {
        "heldout bands": make_validation_set(
            held,
            int(d["tile"]),
            int(d["tiles"]),
            min_tissue=float(d["min_tissue"]),
            speckle=d.get("speckle"),
            seed=seed,
        )
    }
    for extra in d.get("extra_he") or []:
        path, size = image_entry(extra)
        whole = load_he_regions([path], bands=0, order=["extra"], pixel_size_um=size)
        sets[Path(path).name] = make_validation_set(
            whole["extra"],
            int(d["extra_tile"]),
            int(d["tiles"]),
            min_tissue=0.3,
            speckle=d.get("speckle"),
            seed=seed,
        )
    return sets


def _stain_rows(config: Mapping[str, Any], held: Sequence[TissueRegion]) -> list[dict]:
    """Per set: the linear stain, every model, the true H&E."""
    sets = _stain_sets(config, held)
    models = load_stain_models(config["stain"], config.get("device", "cpu"))
    rows = []
    for set_name, val in sets.items():
        rows.append({"model": INPUT_ROW, "eval_set": set_name, **validate(None, val)})
        for name, model in models.items():
            rows.append({"model": name, "eval_set": set_name, **validate(model, val)})
        ref = truth_reference(val)
        if ref is not None:
            rows.append({"model": TRUTH_ROW, "eval_set": set_name, **ref})
    return rows


def _despeckle_rows(config: Mapping[str, Any], held: Sequence[TissueRegion]) -> list[dict]:
    """Per despeckler and set, scored as ``python -m training despeckle`` scores its own."""
    d = config["data"]
    sets = despeckle_eval_sets(
        held,
        int(config["despeckle_tile"]),
        int(config["despeckle_tiles"]),
        float(d["min_tissue"]),
        d.get("extra_eval") or [],
    )
    rows = []
    for name in config["despeckle"]:
        model = load_model(name, device=config.get("device", "cpu"))
        for set_name, tiles in sets.items():
            if tiles:
                m = evaluate_despeckler(
                    model,
                    tiles,
                    config["despeckle_noise"],
                    int(config["seed"]),
                    int(config["median"]),
                )
                rows.append({"model": str(name), "eval_set": set_name, **m})
    return rows


def run_evaluate(config: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Score stain models and despecklers on held-out data; write CSV + Markdown tables.

    Stain models (``config["stain"]``: bundled names or checkpoint paths, or
    ``{"label": ..., "model": name_or_path}`` to name a row) are scored on
    pseudo-confocal pairs of the held-out regions (and of every ``data.extra_he`` image, whole,
    in ``extra_tile``² tiles) next to two reference rows: the linear stain itself (the model's
    input) and the true H&E. Despecklers are scored like
    ``python -m training despeckle`` does. Writes ``stain.csv``/``.md`` and
    ``despeckle.csv``/``.md`` in ``config["out"]``.

    Parameters
    ----------
    config
        See :data:`DEFAULTS`.

    Returns
    -------
    dict
        ``{"stain": rows, "despeckle": rows}``.
    """
    seed_everything(int(config["seed"]), config.get("threads"))
    out = Path(config["out"])
    d = config["data"]
    held = regions_in(split_regions(d), d["splits"])
    result: dict[str, list[dict[str, Any]]] = {"stain": [], "despeckle": []}
    if config.get("stain"):
        result["stain"] = _stain_rows(config, held)
        write_table(
            result["stain"],
            out / "stain.csv",
            out / "stain.md",
            STAIN_COLUMNS,
            title="Stain models on held-out pseudo-confocal pairs",
        )
    if config.get("despeckle"):
        result["despeckle"] = _despeckle_rows(config, held)
        write_table(
            result["despeckle"],
            out / "despeckle.csv",
            out / "despeckle.md",
            DESPECKLE_COLUMNS,
            title="Despecklers: PSNR (dB) and SSIM, noisy input vs output",
        )
    return result
