"""Benchmark: lazily opening and reading a 100k x 100k confocal R/F pair vs a 25k x 25k one.

Builds two synthetic Vivascope mosaics (``DET#1/highres_raw.tif`` = R, ``DET#2/...`` = F),
uint8, tiled 256², JPEG-compressed, pyramidal, 0.75 µm/px, written by a streaming pyvips
pipeline (a small random texture replicated over the slide + a replicated noise field +
a gradient), so building one never holds it in memory. Then, in a fresh Python process
per measurement, it times ``open_mosaic``, reading one 1024² level-0 region of R and F
(chunk-aligned, and straddling four chunks), and reading the coarsest level (larger
side <= 1024 px) of R and F, and records each process's peak RSS.

Targets (issue 2): open < 2 s, region < 0.5 s, peak RSS < 1 GB and independent of the
slide size: the ratios 100k / 25k are printed for that.

Usage::

    python bench/open_mosaic.py                      # build in a temp dir, measure, delete
    python bench/open_mosaic.py --workdir /tmp/bench --keep   # keep (and reuse) the files
    python bench/open_mosaic.py --sizes 20000 5000   # other sizes (first is "large")
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TILE = 256
PIXEL_SIZE_UM = 0.75


def build_slide(folder: Path, size: int, quality: int = 70) -> float:
    """Write a synthetic Vivascope mosaic of ``size`` x ``size`` px; return seconds taken."""
    import pyvips

    t0 = time.perf_counter()
    for det, seed in (("DET#1", 1), ("DET#2", 7)):
        out = folder / det / "highres_raw.tif"
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        texture = (
            pyvips.Image.gaussnoise(512, 512, sigma=40, mean=110, seed=seed)
            .gaussblur(3)
            .cast("uchar")
            .copy_memory()
        )
        noise = pyvips.Image.gaussnoise(1536, 1536, sigma=6, seed=seed + 1).cast("char")
        noise = noise.copy_memory()
        reps = size // 512 + 1
        img = texture.replicate(reps, reps).crop(0, 0, size, size)
        img = img + noise.replicate(size // 1536 + 1, size // 1536 + 1).crop(0, 0, size, size)
        img = img + pyvips.Image.xyz(size, size)[0] * (40.0 / size)
        tmp = out.with_name(out.name + ".part")
        img.cast("uchar").tiffsave(
            str(tmp),
            tile=True,
            tile_width=TILE,
            tile_height=TILE,
            pyramid=True,
            compression="jpeg",
            Q=quality,
            bigtiff=True,
            xres=1000.0 / PIXEL_SIZE_UM,
            yres=1000.0 / PIXEL_SIZE_UM,
        )
        tmp.rename(out)
    return time.perf_counter() - t0


def measure(path: str, what: str) -> dict:
    """Run in a fresh process: open ``path`` and time one kind of read."""
    import resource

    import dask
    import dask.array as da

    from napari_confocal_stain.io.readers import open_mosaic

    # dask's first compute imports `distributed` when it is installed (~0.5 s): a
    # one-time cost of any dask program, not of reading the slide, so pay it here.
    da.zeros(2).sum().compute()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    m = open_mosaic(path)
    result = {"open_s": time.perf_counter() - t0, "levels": m.levels, "shape": list(m.shape)}
    h, w = m.shape
    if what == "region":
        y, x = (h // 2) // 1024 * 1024, (w // 2) // 1024 * 1024
        t0 = time.perf_counter()
        dask.compute(m.r[0][y : y + 1024, x : x + 1024], m.f[0][y : y + 1024, x : x + 1024])
        result["region_s"] = time.perf_counter() - t0
        # A second region in the same process: decoders, codecs and threads are warm,
        # as when napari reads the next region of a slide already on screen.
        y, x = y // 2 // 1024 * 1024, x // 2 // 1024 * 1024
        t0 = time.perf_counter()
        dask.compute(m.r[0][y : y + 1024, x : x + 1024], m.f[0][y : y + 1024, x : x + 1024])
        result["region_warm_s"] = time.perf_counter() - t0
    elif what == "region-unaligned":
        y, x = (h // 2) // 1024 * 1024 + 512, (w // 2) // 1024 * 1024 + 512
        t0 = time.perf_counter()
        dask.compute(m.r[0][y : y + 1024, x : x + 1024], m.f[0][y : y + 1024, x : x + 1024])
        result["region_unaligned_s"] = time.perf_counter() - t0
    elif what == "coarse":
        t0 = time.perf_counter()
        r, _ = dask.compute(m.r[-1], m.f[-1])
        result["coarse_s"] = time.perf_counter() - t0
        result["coarse_shape"] = list(r.shape)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["import_rss_mb"] = base_kb / 1024
    return result


def run_measure(path: Path, what: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the slides (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the slides (reused next run)")
    parser.add_argument("--sizes", type=int, nargs=2, default=(100_000, 25_000))
    parser.add_argument("--quality", type=int, default=70, help="JPEG quality of the tiles")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[1], args.measure[0])))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="confocal-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    try:
        for size in args.sizes:
            folder = workdir / f"slide_{size}"
            built = build_slide(folder, size, args.quality)
            disk = sum(p.stat().st_size for p in folder.rglob("*.tif")) / 1e9
            print(
                f"slide {size}x{size}: built in {built:.0f} s, {disk:.2f} GB on disk", flush=True
            )
            rec: dict = {"disk_gb": disk}
            for what in ("open", "region", "region-unaligned", "coarse"):
                res = run_measure(folder, what)
                rec[what] = res
            rows[size] = rec
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for size in args.sizes:
                shutil.rmtree(workdir / f"slide_{size}", ignore_errors=True)

    big, small = args.sizes
    header = (
        f"{'slide':>13} {'levels':>6} {'open s':>7} {'region s':>9} {'warm s':>7} "
        f"{'region4 s':>9} "
        f"{'coarse s':>9} {'coarse px':>11} {'peak RSS MB':>12} {'(after import)':>14}"
    )
    print()
    print(header)
    for size in (big, small):
        rec = rows[size]
        peak = max(rec[w]["peak_rss_mb"] for w in ("open", "region", "region-unaligned", "coarse"))
        base = rec["open"]["import_rss_mb"]
        coarse_shape = "x".join(str(v) for v in rec["coarse"]["coarse_shape"])
        region4 = rec["region-unaligned"]["region_unaligned_s"]
        print(
            f"{size:>6}x{size:<6} {rec['open']['levels']:>6} {rec['open']['open_s']:>7.3f} "
            f"{rec['region']['region_s']:>9.3f} {rec['region']['region_warm_s']:>7.3f} "
            f"{region4:>9.3f} "
            f"{rec['coarse']['coarse_s']:>9.3f} {coarse_shape:>11} {peak:>12.0f} {base:>14.0f}"
        )

    def peak(size: int) -> float:
        return max(rows[size][w]["peak_rss_mb"] for w in rows[size] if w != "disk_gb")

    print()
    print(f"ratio {big} / {small} (pixels x{(big / small) ** 2:.0f}):")
    print(f"  peak RSS        {peak(big) / peak(small):.2f}")
    print(f"  open time       {rows[big]['open']['open_s'] / rows[small]['open']['open_s']:.2f}")
    print(
        f"  region time     "
        f"{rows[big]['region']['region_s'] / rows[small]['region']['region_s']:.2f}"
    )
    print("region = one chunk-aligned 1024² level-0 region of R and F, first read in a fresh")
    print("process (cold); warm = a second such region in that process; region4 = one that")
    print("straddles four 1024² dask chunks; coarse = the whole coarsest level of R and F.")
    print("Each figure comes from its own fresh process (open included in its peak RSS).")
    print()
    print("reproduce: python bench/open_mosaic.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
