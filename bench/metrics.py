"""Benchmark: per-cell LBP-χ² + SSIM maps vs the per-cell scikit-image loop.

Input: a 4096 × 4096 "source" tiled from the real 1024² H&E crop in
``/work/shared/data/he`` (mirrored tiles, so no cell is a copy of another at the same
offset) and an "output" that is the source with a smooth colour shift, blur and noise
(what a stain network changes), both float32 RGB in [0, 1]. Both implementations
compute the same numbers (checked here: max differences printed); the speed-up ratio
is printed last.

Reproduce::

    python bench/metrics.py            # 4096², cell 512
    python bench/metrics.py --size 2048 --cell 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DATA = (
    Path(os.environ.get("NCS_DATA", "/work/shared/data")) / "he" / "cmu_small_region_crop1024.png"
)


def make_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A real-H&E-based (source, output) RGB pair of ``size``²."""
    from scipy import ndimage as ndi
    from skimage.io import imread

    tile = imread(DATA)[..., :3].astype(np.float32) / 255.0
    reps = -(-size // tile.shape[0])
    rows = [
        np.concatenate([tile[:, ::-1] if (i + j) % 2 else tile for j in range(reps)], axis=1)
        for i in range(reps)
    ]
    source = np.concatenate([r[::-1] if i % 2 else r for i, r in enumerate(rows)], axis=0)[
        :size, :size
    ]
    rng = np.random.default_rng(seed)
    output = ndi.gaussian_filter(source, (0.8, 0.8, 0))
    output *= np.float32([0.95, 0.9, 1.02])
    output += rng.normal(0, 0.02, output.shape).astype(np.float32)
    np.clip(output, 0, 1, out=output)
    return np.ascontiguousarray(source), output


def reference(source: np.ndarray, output: np.ndarray, cell: int) -> tuple[np.ndarray, ...]:
    """The slow reference: scikit-image on every cell crop, explicit χ²."""
    from skimage.feature import local_binary_pattern
    from skimage.metrics import structural_similarity

    from napari_confocal_stain.core.metrics import luminance

    # Our luminance (rgb2gray's weights to a few ulp, the same bits for any layout):
    # LBP codes flip on 1-ulp gray changes, and the comparison is of the later steps.
    gs, go = luminance(source), luminance(output)
    ny, nx = -(-gs.shape[0] // cell), -(-gs.shape[1] // cell)
    chi2 = np.zeros((ny, nx))
    ssim = np.full((ny, nx), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns on float input to LBP
        for i in range(ny):
            for j in range(nx):
                a = gs[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                b = go[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                p = np.bincount(
                    local_binary_pattern(a, 8, 1).astype(np.intp).ravel(), minlength=256
                )
                q = np.bincount(
                    local_binary_pattern(b, 8, 1).astype(np.intp).ravel(), minlength=256
                )
                p, q = p / a.size, q / b.size
                s = p + q
                k = s > 0
                chi2[i, j] = 0.5 * np.sum((p[k] - q[k]) ** 2 / s[k])
                if min(a.shape) >= 11:
                    ssim[i, j] = structural_similarity(
                        a,
                        b,
                        gaussian_weights=True,
                        sigma=1.5,
                        use_sample_covariance=False,
                        data_range=1.0,
                    )
    return chi2, ssim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--cell", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (ours)")
    args = parser.parse_args(argv)

    from napari_confocal_stain.core.metrics import hallucination_maps

    load0 = f"{os.getloadavg()[0]:.2f}"
    source, output = make_pair(args.size)
    mp = args.size * args.size / 1e6
    print(
        f"pair: {args.size}² float32 RGB from {DATA.name}, cell {args.cell}, {os.cpu_count()} CPUs"
    )

    hallucination_maps(source[:1024, :1024], output[:1024, :1024], args.cell)  # warm up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ours = hallucination_maps(source, output, args.cell)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)

    t0, c0 = time.perf_counter(), time.process_time()
    ref_chi2, ref_ssim = reference(source, output, args.cell)
    t_ref, cpu_ref = time.perf_counter() - t0, time.process_time() - c0

    d_chi2 = np.abs(ours["lbp_chi2"] - ref_chi2).max()
    d_ssim = np.nanmax(np.abs(ours["ssim"] - ref_ssim))
    print(f"max |Δ| vs reference: LBP χ² {d_chi2:.2e}, SSIM {d_ssim:.2e}")
    print(f"mean LBP χ² {np.mean(ours['lbp_chi2']):.4f}, mean SSIM {np.nanmean(ours['ssim']):.4f}")
    print(
        f"load average before/after: {load0} / {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores, shared with any other jobs)"
    )
    print(
        f"per-cell skimage loop: {t_ref:.2f} s wall = {mp / t_ref:.1f} MP/s "
        f"(CPU {1e3 * cpu_ref / mp:.0f} ns/px)"
    )
    print(
        f"napari_confocal_stain: {best:.2f} s wall = {mp / best:.1f} MP/s, best of {args.repeat} "
        f"(CPU {1e3 * best_cpu / mp:.0f} ns/px over all threads)"
    )
    print(f"command: {sys.executable} bench/metrics.py --size {args.size} --cell {args.cell}")
    print(f"speed-up vs per-cell skimage loop: {t_ref / best:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
