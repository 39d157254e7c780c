"""Benchmark the light stain model against its teacher in one run (issue 8 targets).

Teacher (default ``stain-unet``) and student (default ``stain-light``), both through the
engine's :func:`~napari_confocal_stain.inference.stain_region` with the ``seamless``
strategy, as the viewer runs them:

* **speed** — a 1920 × 1080 viewport of pseudo-confocal DSCM cut from the CC0 slide (rows and
  columns from the top-left; timing only, so it may include training bands), after a
  warm-up, teacher and student interleaved ``--repeats`` times (the shared machine is
  noisy); median wall time → MP/s. FLOPs per pixel from ``models/flops.py``.
* **quality** — the held-out bands (2 and 5 of 6, never used in training) as pseudo-confocal
  pairs, each band stained whole by ``stain_region`` (seamless), then scored on the
  non-overlapping 256² tissue tiles of the band against the true H&E: SSIM, LBP χ²
  (``training.validation.stain_metrics``) and nuclei preserved (LoG nuclei of F matched in the
  output's hematoxylin).

Targets: student ≥ 2 MP/s; its SSIM and LBP χ² within 5 % of the teacher's. The ratios
(student ÷ teacher) are printed last. ``--markdown PATH`` writes the rows as Markdown.

    python bench/light_model.py
    python bench/light_model.py --repeats 5 --markdown bench/RESULTS-light_model.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_confocal_stain.inference import load_model, stain_region
from napari_confocal_stain.models.flops import flops_per_pixel

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NCS_DATA", REPO.parent / "shared" / "data"))


def _regions() -> dict:
    sys.path.insert(0, str(REPO))
    from training.data import load_he_regions

    return load_he_regions(
        [DATA / "he" / "cmu_small_region.svs"], bands=6, order=["source", "target", "heldout"]
    )


def pseudo_dscm(region, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DSCM in [0, 1] ``(H, W, 3)`` and F of a region (Gaussian(1, 0.2) speckle on R)."""
    from training.data import dscm_tensor, pseudo_confocal

    rng = np.random.default_rng([seed, 7])
    r, f = pseudo_confocal(region.rgb, region.hed_scale, rng, speckle={"model": "gaussian"})
    return (dscm_tensor(r, f).transpose(1, 2, 0) + 1.0) / 2.0, f


def viewport(regions: dict, height: int, width: int) -> np.ndarray:
    """A ``height × width`` DSCM viewport from the slide's top-left (all bands, in order)."""
    bands = sorted((r for rs in regions.values() for r in rs), key=lambda r: r.box[0])
    rows = np.concatenate([pseudo_dscm(r, 0)[0] for r in bands], axis=0)
    if rows.shape[0] < height or rows.shape[1] < width:
        reps = (-(-height // rows.shape[0]), -(-width // rows.shape[1]), 1)
        rows = np.tile(rows, reps)
    return np.ascontiguousarray(rows[:height, :width])


def quality(model: torch.nn.Module, held: list, precision: str) -> dict:
    """SSIM / LBP χ² / nuclei of ``model`` vs the true H&E on held-out bands (seamless)."""
    from training.data import tile_grid_regions
    from training.validation import aggregate_stain_metrics, stain_metrics

    per_tile = []
    for k, region in enumerate(held):
        dscm, f = pseudo_dscm(region, 100 + k)
        out = stain_region(dscm, model, strategy="seamless", precision=precision, device="cpu")
        for _, y, x in tile_grid_regions([region], 256, 0.5):
            s = np.s_[y : y + 256, x : x + 256]
            per_tile.append(stain_metrics(dscm[s], out[s], f[s], region.rgb[s]))
    return aggregate_stain_metrics(per_tile)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="stain-unet")
    p.add_argument("--student", default="stain-light")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32", help="stain_region precision (fp32, auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--markdown", default=None, help="also write the rows to this Markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = "python bench/light_model.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    regions = _regions()
    models = {
        "teacher": load_model(args.teacher, device="cpu"),
        "student": load_model(args.student, device="cpu"),
    }
    view = viewport(regions, args.height, args.width)
    mp = args.height * args.width / 1e6
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up: engine copy, channels-last kernels
        stain_region(view[:512, :512], m, precision=args.precision, device="cpu")
    for _ in range(args.repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            stain_region(view, m, strategy="seamless", precision=args.precision, device="cpu")
            times[k].append(time.perf_counter() - t0)
    held = regions["heldout"]
    rows = []
    for k, m in models.items():
        q = quality(m, held, args.precision)
        wall = statistics.median(times[k])
        rows.append(
            {
                "role": k,
                "model": args.teacher if k == "teacher" else args.student,
                "kflop_px": flops_per_pixel(m) / 1e3,
                "seconds": wall,
                "mps": mp / wall,
                **q,
            }
        )
    t, s = rows
    head = (
        f"| model | role | kFLOP/px | {args.width}×{args.height} s (median of "
        f"{args.repeats}) | MP/s | SSIM to true H&E | LBP χ² to true H&E | nuclei preserved "
        f"| tiles |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['role']} | {r['kflop_px']:.1f} | {r['seconds']:.2f} | "
            f"{r['mps']:.2f} | {r['ssim_truth']:.4f} | {r['lbp_chi2_truth']:.4f} | "
            f"{100 * r['nuclei_preserved']:.1f} % ({r['nuclei_matched']}/{r['nuclei_f']}) | "
            f"{r['tiles']} |"
        )
    ratios = {
        "speed (MP/s)": s["mps"] / t["mps"],
        "FLOPs/px": s["kflop_px"] / t["kflop_px"],
        "SSIM": s["ssim_truth"] / t["ssim_truth"],
        "LBP χ² (lower is better)": s["lbp_chi2_truth"] / t["lbp_chi2_truth"],
        "nuclei preserved": s["nuclei_preserved"] / t["nuclei_preserved"],
    }
    within = (
        s["ssim_truth"] >= 0.95 * t["ssim_truth"]
        and s["lbp_chi2_truth"] <= 1.05 * t["lbp_chi2_truth"]
    )
    env = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, precision {args.precision}, strategy seamless "
        f"(tile 512)"
    )
    text = "\n".join(
        [
            *lines,
            "",
            f"Machine: {env}. Quality on the held-out bands 2 and 5 (of 6) of "
            "cmu_small_region.svs as pseudo-confocal pairs, each band stained whole.",
            "",
            f"Command: `{cmd.strip()}`",
            "",
            "Ratios student ÷ teacher (same run): "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
            + f"; student ≥ 2 MP/s: {'yes' if s['mps'] >= 2 else 'NO'}; SSIM and LBP χ² "
            f"within 5 % of the teacher: {'yes' if within else 'NO'}.",
        ]
    )
    if args.markdown:
        out = Path(args.markdown)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(f"## Light stain model vs teacher (`bench/light_model.py`)\n\n{text}\n")
        tmp.replace(out)
    print(text)
    print()
    for k, v in ratios.items():
        print(f"ratio student/teacher {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
