"""Detection power of the hallucination flags: painted defects on images calibration never saw.

``python bench/flags.py [--model stain-unet] [--checkpoint PATH] [--cells 128 512]
[--trials 4] [--out runs/flags] [--sample]``

For every evaluation image (tissue the calibration did not use, see ``docs/flags.md``):
stain it with the model, flag the untouched stain (its tissue cells give the false-flag
rate), then paint one defect at a time into a random tissue cell and flag again (the
defect's cell gives the sensitivity; the cells around it are counted as untouched too).
Defects, each confined to its cell:

``erased``     1-3 clear F nuclei inpainted with their surroundings (normalised convolution)
``invented``   1-3 nucleus-coloured blobs (the stain's own median nuclear colour, 3-6 µm
               radius) where F has no nucleus within two diameters
``pasted``     a patch of another image's stain pasted in (foreign structure)
``texture``    a natural texture (skimage brick / gravel / grass) modulating the stain
``smear``      a Gaussian blur (σ 3-6 px) of a patch
``flat``       a patch replaced by its mean colour (mode collapse)
``checker``    a ±0.04-0.08 checkerboard of 1, 2 or 4 px squares (upsampling artefact)
``blotch``     a soft colour blotch (a random optical-density shift of 0.3-0.5)

Patches are a quarter to a half of the cell a side. ``--sample`` also flags the unaltered
sample slide (the whole 4096² level 0, default model) and reports the flagged fraction and
the invented / erased points per mm².
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFECTS = ("erased", "invented", "pasted", "texture", "smear", "flat", "checker", "blotch")

#: Evaluation tissue (never used by ``python -m training calibrate``'s defaults).
EVAL_HE = [
    {"path": "${NCS_DATA}/he/histo.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma10_010704_malignant1_ccd.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma23_022103_malignant1_ccd.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/openslide_os1_detail.png", "pixel_size_um": 0.227},
    {"path": "${NCS_DATA}/he/extra/rahman_OSCC_400x_13.jpg", "pixel_size_um": 0.25},
]
EVAL_SYNTHETIC = [
    {"seed": 7, "size": [4096, 4096], "region": [1024, 3072, 1024, 3072]},
    {"seed": 7, "size": [4096, 4096], "region": [1024, 3072, 1024, 3072], "as_slide": True},
]
FLUORESCENCE = "${NCS_DATA}/fluorescence/img2d.tif"


# ------------------------------------------------------------------------------ painting


def _soft_disk(shape, cy, cx, radius, edge=1.5):
    y, x = np.ogrid[: shape[0], : shape[1]]
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return np.clip((radius - d) / edge + 0.5, 0, 1).astype(np.float32)


def _patch(box, rng, minimum=32):
    y0, y1, x0, x1 = box
    side = min(y1 - y0, x1 - x0)
    s = int(rng.integers(max(minimum, side // 4), max(minimum, side // 2) + 1))
    s = min(s, y1 - y0, x1 - x0)
    py = int(rng.integers(y0, y1 - s + 1))
    px = int(rng.integers(x0, x1 - s + 1))
    return py, py + s, px, px + s


_TEXTURES: list[np.ndarray] = []


def _textures():
    if not _TEXTURES:
        from skimage import data
        from skimage.color import rgb2gray

        for img in (data.brick(), data.gravel(), data.grass()):
            t = rgb2gray(img) if img.ndim == 3 else img / 255.0
            t = t - ndi.gaussian_filter(t, 8)
            _TEXTURES.append((t / t.std()).astype(np.float32))
    return _TEXTURES


def paint(kind, out, r, f, box, rng, *, donor=None, tissue=None, px=0.75):
    """A copy of ``out`` with one defect of ``kind`` inside ``box`` (None if impossible)."""
    from napari_confocal_stain.core.nuclei import detect_nuclei_fluorescence, detect_nuclei_he

    out = out.copy()
    y0, y1, x0, x1 = box
    if kind == "erased":
        pts = detect_nuclei_fluorescence(f[y0:y1, x0:x1], px, threshold=0.2, workers=1)
        if len(pts) == 0:
            return None
        k = min(len(pts), int(rng.integers(1, 4)))
        sel = pts[rng.choice(len(pts), k, replace=False)]
        m = np.zeros(out.shape[:2], np.float32)
        for y, x, rad in sel:
            m = np.maximum(m, _soft_disk(m.shape, y + y0, x + x0, 1.6 * rad + 1))
        hole = (m > 0).astype(np.float32)
        s = float(sel[:, 2].max()) * 1.2
        num = ndi.gaussian_filter(out * (1 - hole)[..., None], (s, s, 0))
        den = ndi.gaussian_filter(1 - hole, s)[..., None]
        fill = num / np.maximum(den, 1e-3)
        return out * (1 - m[..., None]) + fill * m[..., None]
    if kind == "invented":
        nuclei = detect_nuclei_fluorescence(f, px, threshold=0.05, workers=1)
        free = np.ones(f.shape, bool) if tissue is None else tissue.copy()
        if len(nuclei):
            mark = np.zeros(f.shape, bool)
            mark[nuclei[:, 0].astype(int), nuclei[:, 1].astype(int)] = True
            free &= ~ndi.binary_dilation(mark, iterations=int(2 * 10 / px))
        inside = np.zeros(f.shape, bool)
        inside[y0:y1, x0:x1] = True
        ys, xs = np.nonzero(free & inside)
        if len(ys) == 0:
            return None
        dark = detect_nuclei_he(out, px, threshold=0.3, workers=1)
        colour = (
            np.median(out[dark[:, 0].astype(int), dark[:, 1].astype(int)], axis=0)
            if len(dark) > 5
            else np.array([0.33, 0.22, 0.45])
        )
        for _ in range(int(rng.integers(1, 4))):
            i = rng.integers(len(ys))
            a = _soft_disk(out.shape[:2], ys[i], xs[i], rng.uniform(3, 6) / px)
            a *= rng.uniform(0.7, 0.95)
            out = out * (1 - a[..., None]) + colour * a[..., None]
        return np.clip(out, 0, 1)
    py0, py1, px0, px1 = _patch(box, rng)
    sl = (slice(py0, py1), slice(px0, px1))
    h, w = py1 - py0, px1 - px0
    if kind == "pasted":
        dh, dw = donor.shape[:2]
        h2, w2 = min(h, dh), min(w, dw)
        sy, sx = int(rng.integers(0, dh - h2 + 1)), int(rng.integers(0, dw - w2 + 1))
        out[py0 : py0 + h2, px0 : px0 + w2] = donor[sy : sy + h2, sx : sx + w2]
    elif kind == "texture":
        t = _textures()[int(rng.integers(3))]
        ty, tx = int(rng.integers(0, t.shape[0] - h)), int(rng.integers(0, t.shape[1] - w))
        a = rng.uniform(0.2, 0.35)
        out[sl] = out[sl] * (1 + a * t[ty : ty + h, tx : tx + w])[..., None]
    elif kind == "smear":
        out[sl] = ndi.gaussian_filter(out, (rng.uniform(3, 6),) * 2 + (0,))[sl]
    elif kind == "flat":
        out[sl] = out[sl].reshape(-1, 3).mean(0) + rng.normal(0, 0.01, (h, w, 3))
    elif kind == "checker":
        p = int(rng.choice([1, 2, 4]))
        yy, xx = np.mgrid[py0:py1, px0:px1]
        c = ((yy // p + xx // p) % 2 * 2 - 1).astype(np.float32)
        out[sl] = out[sl] + rng.uniform(0.04, 0.08) * c[..., None]
    elif kind == "blotch":
        m = _soft_disk(out.shape[:2], (py0 + py1) / 2, (px0 + px1) / 2, h / 2, edge=h / 6)
        v = rng.normal(0, 1, 3)
        v *= rng.uniform(0.3, 0.5) / np.linalg.norm(v)
        od = -np.log(np.clip(out, 1 / 255, 1)) + m[..., None] * v
        out = np.exp(-np.clip(od, 0, None))
    else:
        raise ValueError(f"unknown defect {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------ data


def fluorescence_pair(path):
    """A two-channel field from a nuclear fluorescence image: F = nuclei, R = cytoplasm.

    The bundled file has one channel (nuclei); R is made from it as a cytoplasm-like
    signal (nuclei dilated by ~6 µm, blurred, the nuclei dimmed), with speckle.
    """
    import tifffile

    a = tifffile.imread(path).astype(np.float32)
    f = np.clip((a - np.percentile(a, 1)) / (np.percentile(a, 99.5) - np.percentile(a, 1)), 0, 1)
    cyto = ndi.grey_dilation(ndi.gaussian_filter(f, 2), size=(17, 17))
    r = np.clip(0.7 * ndi.gaussian_filter(cyto, 3) - 0.3 * f, 0, 1)
    r *= np.random.default_rng(3).normal(1, 0.2, r.shape).astype(np.float32)
    return np.clip(r, 0, 1).astype(np.float32), f.astype(np.float32)


def eval_pairs():
    from training.calibrate import Pair, he_pairs, synthetic_pairs
    from training.config import expand_paths

    pairs = he_pairs(expand_paths(EVAL_HE), {"model": "gaussian", "sigma": 0.2}, seed=1)
    pairs += synthetic_pairs(EVAL_SYNTHETIC)
    r, f = fluorescence_pair(expand_paths(FLUORESCENCE))
    pairs.append(Pair("img2d.tif (nuclei + derived cytoplasm)", r, f))
    return pairs


# ------------------------------------------------------------------------------ running


def _tissue_px(r, f, px=0.75):
    from napari_confocal_stain.measure.flags import TISSUE_LEVEL

    return ndi.gaussian_filter(np.maximum(r, f), 2 / px) > TISSUE_LEVEL


def evaluate(pairs, model, cells, trials, seed=0, log=print):
    from napari_confocal_stain.measure.flags import flag_hallucinations

    rows = []
    for cell in cells:
        clean_hits = clean_n = 0
        adj_hits = adj_n = 0
        per_image = {}
        hits = {k: [] for k in DEFECTS}
        for pi, p in enumerate(pairs):
            if min(p.r.shape) < cell:
                continue
            res = flag_hallucinations(p.r, p.f, p.stained, cell=cell, model=model)
            tis = res["tissue"]
            n, k = int(tis.sum()), int(res["flagged"].sum())
            clean_hits += k
            clean_n += n
            per_image[p.name] = (k, n)
            donor = pairs[(pi + 1) % len(pairs)].stained
            tissue = _tissue_px(p.r, p.f)
            cand = list(zip(*np.nonzero(tis), strict=True))
            if not cand:
                continue
            rng = np.random.default_rng([seed, pi, cell])
            h, w = p.r.shape
            for kind in DEFECTS:
                for _ in range(trials):
                    i, j = cand[int(rng.integers(len(cand)))]
                    box = (i * cell, min(h, (i + 1) * cell), j * cell, min(w, (j + 1) * cell))
                    painted = paint(kind, p.stained, p.r, p.f, box, rng, donor=donor,
                                    tissue=tissue)  # fmt: skip
                    if painted is None:
                        continue
                    a0, b0 = max(0, i - 1), max(0, j - 1)
                    a1, b1 = min(h, (i + 2) * cell), min(w, (j + 2) * cell)
                    sl = (slice(a0 * cell, a1), slice(b0 * cell, b1))
                    if min(a1 - a0 * cell, b1 - b0 * cell) < cell:
                        continue
                    out = flag_hallucinations(p.r[sl], p.f[sl], painted[sl], cell=cell,
                                              model=model)  # fmt: skip
                    hits[kind].append(bool(out["flagged"][i - a0, j - b0]))
                    others = out["tissue"].copy()
                    others[i - a0, j - b0] = False
                    adj_hits += int((out["flagged"] & others).sum())
                    adj_n += int(others.sum())
            log(f"cell {cell}: {p.name}: {k}/{n} untouched tissue cells flagged")
        for kind in DEFECTS:
            v = hits[kind]
            rows.append({"cell": cell, "defect": kind, "n": len(v),
                         "sensitivity": float(np.mean(v)) if v else float("nan")})  # fmt: skip
        all_hits = [x for v in hits.values() for x in v]
        rows.append({"cell": cell, "defect": "all defects", "n": len(all_hits),
                     "sensitivity": float(np.mean(all_hits))})  # fmt: skip
        rows.append({"cell": cell, "defect": "untouched images", "n": clean_n,
                     "false_flag_rate": clean_hits / max(clean_n, 1)})  # fmt: skip
        rows.append({"cell": cell, "defect": "cells around a defect", "n": adj_n,
                     "false_flag_rate": adj_hits / max(adj_n, 1)})  # fmt: skip
        rows.append({"cell": cell, "defect": "per image", "per_image": per_image})
    return rows


def sample_slide(model, cells=(512, 128), log=print):
    """Flag the unaltered sample slide (level 0, whole) stained by the model."""
    from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings
    from napari_confocal_stain.io.readers import open_mosaic
    from napari_confocal_stain.io.sample import sample_slide_path
    from napari_confocal_stain.measure.flags import flag_hallucinations

    mosaic = open_mosaic(sample_slide_path())
    settings = StainSettings(model=str(model), device="cpu")
    pipe = StainPipeline(mosaic, settings)
    h, w = pipe.level_shapes[0]
    box = (0, h, 0, w)
    t0 = time.perf_counter()
    r, f = pipe.raw(0, box)
    stained = pipe.gan(0, box)
    log(f"sample slide {h}x{w} stained in {time.perf_counter() - t0:.0f} s")
    out = {}
    for cell in cells:
        t0 = time.perf_counter()
        res = flag_hallucinations(r, f, stained, cell=cell, model=model)
        dt = time.perf_counter() - t0
        tissue_mm2 = float(_tissue_px(r, f).sum()) * 0.75**2 / 1e6
        out[cell] = {
            "tissue_cells": int(res["tissue"].sum()),
            "flagged": int(res["flagged"].sum()),
            "fraction": float(res["flagged"].sum() / max(res["tissue"].sum(), 1)),
            "tissue_mm2": tissue_mm2,
            "erased_per_mm2": len(res["erased_points"]) / max(tissue_mm2, 1e-9),
            "invented_per_mm2": len(res["invented_points"]) / max(tissue_mm2, 1e-9),
            "seconds": dt,
            "megapixels_per_s": h * w / 1e6 / dt,
            "reasons": _reason_counts(res),
        }
        log(f"sample slide, cell {cell}: {out[cell]}")
    return out


def _reason_counts(res):
    counts = {}
    for names in res["reasons"].ravel():
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    return counts


def markdown(rows):
    lines = ["| cell | defect | n | sensitivity | false-flag rate |", "|---|---|---|---|---|"]
    for r in rows:
        if r["defect"] == "per image":
            continue
        sens = f"{r['sensitivity']:.2f}" if "sensitivity" in r else ""
        ffr = f"{r['false_flag_rate']:.3f}" if "false_flag_rate" in r else ""
        lines.append(f"| {r['cell']} | {r['defect']} | {r['n']} | {sens} | {ffr} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the default stain model)")
    ap.add_argument("--checkpoint", default=None, help="calibrated checkpoint to use instead")
    ap.add_argument("--cells", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default="runs/flags")
    ap.add_argument("--sample", action="store_true", help="also flag the sample slide")
    args = ap.parse_args(argv)

    from napari_confocal_stain.inference import load_model
    from napari_confocal_stain.models.defaults import DEFAULT_STAIN_MODEL
    from training.calibrate import stain_pairs

    name = args.checkpoint or args.model or DEFAULT_STAIN_MODEL
    model = load_model(name, device="cpu")
    pairs = stain_pairs(eval_pairs(), model, progress=print)
    rows = evaluate(pairs, name, args.cells, args.trials)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": name, "rows": rows}
    if args.sample:
        result["sample"] = sample_slide(name)
    (out / "flags.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "flags.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
