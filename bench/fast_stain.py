"""The default stain model against the old U-Net, in one run: speed, quality per tissue, viewport.

Both models run through the engine's :func:`~napari_confocal_stain.inference.stain_region`
(``seamless`` strategy, 512-px tiles), as the viewer, ``export`` and ``metrics`` run them:

* **speed** — a 1920 × 1080 pseudo-confocal DSCM viewport cut from the CC0 slide, after a
  warm-up, the models interleaved ``--repeats`` times (the shared machine is noisy); median
  wall time → MP/s, and the ratio new ÷ old from the same run. ``precision="auto"`` (the
  viewer's default: bf16 autocast where this CPU's one-off calibration finds it faster and
  within tolerance, else fp32) and, for the new model, fp32 too. Prints which path ran.
* **quality per tissue** — every held-out set of :mod:`training.tissues` (the CC0 slide's
  held-out bands and the held-out images, never trained on) as pseudo-confocal pairs
  (Gaussian(1, 0.2) speckle on R), each region stained whole, then scored on its 128² tissue
  tiles against the true H&E: SSIM and LBP χ² on luminance, nuclei preserved
  (:func:`training.validation.stain_metrics`); the linear stain as the reference row.
* **viewport after a pan** (``--viewport``) — ``bench/viewport.py --parts gan`` in a
  subprocess (under ``xvfb-run`` when there is no display): a real napari viewer on a 8192²
  synthetic slide, median over fresh places of the time from the pan ending to the first tile
  and to the whole 1920 × 1080 view on screen.

    python bench/fast_stain.py
    python bench/fast_stain.py --repeats 5 --viewport --markdown bench/RESULTS-fast_stain.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_confocal_stain.inference import load_model, stain_region
from napari_confocal_stain.inference.precision import cpu_precision
from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from light_model import pseudo_dscm  # noqa: E402  (bench/ is sys.path[0] when run)

from training.config import expand_paths  # noqa: E402
from training.data import load_he_regions  # noqa: E402
from training.tissues import image_entries  # noqa: E402
from training.validation import aggregate_stain_metrics, stain_metrics  # noqa: E402

DATA = Path(os.environ.get("NCS_DATA", REPO.parent / "shared" / "data"))
TILE = 128


def heldout_sets() -> dict[str, list]:
    """Held-out regions per tissue: the CC0 slide's bands 2 and 5, then each held-out image."""
    cc0 = load_he_regions([DATA / "he" / "cmu_small_region.svs"], bands=6,
                          order=["source", "target", "heldout"])  # fmt: skip
    sets = {"CC0 skin, held-out bands": cc0["heldout"]}
    for entry in expand_paths(image_entries("heldout")):
        whole = load_he_regions([entry["path"]], bands=0, order=["x"],
                                pixel_size_um=entry["pixel_size_um"])  # fmt: skip
        sets[Path(entry["path"]).stem] = whole["x"]
    return sets


def viewport(regions: list, height: int, width: int) -> np.ndarray:
    """A ``height × width`` DSCM viewport tiled from the given regions' pseudo-confocal DSCM."""
    rows = np.concatenate([pseudo_dscm(r, 0)[0][:, :1400] for r in regions], axis=0)
    reps = (-(-height // rows.shape[0]), -(-width // rows.shape[1]), 1)
    return np.ascontiguousarray(np.tile(rows, reps)[:height, :width])


def quality(model: torch.nn.Module | None, regions: list) -> dict:
    """Metrics of ``model`` (None: the linear stain) on the 128² tissue tiles of regions."""
    from training.data import tile_grid_regions

    per_tile = []
    for k, region in enumerate(regions):
        dscm, f = pseudo_dscm(region, 100 + k)
        out = dscm if model is None else stain_region(dscm, model, device="cpu")
        for _, y, x in tile_grid_regions([region], TILE, 0.3):
            s = np.s_[y : y + TILE, x : x + TILE]
            per_tile.append(stain_metrics(dscm[s], out[s], f[s], region.rgb[s]))
    return aggregate_stain_metrics(per_tile)


def speed(models: dict, view: np.ndarray, repeats: int) -> dict[str, dict]:
    """Median seconds per model and precision on ``view``, interleaved, after a warm-up."""
    runs = [(name, prec) for name in models for prec in ("auto", "fp32")]
    runs = [r for r in runs if not (r[0] == "old" and r[1] == "fp32")]
    used, times = {}, {r: [] for r in runs}
    for name, prec in runs:
        report: dict = {}
        stain_region(view[:512, :512], models[name], precision=prec, device="cpu", report=report)
        used[(name, prec)] = report["precision"]
    for _ in range(repeats):
        for name, prec in runs:
            t0 = time.perf_counter()
            stain_region(view, models[name], precision=prec, device="cpu")
            times[(name, prec)].append(time.perf_counter() - t0)
    mp = view.shape[0] * view.shape[1] / 1e6
    return {
        f"{name}/{prec}": {
            "seconds": statistics.median(t),
            "mps": mp / statistics.median(t),
            "precision": used[(name, prec)],
        }
        for (name, prec), t in times.items()
    }


def run_viewport(model: str, places: int) -> str:
    """The summary lines of ``bench/viewport.py --parts gan`` in a fresh process."""
    cmd = [sys.executable, str(REPO / "bench" / "viewport.py"), "--parts", "gan", "--model",
           model, "--synthetic", "8192", "--places", str(places)]  # fmt: skip
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 2400x1400x24", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("round", "GAN"))]
    return "\n".join(lines) or f"viewport bench failed:\n{done.stderr[-2000:]}"


def _table(rows: list[dict]) -> str:
    head = ("| tissue | model | SSIM to true H&E | LBP χ² to true H&E | nuclei preserved | "
            "tiles |\n|---|---|---|---|---|---|")  # fmt: skip
    body = [
        f"| {r['set']} | {r['model']} | {r['ssim_truth']:.3f} | {r['lbp_chi2_truth']:.4f} | "
        f"{r['nuclei_preserved']:.1%} ({r['nuclei_matched']}/{r['nuclei_f']}) | {r['tiles']} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="stain-unet", help="the model to beat")
    p.add_argument("--new", default=DEFAULT_STAIN_MODEL, help="the new default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--viewport", action="store_true", help="also time the viewer after a pan")
    p.add_argument("--places", type=int, default=5, help="fresh places for --viewport")
    p.add_argument("--markdown", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    cmd = "python bench/fast_stain.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"$ {cmd}", f"CPU {cpu}, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads, load {os.getloadavg()[0]:.1f}"]  # fmt: skip
    models = {"old": load_model(args.old, device="cpu"), "new": load_model(args.new, device="cpu")}
    cal = cpu_precision(models["new"])
    lines.append(f"bf16 calibration of {args.new}: fp32 {cal['fp32_s'] * 1e3:.0f} ms, bf16 "
                 f"{cal['bf16_s'] * 1e3:.0f} ms, max |Δ| {cal['max_abs']:.4f} → "
                 f"{cal['precision']}")  # fmt: skip
    sets = heldout_sets()
    view = viewport(sets["CC0 skin, held-out bands"], 1080, 1920)
    sp = speed(models, view, args.repeats)
    for key, v in sp.items():
        name = args.old if key.startswith("old") else args.new
        lines.append(f"{name} precision={key.split('/')[1]} (ran {v['precision']}): "
                     f"{v['mps']:.2f} MP/s (median of {args.repeats}, 1920×1080)")  # fmt: skip
    ratio = sp["new/auto"]["mps"] / sp["old/auto"]["mps"]
    ratio32 = sp["new/fp32"]["mps"] / sp["old/auto"]["mps"]
    lines.append(
        f"ratio {args.new} ÷ {args.old}: {ratio:.1f}× (auto), {ratio32:.1f}× (new in fp32)"
    )
    rows = []
    for set_name, regions in sets.items():
        contenders = (("linear stain", None), (args.old, models["old"]), (args.new, models["new"]))
        for label, m in contenders:
            rows.append({"set": set_name, "model": label, **quality(m, regions)})
    lines.append(_table(rows))
    if args.viewport:
        lines.append(run_viewport(args.new, args.places))
    lines.append(f"load {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
