"""Held-out scoring of stain models and despecklers: the metrics, the tile sets, the columns.

The trainers score themselves with it while they train (``val.csv`` of ``cyclegan`` and
``distill``, the table of ``despeckle``) and ``python -m training evaluate`` scores finished
models with it, so every table shares one definition of each column.

**Stain models**, on ``(H, W, 3)`` RGB in [0, 1] (luminance inside the metrics), per tile:

``ssim_truth``       SSIM(output, true H&E) — fidelity; only pseudo-confocal pairs have it.
``lbp_chi2_truth``   LBP χ²(true H&E, output).
``lbp_chi2_tissue``  the same over the pixels where the true H&E is not glass (luminance
                     < :data:`GLASS_LUMINANCE`): white background holds only the scanner's
                     grain, which LBP weighs as much as tissue texture (it ignores contrast).
``ssim_input``       SSIM(DSCM input, output) — the thesis's structure metric (§3.5.2).
``lbp_chi2_input``   LBP χ²(DSCM input, output) — the thesis's hallucination metric (§3.5.1).
``nuclei_*``         nuclei detected in F (LoG) and in the output's hematoxylin, matched one to
                     one within the smallest nuclear diameter; ``nuclei_preserved`` is
                     matched / F nuclei, summed over tiles.

SSIM and LBP χ² are :func:`napari_confocal_stain.core.metrics.ssim_map` and
:func:`~napari_confocal_stain.core.metrics.lbp_chi2_map` with one cell per tile (Gaussian
SSIM σ = 1.5; 8-neighbour radius-1 LBP with all 256 codes; χ² = ½ Σ (p − q)² / (p + q) of
the normalised histograms). Nuclei come from :mod:`napari_confocal_stain.core.nuclei`.

**Despecklers**, per tile then averaged over tiles, of the speckled input, the output and the
output after a median filter, against the clean tile:

* PSNR = ``10 log10(1 / MSE)`` with data range 1.
* SSIM = ``skimage.metrics.structural_similarity(clean, test, data_range=1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (Wang et al. 2004's
  Gaussian-window definition, the one :mod:`napari_confocal_stain.core.metrics` uses).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import median_filter
from skimage.metrics import structural_similarity
from torch import nn

from napari_confocal_stain.core.metrics import (
    chi2_distance,
    lbp_chi2_map,
    lbp_codes,
    luminance,
    ssim_map,
)
from napari_confocal_stain.core.nuclei import nuclei_preservation_map
from training.data import (
    TissueRegion,
    dscm_tensor,
    inverted_luma,
    pseudo_confocal,
    read_he,
    resize_to_pixel_size,
    tile_grid_regions,
)
from training.noise import add_speckle, speckle_kwargs

__all__ = [
    "DESPECKLE_METRICS",
    "GLASS_LUMINANCE",
    "INPUT_ROW",
    "STAIN_METRICS",
    "TRUTH_ROW",
    "ValidationSet",
    "aggregate_stain_metrics",
    "denoise",
    "despeckle_eval_sets",
    "dscm_image",
    "evaluate_despeckler",
    "image_entry",
    "make_validation_set",
    "psnr",
    "run_generator",
    "sample_rows",
    "speckled",
    "ssim",
    "stain_metrics",
    "tissue_lbp_chi2",
    "truth_reference",
    "validate",
]

STAIN_METRICS = (
    "tiles",
    "ssim_truth",
    "lbp_chi2_truth",
    "lbp_chi2_tissue",
    "ssim_input",
    "lbp_chi2_input",
    "nuclei_f",
    "nuclei_output",
    "nuclei_matched",
    "nuclei_preserved",
    "nuclei_invented",
)
"""The columns of a stain model's scores (:func:`aggregate_stain_metrics`)."""
DESPECKLE_METRICS = (
    "tiles",
    "psnr_in",
    "psnr_out",
    "psnr_out_median",
    "ssim_in",
    "ssim_out",
    "ssim_out_median",
)
"""The columns of a despeckler's scores (:func:`evaluate_despeckler`)."""
GLASS_LUMINANCE = 0.95
"""True-H&E luminance at and above which a pixel is glass for ``lbp_chi2_tissue`` (the
held-out images' background is 0.97–0.99 with JPEG and scanner grain)."""
INPUT_ROW = "linear-stain (input)"
"""Row name of the linear stain scored as if it were the output: where a generator starts."""
TRUTH_ROW = "true H&E (reference)"
"""Row name of the true H&E scored as if it were the output: the ceiling."""


# ---------------------------------------------------------------------------- stain models


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


def dscm_image(dscm: np.ndarray) -> np.ndarray:
    """A ``(3, H, W)`` DSCM tile in [-1, 1] as the ``(H, W, 3)`` image in [0, 1] it shows."""
    return (dscm.transpose(1, 2, 0) + 1.0) / 2.0


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
        "lbp_chi2_tissue": math.nan,
    }
    if truth is not None:
        out["ssim_truth"] = float(ssim_map(truth, output, cell, workers=1)[0, 0])
        out["lbp_chi2_truth"] = float(lbp_chi2_map(truth, output, cell, workers=1)[0, 0])
        out["lbp_chi2_tissue"] = tissue_lbp_chi2(truth, output)
    nuc = nuclei_preservation_map(f, output, cell, pixel_size_um, workers=1).totals
    out.update(
        nuclei_f=nuc["source"],
        nuclei_output=nuc["output"],
        nuclei_matched=nuc["matched"],
        nuclei_invented=nuc["invented"],
    )
    return out


def tissue_lbp_chi2(truth: np.ndarray, output: np.ndarray) -> float:
    """LBP χ² of two ``(H, W, 3)`` images over the pixels where ``truth`` is not glass.

    The codes are those of :func:`~napari_confocal_stain.core.metrics.lbp_codes` on the
    whole tile (neighbours across the tissue edge count); only which pixels enter the two
    histograms changes. NaN if the tile has no tissue pixel.
    """
    tissue = np.asarray(luminance(truth)) < GLASS_LUMINANCE
    if not tissue.any():
        return math.nan
    codes = [lbp_codes(np.asarray(luminance(v), np.float64))[tissue] for v in (truth, output)]
    p, q = (np.bincount(c, minlength=256) for c in codes)
    return float(chi2_distance(p, q))


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
    for key in ("ssim_truth", "lbp_chi2_truth", "lbp_chi2_tissue", "ssim_input", "lbp_chi2_input"):
        vals = [t[key] for t in per_tile if not math.isnan(t[key])]
        agg[key] = float(np.mean(vals)) if vals else math.nan
    for key in ("nuclei_f", "nuclei_output", "nuclei_matched", "nuclei_invented"):
        agg[key] = int(sum(t[key] for t in per_tile))
    agg["nuclei_preserved"] = (
        agg["nuclei_matched"] / agg["nuclei_f"] if agg["nuclei_f"] else math.nan
    )
    return agg


@dataclass
class ValidationSet:
    """Held-out pseudo-confocal tiles with their true H&E (or confocal tiles without).

    Attributes
    ----------
    dscm
        ``(3, s, s)`` inputs in [-1, 1].
    f
        ``(s, s)`` fluorescence (for nuclei).
    truth
        ``(s, s, 3)`` true H&E in [0, 1], or None for real confocal tiles.
    """

    dscm: list[np.ndarray]
    f: list[np.ndarray]
    truth: list[np.ndarray] | None

    def __len__(self) -> int:
        return len(self.dscm)


def make_validation_set(
    regions: Sequence[TissueRegion],
    size: int,
    count: int,
    *,
    min_tissue: float = 0.5,
    speckle: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ValidationSet:
    """Non-overlapping tissue tiles of held-out regions as pseudo-confocal pairs.

    Tile ``i``'s speckle uses ``default_rng([seed, 4, i])``: every epoch and every model is
    scored on the very same inputs. Confocal regions (``modes``) give tiles without truth.
    """
    dscm, fs, truth = [], [], []
    for i, (region, y, x) in enumerate(tile_grid_regions(regions, size, min_tissue, count)):
        if region.modes is not None:
            r, f = (region.modes[y : y + size, x : x + size, c] for c in (0, 1))
            truth = None
        else:
            rgb = region.rgb[y : y + size, x : x + size]
            rng = np.random.default_rng([seed, 4, i])
            r, f = pseudo_confocal(rgb, region.hed_scale, rng, speckle=speckle)
            if truth is not None:
                truth.append(rgb)
        dscm.append(dscm_tensor(r, f))
        fs.append(f)
    return ValidationSet(dscm, fs, truth)


def validate(generator: nn.Module | None, val: ValidationSet) -> dict[str, float]:
    """Aggregate stain metrics of ``generator`` on ``val`` (None: score the input itself).

    The generator is scored in eval mode and left in the mode it came in.
    """
    per_tile = []
    was_training = generator.training if generator is not None else False
    if generator is not None:
        generator.eval()
    for i, x in enumerate(val.dscm):
        dscm01 = dscm_image(x)
        out = dscm01 if generator is None else run_generator(generator, x)
        truth = val.truth[i] if val.truth is not None else None
        per_tile.append(stain_metrics(dscm01, out, val.f[i], truth))
    if generator is not None and was_training:
        generator.train()
    return aggregate_stain_metrics(per_tile)


def truth_reference(val: ValidationSet) -> dict[str, float] | None:
    """Metrics of the true H&E as if it were the output: the ceiling a model can reach."""
    if val.truth is None:
        return None
    per_tile = [
        stain_metrics(dscm_image(x), t, f, t)
        for x, f, t in zip(val.dscm, val.f, val.truth, strict=True)
    ]
    return aggregate_stain_metrics(per_tile)


def sample_rows(
    val: ValidationSet, generators: Sequence[nn.Module], count: int
) -> list[list[np.ndarray]]:
    """Rows of a sample grid: per tile the input, each generator's output, the true H&E.

    The first ``count`` tiles of ``val``; generators run in eval mode and are left in the
    mode they came in.
    """
    modes = [g.training for g in generators]
    for g in generators:
        g.eval()
    rows = []
    for k in range(min(count, len(val))):
        x = val.dscm[k]
        row = [dscm_image(x), *(run_generator(g, x) for g in generators)]
        if val.truth is not None:
            row.append(val.truth[k])
        rows.append(row)
    for g, training in zip(generators, modes, strict=True):
        g.train(training)
    return rows


# ------------------------------------------------------------------------------ despecklers


def psnr(clean: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    mse = float(np.mean((np.asarray(clean, np.float64) - np.asarray(test, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(clean: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Gaussian-window SSIM (σ = 1.5, population covariances) of two grey images."""
    return float(
        structural_similarity(
            np.asarray(clean, np.float64),
            np.asarray(test, np.float64),
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def speckled(clean: np.ndarray, noise: Mapping[str, Any], seed: int, index: int) -> np.ndarray:
    """Evaluation tile ``index`` with its speckle, from ``default_rng([seed, 2, index])``.

    The same draw for every model, so their scores compare.
    """
    rng = np.random.default_rng([seed, 2, index])
    return add_speckle(clean, rng=rng, **speckle_kwargs(noise))


@torch.no_grad()
def denoise(model: nn.Module, noisy: np.ndarray) -> np.ndarray:
    """A despeckler's ``(H, W)`` output for one ``(H, W)`` image, on the model's device."""
    device = next(model.parameters()).device
    return model(torch.from_numpy(noisy[None, None]).to(device))[0, 0].float().cpu().numpy()


def evaluate_despeckler(
    model: nn.Module,
    tiles: Sequence[np.ndarray],
    noise: Mapping[str, Any],
    seed: int = 0,
    median: int = 3,
) -> dict[str, float]:
    """Mean PSNR / SSIM of noisy input, output and median-filtered output against clean.

    Parameters
    ----------
    model
        A despeckler (eval mode).
    tiles
        Clean ``(H, W)`` tiles in [0, 1].
    noise
        The speckle to add (``{"model", "looks"|"sigma"}``; see :func:`speckled`).
    seed
        Noise seed.
    median
        Median filter size applied to the output (0 or 1: none).

    Returns
    -------
    dict
        :data:`DESPECKLE_METRICS`.
    """
    sums: dict[str, float] = {}
    for i, clean in enumerate(tiles):
        noisy = speckled(clean, noise, seed, i)
        out = denoise(model, noisy)
        med = median_filter(out, size=median, mode="reflect") if median > 1 else out
        for name, test in (("in", noisy), ("out", out), ("out_median", med)):
            sums[f"psnr_{name}"] = sums.get(f"psnr_{name}", 0.0) + psnr(clean, test)
            sums[f"ssim_{name}"] = sums.get(f"ssim_{name}", 0.0) + ssim(clean, test)
    n = max(len(tiles), 1)
    return {"tiles": len(tiles), **{k: v / n for k, v in sums.items()}}


def image_entry(entry: Any) -> tuple[str, float | None]:
    """An extra image of a config: a path, or ``{"path": ..., "pixel_size_um": ...}``."""
    if isinstance(entry, Mapping):
        return str(entry["path"]), entry.get("pixel_size_um")
    return str(entry), None


def despeckle_eval_sets(
    regions: Sequence[TissueRegion],
    size: int,
    count: int,
    min_tissue: float,
    extra: Iterable[Any] = (),
) -> dict[str, list[np.ndarray]]:
    """Clean evaluation tiles (inverted luma), per evaluation set.

    The held-out regions give ``count`` tissue tiles of ``size``² (set ``heldout-bands``);
    every ``extra`` image (see :func:`image_entry`; resized to 0.75 µm/px when its pixel size
    is known) gives its own set of non-overlapping tiles, named after the file.
    """
    tiles = tile_grid_regions(regions, size, min_tissue, count)
    sets = {
        "heldout-bands": [inverted_luma(r.rgb[y : y + size, x : x + size]) for r, y, x in tiles]
    }
    for entry in extra:
        he = read_he(*image_entry(entry))
        img = inverted_luma(resize_to_pixel_size(he.rgb, he.pixel_size_um))
        s = min(size, *img.shape)
        sets[he.name] = [
            img[y : y + s, x : x + s]
            for y in range(0, img.shape[0] - s + 1, s)
            for x in range(0, img.shape[1] - s + 1, s)
        ]
    return sets
