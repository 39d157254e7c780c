"""Calibrate a stain model's hallucination flags on known-good held-out pairs.

``python -m training calibrate --model NAME_OR_CHECKPOINT (--out PATH | --in-place)``

1. Known-good pairs: pseudo-confocal R/F from real H&E the model was not trained on
   (``training.data.pseudo_confocal``: F from hematoxylin, R from eosin with speckle) and
   regions of synthetic confocal slides, each stained by the model as the viewer does
   (``stain_region``, seamless, 512-px statistics tiles).
2. The model's nuclear gain (median output-hematoxylin / F LoG response over clear F
   nuclei) and colour palette (chromaticity histogram of its coloured pixels).
3. For every cell size (64 … 1024 px), the raw signals of every tissue cell (for sizes of
   256 px and more also on grids shifted by a quarter or half cell, so large cells have
   enough samples); each signal's threshold is its ``q``-quantile over these known-good
   cells, with one ``q`` per cell size chosen so that the fraction of known-good cells
   flagged by *any* signal is the target false-flag rate; then one factor per cell size
   (the combined threshold, :func:`transfer_factor`) so that the same rate holds leave one
   image out — each image's cells against thresholds from the other images, which is what
   a user's slide gets.
4. A new checkpoint with the same tensors (checked bit for bit) whose metadata holds the
   calibration under ``extra.flag_calibration``, and a section in the model card.

The split is by tissue: the images listed in :data:`DEFAULTS` are calibration only;
``bench/flags.py`` evaluates on other images (see ``docs/flags.md``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULTS",
    "Pair",
    "calibrate_model",
    "card_section",
    "he_pairs",
    "run_calibrate",
    "signal_quantiles",
    "solve_thresholds",
    "stain_pairs",
    "synthetic_pairs",
    "transfer_factor",
    "update_card",
    "write_calibrated_checkpoint",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "model": "stain-unet",
    "out": None,
    "in_place": False,
    "card": None,
    "cells": [64, 128, 256, 512, 1024],
    "target_false_flag_rate": 0.02,
    # Grow the thresholds until the rate holds leave one image out (transfer_factor).
    "transfer": True,
    "strategy": "seamless",
    "tile": 512,
    "data": {
        # Calibration tissue only; bench/flags.py evaluates on the others. None of it is
        # trained on by the default model (training/tissues.py): a model's known-good
        # signals on its own training tissue are smaller than on tissue it has never seen.
        "he": [
            # The held-out bands of the slide the bundled models were trained on.
            {"path": "${NCS_DATA}/he/cmu_small_region.svs", "bands": [2, 5], "of": 6},
            {"path": "${NCS_DATA}/he/extra/ocdc_1009009_r27c10.jpg", "pixel_size_um": 0.5025},
            {
                "path": "${NCS_DATA}/he/extra/ucsb_ytma49_042003_malignant1_ccd.jpg",
                "pixel_size_um": 0.5,
            },
        ],
        "synthetic": [
            # Read as the plugin reads a slide (percentile-normalised) — whole slides, so
            # large cells have samples, and several, so the leave-one-image-out factor sees
            # slide-to-slide variation — and a region as generated.
            *(
                {"seed": s, "size": [4096, 4096], "region": [0, 4096, 0, 4096], "as_slide": True}
                for s in (5, 9, 11, 13)
            ),
            {"seed": 9, "size": [4096, 4096], "region": [1024, 3072, 1024, 3072]},
        ],
        "speckle": {"model": "gaussian", "sigma": 0.2},
    },
}


@dataclass
class Pair:
    """A known-good confocal pair (and, once stained, the model's output)."""

    name: str
    r: np.ndarray
    f: np.ndarray
    pixel_size_um: float = 0.75
    stained: np.ndarray | None = None
    truth: np.ndarray | None = None


# ---------------------------------------------------------------------------------- data


def he_pairs(
    entries: Sequence[Any], speckle: Mapping[str, Any] | None, seed: int = 0
) -> list[Pair]:
    """Pseudo-confocal pairs of H&E images at 0.75 µm/px.

    Parameters
    ----------
    entries
        Paths, or dicts with ``path`` and optionally ``pixel_size_um`` and ``bands`` /
        ``of`` (keep only those of ``of`` horizontal bands).
    speckle
        Speckle on R (``training.noise.add_speckle`` keyword arguments), or None.
    seed
        Speckle seed (image ``i`` uses ``[seed, i]``).

    Returns
    -------
    list of Pair
        One per image or band, with ``truth`` the H&E.
    """
    from training.data import (
        hed_scale,
        inverted_luma,
        otsu_tissue_mask,
        pseudo_confocal,
        read_he,
        resize_to_pixel_size,
    )

    pairs = []
    for i, entry in enumerate(entries):
        entry = {"path": entry} if not isinstance(entry, Mapping) else dict(entry)
        he = read_he(entry["path"], entry.get("pixel_size_um"))
        rgb = he.rgb
        if abs(he.pixel_size_um - 0.75) > 1e-6:
            rgb = resize_to_pixel_size(rgb, he.pixel_size_um)
        rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32)
        scale = hed_scale(rgb, otsu_tissue_mask(inverted_luma(rgb)))
        r, f = pseudo_confocal(rgb, scale, np.random.default_rng([seed, i]), speckle=speckle)
        name = Path(entry["path"]).stem
        bands = entry.get("bands")
        if bands is None:
            pairs.append(Pair(name, r, f, 0.75, truth=rgb))
            continue
        edges = np.linspace(0, rgb.shape[0], int(entry.get("of", 6)) + 1).round().astype(int)
        for b in bands:
            sl = slice(edges[b], edges[b + 1])
            pairs.append(Pair(f"{name}[band {b}]", r[sl], f[sl], 0.75, truth=rgb[sl]))
    return pairs


def synthetic_pairs(entries: Sequence[Mapping[str, Any]]) -> list[Pair]:
    """Regions of synthetic confocal slides, 0.75 µm/px.

    An entry's ``as_slide: true`` writes the slide (``io.synthetic.write_synthetic_mosaic``,
    uint8 TIFFs in a temporary folder) and reads the region as the plugin reads any slide:
    ``open_mosaic``, then R and F normalised by the slide's own percentile statistics
    (``engine.pipeline.read_normalized``). That is what a model stains in the viewer, and it
    differs from the generator's raw floats (the stretch brightens R about 1.8× in the
    sample slide's tissue), which a model's flags must be calibrated on. Without it the
    region comes straight from ``io.synthetic.synth_region``.
    """
    import tempfile

    from napari_confocal_stain.io.synthetic import synth_region

    pairs = []
    for e in entries:
        size = tuple(int(v) for v in e["size"])
        y0, y1, x0, x1 = (int(v) for v in e["region"])
        name = f"synthetic seed {e['seed']} [{y0}:{y1},{x0}:{x1}]"
        if e.get("as_slide"):
            from napari_confocal_stain.engine.pipeline import read_normalized
            from napari_confocal_stain.io.readers import open_mosaic
            from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

            with tempfile.TemporaryDirectory(prefix="ncs-calibrate-") as tmp:
                folder = write_synthetic_mosaic(
                    Path(tmp) / "slide", size=size, seed=int(e["seed"])
                )
                mosaic = open_mosaic(folder)
                box = (y0, y1, x0, x1)
                r, f = (read_normalized(mosaic, mode, 0, box) for mode in ("r", "f"))
            name += " as read"
        else:
            r, f = synth_region(size, y0, x0, y1 - y0, x1 - x0, seed=int(e["seed"]))
        pairs.append(Pair(name, r, f))
    return pairs


def stain_pairs(
    pairs: Sequence[Pair],
    model: Any,
    *,
    strategy: str = "seamless",
    tile: int = 512,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[Pair]:
    """Stain every pair's linear stain with ``model`` (in place), as the viewer does."""
    from napari_confocal_stain.core.linear_stain import linear_stain
    from napari_confocal_stain.inference import stain_region

    for p in pairs:
        if progress:
            progress(f"staining {p.name} {p.r.shape}")
        lin = linear_stain(p.r, p.f)
        p.stained = stain_region(lin, model, strategy=strategy, tile=tile, device=device)
    return pairs


# ---------------------------------------------------------------------------- calibrating


def signal_quantiles(values: np.ndarray, q: float) -> np.ndarray:
    """Each column's ``q``-quantile ignoring NaN (``inf`` for a signal never measured)."""
    return np.array(
        [np.nanquantile(col, q) if np.isfinite(col).any() else np.inf for col in values.T]
    )


def solve_thresholds(values: np.ndarray, target: float) -> tuple[float, np.ndarray, float]:
    """One quantile level for every signal so that "any signal above" hits ``target``.

    Parameters
    ----------
    values
        ``(n_cells, n_signals)`` signals of known-good cells (NaN = not measured).
    target
        Wanted fraction of those cells flagged by at least one signal.

    Returns
    -------
    (q, thresholds, rate)
        The smallest ``q`` whose rate does not exceed ``target``, each signal's
        ``q``-quantile, and the rate achieved.
    """

    def at(q: float) -> tuple[np.ndarray, float]:
        t = signal_quantiles(values, q)
        hit = np.nan_to_num(values, nan=-np.inf) > t
        return t, float(hit.any(axis=1).mean())

    lo, hi = 0.5, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if at(mid)[1] > target:
            lo = mid
        else:
            hi = mid
    t, rate = at(hi)
    return hi, t, rate


def transfer_factor(
    values: np.ndarray,
    groups: np.ndarray,
    q: float,
    median: np.ndarray,
    target: float,
) -> tuple[float, float, float]:
    """How much the thresholds must grow to hold on an image the calibration never saw.

    Each image's cells are scored against thresholds made from the *other* images' cells
    (the same quantile ``q``): ``score = max_k (s_k − median_k) / (t_k − median_k)``. Over
    all cells pooled, the ``1 − target`` quantile of those scores is the factor by which
    every ``t_k − median_k`` must be multiplied for the leave-one-image-out false-flag
    rate to meet the target (at least 1: in-sample thresholds are never lowered). Known-good
    signal levels differ between tissues more than within one, so in-sample quantiles are
    optimistic on a new slide; this is the correction.

    Parameters
    ----------
    values
        ``(n_cells, n_signals)`` known-good signals (NaN = not measured).
    groups
        ``(n_cells,)`` the image of each cell.
    q
        The quantile level of the thresholds (:func:`solve_thresholds`).
    median
        ``(n_signals,)`` medians of the signals over all cells.
    target
        Wanted false-flag rate.

    Returns
    -------
    (factor, rate_before, rate_after)
        The factor (1 with fewer than two images), and the leave-one-image-out rate with
        the in-sample thresholds and with the factor applied.
    """
    ids = np.unique(groups)
    if len(ids) < 2 or len(values) == 0:
        return 1.0, math.nan, math.nan
    scores = np.zeros(len(values))
    for g in ids:
        own = groups == g
        other = values[~own]
        t = signal_quantiles(other, q)
        span = np.maximum(t - median, 1e-6)
        z = np.nan_to_num((values[own] - median) / span, nan=0.0, posinf=0.0, neginf=0.0)
        scores[own] = z.max(axis=1)
    factor = max(1.0, float(np.quantile(scores, 1.0 - target)))
    return factor, float((scores > 1.0).mean()), float((scores > factor).mean())


def calibrate_model(
    pairs: Sequence[Pair],
    *,
    cells: Sequence[int] = (64, 128, 256, 512, 1024),
    target: float = 0.08,
    transfer: bool = True,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Any:
    """Calibrate the flags on stained known-good pairs.

    Parameters
    ----------
    pairs
        Pairs with ``stained`` set (:func:`stain_pairs`).
    cells
        Cell sizes to calibrate (interpolated in ``log2`` between them).
    target
        False-flag rate on these known-good cells.
    transfer
        Also scale each cell size's thresholds by :func:`transfer_factor` (the combined
        threshold), so the leave-one-image-out rate meets ``target`` too: the rate on a
        slide the calibration never saw. False: in-sample thresholds only.
    model_name
        Recorded in the calibration.
    progress
        Called with a line of text per step.

    Returns
    -------
    napari_confocal_stain.measure.flags.FlagCalibration
    """
    from napari_confocal_stain.measure.flags import (
        SIGNALS,
        FlagCalibration,
        cell_signals,
        palette_histogram,
        palette_log_density,
        pixel_maps,
    )

    say = progress or (lambda _text: None)
    cells = sorted(int(c) for c in cells)
    counts = sum(palette_histogram(p.stained, p.pixel_size_um) for p in pairs)
    palette = palette_log_density(counts)
    ratios = []
    maps = []
    for p in pairs:
        say(f"signals of {p.name}")
        m = pixel_maps(p.r, p.f, p.stained, pixel_size_um=p.pixel_size_um, palette=palette)
        fn = m["f_nuclei"]
        clear = fn[:, 2] >= 0.15
        ratios.append(fn[clear, 3] / fn[clear, 2])
        maps.append(m)
    all_ratios = np.concatenate(ratios) if ratios else np.zeros(0)
    gain = float(np.median(all_ratios)) if len(all_ratios) else 1.0
    for m in maps:
        m["gain"] = gain
    # The bands of one slide are one image for the leave-one-image-out factor.
    sources = [p.name.split("[")[0].strip() for p in pairs]
    combined = []
    median: dict[str, list[float]] = {k: [] for k in SIGNALS}
    tail: dict[str, list[float]] = {k: [] for k in SIGNALS}
    measured: dict[str, Any] = {}
    for cell in cells:
        rows, groups = [], []
        steps = 4 if cell >= 512 else (2 if cell >= 256 else 1)
        for m, source in zip(maps, sources, strict=True):
            h, w = m["shape"]
            for oy in range(0, cell, cell // steps):
                for ox in range(0, cell, cell // steps):
                    if h - oy < min(cell, h) // 2 or w - ox < min(cell, w) // 2:
                        continue
                    out = cell_signals(m, cell, (oy, ox))
                    sig = np.stack([out["signals"][k] for k in SIGNALS], axis=-1)
                    rows.append(sig[out["tissue"]])
                    groups += [source] * int(out["tissue"].sum())
        values = np.concatenate(rows) if rows else np.zeros((0, len(SIGNALS)))
        q, t, rate = solve_thresholds(values, target)
        med = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in values.T], float)
        factor, loo_before, loo_after = (
            transfer_factor(values, np.array(groups), q, med, target)
            if transfer
            else (1.0, math.nan, math.nan)
        )
        combined.append(round(factor, 4))
        for k, name in enumerate(SIGNALS):
            median[name].append(float(med[k]))
            tail[name].append(float(max(t[k], med[k] + 1e-6)))
        per_signal = {
            name: float((np.nan_to_num(values[:, k], nan=-np.inf) > t[k]).mean())
            for k, name in enumerate(SIGNALS)
        }
        measured[str(cell)] = {
            "cells": len(values),
            "quantile": round(q, 5),
            "false_flag_rate": round(rate, 4),
            "images": len(set(groups)),
            "transfer_factor": round(factor, 4),
            "leave_one_out_rate_before": _round(loo_before),
            "leave_one_out_rate": _round(loo_after),
            "per_signal_rate": {k: round(v, 4) for k, v in per_signal.items()},
        }
        say(
            f"cell {cell}: {len(values)} known-good cells, q = {q:.4f}, rate {rate:.3f}; "
            f"leave one image out {loo_before:.3f} → ×{factor:.3f} → {loo_after:.3f}"
        )
    return FlagCalibration(
        cells=cells,
        median=median,
        tail=tail,
        combined=combined,
        nuclei_gain=gain,
        palette=np.round(palette, 3).tolist(),
        quantile=float(np.mean([measured[str(c)]["quantile"] for c in cells])),
        target_false_flag_rate=float(target),
        model=model_name,
        measured=measured,
        data={"pairs": [p.name for p in pairs], "nuclei": len(all_ratios)},
    )


def _round(x: float) -> float | None:
    """4 decimals, or None for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else round(x, 4)


# ---------------------------------------------------------------------------- writing


def write_calibrated_checkpoint(source: str | Path, out: str | Path, calibration: Any) -> Path:
    """A copy of ``source`` (same tensors, checked) with the calibration in its metadata.

    Raises
    ------
    CheckpointError
        The source cannot be read, or the written tensors differ from the source's.
    """
    import torch

    from napari_confocal_stain.errors import CheckpointError
    from napari_confocal_stain.measure.flags import CALIBRATION_KEY
    from napari_confocal_stain.models.checkpoint import (
        load_checkpoint,
        read_model,
        save_checkpoint,
    )

    source, out = Path(source), Path(out)
    state, meta = load_checkpoint(source)
    model = read_model(source)
    extra = dict(meta.get("extra") or {})
    extra[CALIBRATION_KEY] = calibration.to_dict()
    save_checkpoint(
        out,
        model,
        architecture=meta["architecture"],
        kwargs=meta["kwargs"],
        normalization=meta["normalization"],
        training=meta.get("training"),
        extra=extra,
    )
    written, _ = load_checkpoint(out)
    same = set(written) == set(state) and all(
        written[k].dtype == state[k].dtype and torch.equal(written[k], state[k]) for k in state
    )
    if not same:
        raise CheckpointError(f"{out}: written tensors differ from {source}")
    return out


_SECTION = "## Hallucination-flag calibration"


def card_section(calibration: Any, command: str) -> str:
    """The model card's calibration section (Markdown)."""
    cal = calibration
    lines = [
        _SECTION,
        "",
        f"Thresholds of `flag_hallucinations` for this model, stored in the checkpoint's "
        f"metadata (`extra.flag_calibration`), written by `{command}`. Known-good held-out "
        f"pairs: {', '.join(cal.data.get('pairs', []))}. Each signal's threshold is its "
        f"q-quantile over the known-good tissue cells of a size, with q chosen so that "
        f"{cal.target_false_flag_rate:.0%} of them are flagged by at least one signal; "
        "then every threshold's distance from the median is multiplied by the transfer "
        "factor, so that the same rate holds leave one image out (each image's cells "
        "against thresholds from the other images: what a slide the calibration never saw "
        "gets) (`docs/flags.md`). Nuclear gain (stain hematoxylin / F LoG response): "
        f"{cal.nuclei_gain:.3f} over {cal.data.get('nuclei', 0)} clear F nuclei.",
        "",
        "| cell (px) | known-good cells | q | flagged | leave one image out | factor | "
        + " | ".join(_short())
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(_short()),
    ]
    from napari_confocal_stain.measure.flags import SIGNALS

    for i, c in enumerate(cal.cells):
        m = cal.measured.get(str(c), {})
        thr = " | ".join(f"{cal.tail[k][i]:.3g}" for k in SIGNALS)
        before, after = m.get("leave_one_out_rate_before"), m.get("leave_one_out_rate")
        loo = "" if before is None or after is None else f"{before:.3f} → {after:.3f}"
        lines.append(
            f"| {c} | {m.get('cells', '')} | {m.get('quantile', float('nan')):.4f} | "
            f"{m.get('false_flag_rate', float('nan')):.3f} | {loo} | "
            f"×{cal.combined[i]:.3f} | {thr} |"
        )
    lines += [
        "",
        "Signal thresholds above are the raw in-sample values (`docs/flags.md` defines "
        "each), before the factor; between calibrated sizes they are interpolated in "
        "log2(cell).",
        "",
    ]
    return "\n".join(lines)


def _short() -> list[str]:
    from napari_confocal_stain.measure.flags import SIGNALS

    return [s.replace("_nuclei", "").replace("_", " ") for s in SIGNALS]


def update_card(card: str | Path, section: str) -> Path:
    """Insert or replace the calibration section of a Markdown model card, atomically."""
    from napari_confocal_stain._fs import write_atomic

    card = Path(card)
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    pattern = re.compile(rf"^{re.escape(_SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    write_atomic(card, text.encode("utf-8"))
    return card


def run_calibrate(config: Mapping[str, Any], progress: bool = True) -> dict[str, Any]:
    """The ``calibrate`` command: calibrate a model, write the checkpoint and card.

    Returns
    -------
    dict
        ``out`` (checkpoint path), ``card`` (or None) and ``measured`` per cell size.
    """
    from napari_confocal_stain.inference import load_model
    from napari_confocal_stain.models.checkpoint import checkpoint_path
    from training.runstate import seed_everything

    seed_everything(int(config["seed"]), config.get("threads"))
    source = checkpoint_path(config["model"])
    if config.get("in_place"):
        out = source
    elif config.get("out"):
        out = Path(config["out"])
    else:
        raise ValueError("calibrate: give --out PATH (a new checkpoint) or --in-place")
    target = float(config["target_false_flag_rate"])
    if not 0 < target < 1:
        raise ValueError(f"target_false_flag_rate must be in (0, 1), got {target}")
    cells = [int(c) for c in config["cells"]]
    if not cells or any(c < 64 or c > 1024 for c in cells):
        raise ValueError(f"cells must be between 64 and 1024 px, got {cells}")
    say = print if progress else None
    d = config["data"]
    pairs = he_pairs(d.get("he") or [], d.get("speckle"), int(config["seed"]))
    pairs += synthetic_pairs(d.get("synthetic") or [])
    if not pairs:
        raise ValueError("calibrate: no calibration images (data.he, data.synthetic)")
    model = load_model(source, device=config.get("device", "cpu"))
    stain_pairs(
        pairs,
        model,
        strategy=config["strategy"],
        tile=int(config["tile"]),
        device=config.get("device", "cpu"),
        progress=say,
    )
    name = str(config["model"])
    cal = calibrate_model(
        pairs,
        cells=cells,
        target=target,
        transfer=bool(config.get("transfer", True)),
        model_name=name,
        progress=say,
    )
    write_calibrated_checkpoint(source, out, cal)
    card = config.get("card")
    if card is None and out.with_suffix(".md").is_file():
        card = out.with_suffix(".md")
    if card is not None:
        command = f"python -m training calibrate --model {name}"
        update_card(card, card_section(cal, command))
    return {
        "out": str(out),
        "card": None if card is None else str(card),
        "nuclei_gain": cal.nuclei_gain,
        "measured": {
            c: {k: v for k, v in m.items() if k != "per_signal_rate"}
            for c, m in cal.measured.items()
        },
    }
