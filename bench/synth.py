"""Synthetic slide writer: throughput and peak memory at three slide sizes.

Each write runs in a fresh process that samples its own anonymous RSS (heap) every 20 ms
and reports VmHWM (peak RSS) at the end, so all sizes are measured the same way:
``S x S``, ``4S x 4S`` (the brief's comparison) and ``4S x S`` (4x taller, same width).
The writer streams rows, so its memory is independent of the slide's height and grows
only with its width (libvips buffers a 512-row band of tiles per file); the tall slide
isolates the first property, the large square shows the second.
Also measures the single-thread rendering rate (numpy only, no TIFF writing) in CPU time.

    python bench/synth.py                # S = 4096: 4096^2, 16384^2, 16384 x 4096
    python bench/synth.py --size 2048    # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, val = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(val.split()[0]) / 1024
        return out

    peak_anon = 0.0
    stop = False

    def sample():
        global peak_anon
        while not stop:
            peak_anon = max(peak_anon, status()["RssAnon"])
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    h, w = int(sys.argv[1]), int(sys.argv[2])
    t0, c0 = time.perf_counter(), time.process_time()
    write_synthetic_mosaic(sys.argv[3], size=(h, w), seed=1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop = True
    print(json.dumps({"h": h, "w": w, "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mb": status()["VmHWM"], "peak_anon_mb": peak_anon}))
    """
)


def render_rate(size: int = 4096, rows: int = 1024) -> float:
    """Single-thread rendering rate in MP per CPU second (numpy only)."""
    from napari_confocal_stain.io.synthetic import synth_region

    synth_region((size, size), size // 2, 0, 256, size)  # warm-up
    c0 = time.process_time()
    synth_region((size, size), size // 2 - rows // 2, 0, rows, size)
    return rows * size / (time.process_time() - c0) / 1e6


def write(h: int, w: int) -> dict:
    """Write an h x w slide in a fresh process; its timings and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(h), str(w), f"{tmp}/slide"],
            capture_output=True,
            text=True,
            check=True,
        )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    mp = h * w / 1e6
    r["mp_per_s"] = mp / r["wall_s"]
    r["mp_per_cpu_s"] = mp / r["cpu_s"]
    print(
        f"write {h}x{w} ({mp:.0f} MP, R+F): {r['wall_s']:.1f} s wall, "
        f"{r['mp_per_s']:.1f} MP/s ({r['mp_per_cpu_s']:.1f} MP per CPU-second), "
        f"peak RSS {r['peak_rss_mb']:.0f} MB, peak anonymous RSS {r['peak_anon_mb']:.0f} MB",
        flush=True,
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="S (default 4096)")
    args = parser.parse_args()
    s = args.size
    print(f"render (1 thread, numpy only): {render_rate():.1f} MP per CPU-second", flush=True)
    small, tall, big = write(s, s), write(4 * s, s), write(4 * s, 4 * s)

    def ratio(b: dict, a: dict, what: str) -> str:
        px = b["h"] * b["w"] / (a["h"] * a["w"])
        return (
            f"{what}: pixels x{px:.0f}, peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}, "
            f"peak anonymous RSS x{b['peak_anon_mb'] / a['peak_anon_mb']:.2f}, "
            f"throughput x{b['mp_per_s'] / a['mp_per_s']:.2f}"
        )

    print(ratio(tall, small, f"ratio {4 * s}x{s} / {s}x{s} (taller)"))
    print(ratio(big, small, f"ratio {4 * s}x{4 * s} / {s}x{s} (taller and wider)"))
    print(f"reproduce: python bench/synth.py --size {s}")


if __name__ == "__main__":
    main()
