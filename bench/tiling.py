"""Benchmark the whole-slide inference strategies side by side (issue 3 targets).

For each strategy on one region and tile size, with a random-initialised (seeded) U-Net:

* model pixels processed per output pixel (the model's work factor),
* wall time ÷ wall time of ``independent`` on the same region (also CPU time ÷ CPU time),
* seam index (``core/seams.py``: boundary step at the strategy's tile boundaries ÷ the same at
  the same places under a grid shifted by half a period).

Peer: MONAI ``sliding_window_inference`` (gaussian, overlap 0.25, roi = tile) on the same model
and region, its predictor given the same fast execution as our strategies (the engine's copy
of the model, channels-last, plain instance norms). MONAI is a benchmark-only extra
(``pip install monai``); without it that row is skipped. Also: the raw U-Net throughput on
fixed tile batches as a fraction of this machine's fp32 matmul FLOP/s, measured in the same
run, for the model as built and for the engine's channels-last copy.

The shared 2-core machine is noisy, so after a discarded warm-up the 1×-work strategies and
MONAI are run interleaved: once with the grid shifted by half a period (the seam index's
reference run) and ``--repeats`` times at origin 0; every run's time is scaled to the
origin-0 model pixels (a shifted grid adds edge tiles) and medians are reported, wall and
CPU time. The overlapping strategies (4× and 16× the work) are timed on a central sub-region
and scaled to the full region by the ratio of model pixels (exact plan counts), as the output
says; ``pyramid-flat`` reuses ``pyramid``'s model outputs (same windows) for its seam index.

Run ``python bench/tiling.py --help``; ``--size 1024 --base-filters 16`` is a quick run.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_confocal_stain.core.seams import reference_difference, seam_index
from napari_confocal_stain.core.tiling import plan_tiles, seam_period
from napari_confocal_stain.inference import make_seamless, stain_region
from napari_confocal_stain.models.flops import flops_per_pixel
from napari_confocal_stain.models.generators import UNetGenerator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "he"


def load_region(size: int) -> tuple[np.ndarray, str]:
    """A ``size²`` pseudo-DSCM (H&E RGB in [0, 1]) from the CMU slide, or the tiled crop."""
    svs = DATA / "cmu_small_region.svs"
    try:
        import tifffile

        with tifffile.TiffFile(svs) as tif:
            level = tif.series[0].levels[0].asarray()
        h, w = level.shape[:2]
        if size <= h and size <= w:
            y0, x0 = max(0, (h - size) // 2 - 200), max(0, (w - size) // 2)
            src = f"{svs.name} rows {y0}:{y0 + size}, cols {x0}:{x0 + size}"
            return level[y0 : y0 + size, x0 : x0 + size, :3].astype(np.float32) / 255.0, src
    except (OSError, ValueError, ImportError):
        pass
    from skimage.io import imread

    crop = imread(DATA / "cmu_small_region_crop1024.png")[..., :3].astype(np.float32) / 255.0
    reps = -(-size // crop.shape[0])
    extra = (reps - 1) * crop.shape[0]
    tiled = np.pad(crop, ((0, extra), (0, extra), (0, 0)), mode="symmetric")
    return tiled[:size, :size], f"cmu_small_region_crop1024.png mirrored to {size}²"


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 ``torch.mm`` FLOP/s of ``n × n`` products (the machine's physical limit)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def unet_throughput(
    model: torch.nn.Module, tile: int, repeats: int = 3, channels_last: bool = False
) -> dict[str, float]:
    """Median megapixels/s of a model on ``(B, 3, tile, tile)`` batches (best B)."""
    best: dict[str, float] = {"mps": 0.0}
    with torch.inference_mode():
        for batch in (1, 2):
            x = torch.rand(batch, 3, tile, tile) * 2 - 1
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                runs.append(time.perf_counter() - t0)
            mps = batch * tile * tile / statistics.median(runs) / 1e6
            if mps > best["mps"]:
                best = {"mps": mps, "batch": batch}
    return best


@dataclass
class Row:
    """Measurements of one strategy: runs as (wall s, CPU s, model pixels of that run)."""

    name: str
    full_px: float = float("nan")
    runs: list[tuple[float, float, float]] = field(default_factory=list)
    seam: float = float("nan")
    note: str = ""
    outputs: list[np.ndarray] = field(default_factory=list)

    def time(self, which: int) -> float:
        """Median wall (0) or CPU (1) time scaled to the full region's model pixels."""
        return statistics.median(r[which] * self.full_px / r[2] for r in self.runs)


def timed(fn):
    """Run ``fn()``; return (result, wall seconds, process CPU seconds)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def monai_run(img: np.ndarray, model, tile: int, shift: int) -> tuple[np.ndarray, float, list]:
    """MONAI sliding window (gaussian, overlap 0.25); ``shift`` pads to move its window grid."""
    from monai.inferers import sliding_window_inference

    seen = {"px": 0}
    starts: set[int] = set()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        seen["px"] += x.shape[0] * x.shape[-2] * x.shape[-1]
        # The same fast execution as our strategies: engine copy, channels-last.
        return model(x.contiguous(memory_format=torch.channels_last)).contiguous()

    padded = np.pad(img, ((shift, shift), (shift, shift), (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None] * 2 - 1
    with torch.inference_mode():
        y = sliding_window_inference(x, tile, 1, predictor, overlap=0.25, mode="gaussian")
    h, w = img.shape[:2]
    out = ((y[0, :, shift : shift + h, shift : shift + w] + 1) / 2).clamp(0, 1)
    # Window edges MONAI uses along an axis (its scan: stride = tile·(1 − overlap)).
    length = padded.shape[0]
    stride = int(tile * 0.75)
    n = -(-(length - tile) // stride) + 1
    for k in range(n):
        s0 = min(k * stride, length - tile)
        starts.update({s0 - shift, s0 + tile - shift})
    return out.permute(1, 2, 0).numpy(), seen["px"] / float(h * w), sorted(starts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2048, help="region side (default 2048)")
    p.add_argument("--tile", type=int, default=512, help="tile N (default 512)")
    p.add_argument("--base-filters", type=int, default=64, help="U-Net base filters (64)")
    p.add_argument("--n-down", type=int, default=3, help="U-Net downsamplings (3)")
    p.add_argument("--repeats", type=int, default=2,
                   help="origin-0 rounds on the full region (plus one shifted round)")  # fmt: skip
    p.add_argument("--crop-size", type=int, default=0,
                   help="sub-region for `crop` (default: size/2)")  # fmt: skip
    p.add_argument("--pyramid-size", type=int, default=0,
                   help="sub-region for the pyramids (default: 3·size/8)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI peer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cmd = "python bench/tiling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    size, tile = args.size, args.tile
    crop_size = args.crop_size or max(tile, size // 2)
    pyr_size = args.pyramid_size or max(tile, (3 * size // 8) // 64 * 64)

    torch.manual_seed(args.seed)
    model = UNetGenerator(base_filters=args.base_filters, n_down=args.n_down).eval()
    img, source = load_region(size)
    print(f"# bench/tiling.py — {platform.machine()} {platform.processor() or ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"# region {size}² from {source}; tile {tile}; U-Net base {args.base_filters}, "
        f"n_down {args.n_down}, random init seed {args.seed}; CPU fp32; no background skip"
    )
    print(f"# reproduce: {cmd}", flush=True)

    # --- physical limit and raw throughput ----------------------------------------------------
    peak = matmul_peak()
    fpp = flops_per_pixel(model, (3, tile, tile))
    print(f"\nmatmul fp32 peak (torch.mm 2048², best of 5): {peak / 1e9:.1f} GFLOP/s")
    print(f"U-Net: {fpp / 1e3:.1f} kFLOP per pixel (convolutions, 2 FLOP per MAC)")
    for label, net, cl in (
        ("the model as built (NCHW)", model, False),
        ("the engine's copy, channels-last (what stain_region runs)", make_seamless(model), True),
    ):
        thr = unet_throughput(net, tile, channels_last=cl)
        achieved = thr["mps"] * 1e6 * fpp
        print(f"  {label}: {thr['mps']:.3f} MP/s on {int(thr['batch'])}×{tile}² batches = "
              f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f} % of matmul peak",
              flush=True)  # fmt: skip

    kw = {"tile": tile, "device": "cpu", "precision": "fp32", "skip_background": False}
    rows: dict[str, Row] = {}
    full = float(size * size)

    def run(name: str, strategy: str, image: np.ndarray, shift: int, **extra) -> None:
        row = rows.setdefault(name, Row(name))
        report: dict = {}
        out, wall, cpu = timed(lambda: stain_region(
            image, model, strategy=strategy, origin=(shift, shift), report=report, **kw, **extra
        ))  # fmt: skip
        row.runs.append((wall, cpu, float(report["model_pixels"])))
        row.outputs.append(out)
        print(f"  {name:<22} {image.shape[0]}², origin {shift:>4}: {wall:7.1f} s wall, "
              f"{cpu:7.1f} s CPU, work {report['work']:.3f}", flush=True)  # fmt: skip

    engine = make_seamless(model)  # MONAI's predictor: the engine's copy, no grid (plain IN)
    have_monai = False
    if not args.no_monai:
        try:
            import monai  # noqa: F401

            have_monai = True
        except ImportError:
            print("\nMONAI is not installed (benchmark-only extra: pip install monai); "
                  "its row is skipped")  # fmt: skip

    # Warm-up (discarded): first calls pay one-off costs (oneDNN kernel selection, allocator).
    warm = img[: size // 2, : size // 2]
    for strategy in ("independent", "seamless"):
        stain_region(warm, model, strategy=strategy, **kw)

    # --- the 1×-work strategies and the peer, interleaved, on the full region ------------------
    # Every run counts for time (scaled to the origin-0 model pixels: a shifted grid has extra
    # edge tiles); the first origin-0 and the shifted run are the seam-index pair.
    half = tile // 2
    print(f"\nfull region {size}² (the shifted runs feed the seam index):")
    monai_edges: list[int] = []
    rounds = [0, half] + [0] * max(0, args.repeats - 1)
    for shift in rounds:
        run("independent", "independent", img, shift)
        run("seamless", "seamless", img, shift)
        if have_monai:
            row = rows.setdefault("monai", Row("monai"))
            mshift = (3 * tile) // 8 if shift else 0  # half MONAI's stride (0.75·tile)
            (out, work, edges), wall, cpu = timed(lambda s=mshift: monai_run(img, engine, tile, s))
            row.runs.append((wall, cpu, work * full))
            if not row.outputs or shift:
                row.outputs.append(out)
            if not monai_edges:
                monai_edges = edges
                row.full_px = work * full
            print(f"  {'monai (gaussian 0.25)':<22} {size}², shift  {mshift:>4}: {wall:7.1f} s "
                  f"wall, {cpu:7.1f} s CPU, work {work:.3f}", flush=True)  # fmt: skip
    rows["independent"].full_px = float(plan_tiles("independent", (size, size), tile).model_pixels)
    rows["seamless"].full_px = rows["seamless"].runs[0][2]
    # Seamless against a run whose fine statistics lattice is shifted by half a cell (N/16):
    run("seamless (lattice/2)", "seamless", img, tile // 16)

    # --- the overlap strategies on sub-regions, scaled by model work ---------------------------
    sub = {"crop": crop_size, "pyramid": pyr_size, "pyramid-flat": pyr_size}
    for strategy in ("crop", "pyramid", "pyramid-flat"):
        n = sub[strategy]
        part = img[(size - n) // 2 : (size - n) // 2 + n, (size - n) // 2 : (size - n) // 2 + n]
        period = seam_period(strategy, tile)
        full_px = plan_tiles(strategy, (size, size), tile).model_pixels
        print(f"\n{strategy} on the central {n}² (grid period {period}):")
        if strategy == "pyramid-flat":
            # Same windows as `pyramid`: reuse its model outputs (its time is pyramid's).
            cache = rows["pyramid"].__dict__["cache"]

            def cached(m, x, cache=cache):
                key = hashlib.sha1(x.numpy().tobytes()).digest()
                if key not in cache:
                    cache[key] = m(x)
                return cache[key]

            row = rows.setdefault(strategy, Row(strategy))
            for shift in (0, period // 2):
                out = stain_region(part, model, strategy=strategy, batch_size=1,
                                   origin=(shift, shift), runner=cached, **kw)  # fmt: skip
                row.outputs.append(out)
            row.runs, row.full_px = rows["pyramid"].runs, rows["pyramid"].full_px
            row.note = "same windows as pyramid: its model outputs and time reused"
            print("  (model outputs reused from pyramid)")
            continue
        cache: dict[bytes, torch.Tensor] = {}

        def keep(m, x, cache=cache):
            y = m(x)
            cache[hashlib.sha1(x.numpy().tobytes()).digest()] = y
            return y

        for shift in (0, period // 2):
            if strategy == "pyramid":
                run(strategy, strategy, part, shift, runner=keep, batch_size=1)
            else:
                run(strategy, strategy, part, shift)
        row = rows[strategy]
        row.__dict__["cache"] = cache
        row.full_px = float(full_px)
        row.note = f"timed on {n}², scaled to {size}² by model pixels"

    # KIN-style statistics (one cell per tile) on the pyramid region, for the record.
    n = pyr_size
    part = img[(size - n) // 2 : (size - n) // 2 + n, (size - n) // 2 : (size - n) // 2 + n]
    print(f"\nseamless variants on the central {n}² (KIN-style K=1; default K=8)")
    kin = [stain_region(part, model, origin=(s, s), subdivisions=1, **kw) for s in (0, half)]
    sea_part = stain_region(part, model, **kw)

    # --- seam indices --------------------------------------------------------------------------
    def seam(name: str, period: int) -> float:
        return seam_index(rows[name].outputs[0], rows[name].outputs[1], period)

    for name in ("independent", "seamless", "crop", "pyramid", "pyramid-flat"):
        rows[name].seam = seam(name, seam_period(name, tile))
    lattice = rows.pop("seamless (lattice/2)")
    sea0 = rows["seamless"].outputs[0]
    if have_monai:
        m = rows["monai"]
        m.seam = seam_index(m.outputs[0], m.outputs[1], tile,
                            boundaries=(np.array(monai_edges), np.array(monai_edges)))  # fmt: skip
        m.note = "boundaries: its window edges; shifted run: reflect-padded by 3/8 tile"
    rows["seamless"].note = (
        f"vs lattice shifted N/16: {seam_index(sea0, lattice.outputs[0], tile):.3f} at tile "
        f"lines, {seam_index(sea0, lattice.outputs[0], tile // 8):.3f} at lattice lines"
    )
    kin_seam = seam_index(kin[0], kin[1], tile)
    pyr_ref = rows["pyramid"].outputs[0]
    diff = reference_difference(sea_part, pyr_ref)

    # --- table ---------------------------------------------------------------------------------
    ind_wall, ind_cpu = rows["independent"].time(0), rows["independent"].time(1)
    print("\n| strategy | model px / output px | wall time ÷ independent | CPU time ÷ "
          "independent | seam index | note |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in ("independent", "seamless", "monai", "crop", "pyramid", "pyramid-flat"):
        if name not in rows:
            continue
        r = rows[name]
        print(f"| {name} | {r.full_px / full:.3f} | {r.time(0) / ind_wall:.3f} | "
              f"{r.time(1) / ind_cpu:.3f} | {r.seam:.3f} | {r.note} |")  # fmt: skip
    print(f"\nindependent on {size}²: median {ind_wall:.1f} s wall over "
          f"{len(rows['independent'].runs)} runs (the unit of the ratios above)")  # fmt: skip
    print(f"seamless with KIN-style statistics (1 cell per tile) on {n}²: seam index "
          f"{kin_seam:.3f}")  # fmt: skip
    print(f"seamless vs pyramid (Bel et al.) output on {n}²: mean |Δ| {diff['mean_abs']:.4f}, "
          f"max {diff['max_abs']:.3f}, PSNR {diff['psnr']:.1f} dB")  # fmt: skip
    sea_ratio = rows["seamless"].time(0) / ind_wall
    verdict = "meets" if sea_ratio <= 1.25 and rows["seamless"].seam <= 1.05 else "MISSES"
    print(f"target (seamless: time ratio ≤ 1.25, seam ≤ 1.05): {verdict} "
          f"({sea_ratio:.3f}, {rows['seamless'].seam:.3f})")  # fmt: skip
    print(f"# reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
