"""Evaluation: stain-model metrics on pseudo-confocal pairs, tables (CSV + Markdown), PNGs.

Stain metrics of one tile, all on ``(H, W, 3)`` RGB in [0, 1] (luminance inside the metrics):

``ssim_truth``       SSIM(output, true H&E) — fidelity; only pseudo-confocal pairs have it.
``lbp_chi2_truth``   LBP χ²(true H&E, output).
``ssim_input``       SSIM(DSCM input, output) — the thesis's structure metric (§3.5.2).
``lbp_chi2_input``   LBP χ²(DSCM input, output) — the thesis's hallucination metric (§3.5.1).
``nuclei_*``         nuclei detected in F (LoG) and in the output's hematoxylin, matched one to
                     one within the smallest nuclear diameter; ``nuclei_preserved`` is
                     matched / F nuclei, summed over tiles.

SSIM and LBP χ² are :func:`napari_confocal_stain.core.metrics.ssim_map` and
:func:`~napari_confocal_stain.core.metrics.lbp_chi2_map` with one cell per tile (Gaussian
SSIM σ = 1.5; 8-neighbour radius-1 LBP with all 256 codes; χ² = ½ Σ (p − q)² / (p + q) of
the normalised histograms). Nuclei come from :mod:`napari_confocal_stain.core.nuclei`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.metrics import lbp_chi2_map, ssim_map
from napari_confocal_stain.core.nuclei import nuclei_preservation_map
from training.runstate import write_atomic

__all__ = [
    "DEFAULTS",
    "STAIN_COLUMNS",
    "aggregate_stain_metrics",
    "markdown_table",
    "run_evaluate",
    "run_generator",
    "save_png",
    "stain_metrics",
    "write_table",
]

STAIN_COLUMNS = (
    "model",
    "eval_set",
    "tiles",
    "ssim_truth",
    "lbp_chi2_truth",
    "ssim_input",
    "lbp_chi2_input",
    "nuclei_f",
    "nuclei_output",
    "nuclei_matched",
    "nuclei_preserved",
    "nuclei_invented",
)


# ---------------------------------------------------------------------------------- tables


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (missing values are blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]],
    csv_path: str | Path,
    md_path: str | Path,
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> None:
    """Write ``rows`` as CSV and as Markdown (both atomically).

    Parameters
    ----------
    rows
        One dict per row.
    csv_path, md_path
        Destinations.
    columns
        Column order (default: keys of the first row).
    title
        Optional Markdown heading.
    """
    import csv
    import io

    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(csv_path, buf.getvalue())
    head = f"## {title}\n\n" if title else ""
    write_atomic(md_path, head + markdown_table(rows, columns))


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Save a float image in [0, 1] (``(H, W)`` or ``(H, W, 3)``) as an 8-bit PNG, atomically."""
    import io

    from PIL import Image

    a = np.clip(np.asarray(image, np.float32), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((a * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------ generators


@torch.no_grad()
def run_generator(model: nn.Module, dscm: np.ndarray, device: torch.device | None = None):
    """Run a stain generator on one DSCM tile.

    Parameters
    ----------
    model
        A generator (input and output RGB in [-1, 1]).
    dscm
        ``(3, H, W)`` DSCM in [-1, 1]; H and W multiples of the model's ``2**n_down``.
    device
        Where to run (default: the model's).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` float32 RGB in [0, 1].
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    x = torch.from_numpy(np.ascontiguousarray(dscm, np.float32))[None].to(device)
    y = model(x)[0].float().cpu().numpy()
    return np.clip((y.transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)


# ------------------------------------------------------------------------------ stain metrics


def stain_metrics(
    dscm: np.ndarray,
    output: np.ndarray,
    f: np.ndarray,
    truth: np.ndarray | None = None,
    pixel_size_um: float = 0.75,
) -> dict[str, float]:
    """Metrics of one stained tile (see the module docstring).

    Parameters
    ----------
    dscm
        ``(H, W, 3)`` linear stain (the model's input) in [0, 1].
    output
        ``(H, W, 3)`` stained output in [0, 1].
    f
        ``(H, W)`` fluorescence (nuclear signal) in [0, 1].
    truth
        ``(H, W, 3)`` true H&E in [0, 1], if known.
    pixel_size_um
        For the nuclear diameters of the detector.

    Returns
    -------
    dict
        Floats; the ``*_truth`` keys are NaN without ``truth``.
    """
    cell = max(output.shape[:2])
    out: dict[str, float] = {
        "ssim_input": float(ssim_map(dscm, output, cell, workers=1)[0, 0]),
        "lbp_chi2_input": float(lbp_chi2_map(dscm, output, cell, workers=1)[0, 0]),
        "ssim_truth": math.nan,
        "lbp_chi2_truth": math.nan,
    }
    if truth is not None:
        out["ssim_truth"] = float(ssim_map(truth, output, cell, workers=1)[0, 0])
        out["lbp_chi2_truth"] = float(lbp_chi2_map(truth, output, cell, workers=1)[0, 0])
    nuc = nuclei_preservation_map(f, output, cell, pixel_size_um, workers=1).totals
    out.update(
        nuclei_f=nuc["source"],
        nuclei_output=nuc["output"],
        nuclei_matched=nuc["matched"],
        nuclei_invented=nuc["invented"],
    )
    return out


def aggregate_stain_metrics(per_tile: Iterable[Mapping[str, float]]) -> dict[str, Any]:
    """Means of the per-tile SSIM / χ², sums of the nuclei counts, and the preserved fraction.

    Returns
    -------
    dict
        ``tiles``, the mean metrics, ``nuclei_*`` totals, ``nuclei_preserved`` (matched / F
        nuclei over all tiles) and ``nuclei_invented`` (output nuclei with no F partner).
    """
    per_tile = list(per_tile)
    agg: dict[str, Any] = {"tiles": len(per_tile)}
    for key in ("ssim_truth", "lbp_chi2_truth", "ssim_input", "lbp_chi2_input"):
        vals = [t[key] for t in per_tile if not math.isnan(t[key])]
        agg[key] = float(np.mean(vals)) if vals else math.nan
    for key in ("nuclei_f", "nuclei_output", "nuclei_matched", "nuclei_invented"):
        agg[key] = int(sum(t[key] for t in per_tile))
    agg["nuclei_preserved"] = (
        agg["nuclei_matched"] / agg["nuclei_f"] if agg["nuclei_f"] else math.nan
    )
    return agg


# ---------------------------------------------------------------------------- the command

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "out": "runs/evaluate",
    "stain": ["stain-unet"],
    "despeckle": ["despeckle-combalia"],
    "data": {
        "he": ["${NCS_DATA}/he/cmu_small_region.svs"],
        "pixel_size_um": None,
        "bands": 6,
        "order": ["source", "target", "heldout"],
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


def _path_and_size(entry: Any) -> tuple[str, float | None]:
    """An extra image entry: a path, or ``{"path": ..., "pixel_size_um": ...}``."""
    if isinstance(entry, Mapping):
        return str(entry["path"]), entry.get("pixel_size_um")
    return str(entry), None


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
    from napari_confocal_stain.inference import load_model
    from training.cyclegan import _truth_reference, make_validation_set, validate
    from training.data import load_he_regions
    from training.despeckle import eval_tiles, evaluate_despeckler
    from training.runstate import seed_everything

    seed_everything(int(config["seed"]), config.get("threads"))
    out = Path(config["out"])
    d = config["data"]
    regions = load_he_regions(
        d["he"], bands=int(d["bands"]), order=d["order"], pixel_size_um=d.get("pixel_size_um")
    )
    held = [r for s in d["splits"] for r in regions[s]]
    result: dict[str, list[dict[str, Any]]] = {"stain": [], "despeckle": []}
    if config.get("stain"):
        sets = {
            "heldout bands": make_validation_set(
                held,
                int(d["tile"]),
                int(d["tiles"]),
                min_tissue=float(d["min_tissue"]),
                speckle=d.get("speckle"),
                seed=int(config["seed"]),
            )
        }
        for extra in d.get("extra_he") or []:
            path, size = _path_and_size(extra)
            whole = load_he_regions([path], bands=0, order=["extra"], pixel_size_um=size)
            sets[Path(path).name] = make_validation_set(
                whole["extra"],
                int(d["extra_tile"]),
                int(d["tiles"]),
                min_tissue=0.3,
                speckle=d.get("speckle"),
                seed=int(config["seed"]),
            )
        # An entry is a bundled name / checkpoint path, or {"label": ..., "model": ...}.
        models = {}
        for entry in config["stain"]:
            label, name = (
                (str(entry["label"]), entry["model"])
                if isinstance(entry, Mapping)
                else (str(entry), entry)
            )
            models[label] = load_model(name, device=config.get("device", "cpu"))
        rows = []
        for set_name, val in sets.items():
            rows.append(
                {"model": "linear-stain (input)", "eval_set": set_name, **validate(None, val)}
            )
            for name, model in models.items():
                rows.append({"model": name, "eval_set": set_name, **validate(model, val)})
            ref = _truth_reference(val)
            if ref is not None:
                rows.append({"model": "true H&E (reference)", "eval_set": set_name, **ref})
        write_table(
            rows,
            out / "stain.csv",
            out / "stain.md",
            STAIN_COLUMNS,
            title="Stain models on held-out pseudo-confocal pairs",
        )
        result["stain"] = rows
    if config.get("despeckle"):
        dcfg = {
            "data": {
                "eval_tile": config["despeckle_tile"],
                "eval_min_tissue": d["min_tissue"],
                "eval_tiles": config["despeckle_tiles"],
                "extra_eval": d.get("extra_eval") or [],
            }
        }
        sets = eval_tiles(dcfg, held)
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
        write_table(
            rows,
            out / "despeckle.csv",
            out / "despeckle.md",
            [
                "model",
                "eval_set",
                "tiles",
                "psnr_in",
                "psnr_out",
                "psnr_out_median",
                "ssim_in",
                "ssim_out",
                "ssim_out_median",
            ],
            title="Despecklers: PSNR (dB) and SSIM, noisy input vs output",
        )
        result["despeckle"] = rows
    return result
