"""Synthetic dual-mode ex vivo confocal skin slides (reflectance R, fluorescence F).

A slide is a pure function of ``(size, seed, looks, ...)`` and the global pixel coordinates:
any region can be generated on its own and is bit-identical to the same pixels generated as
part of a larger region, so slides of any size are written strip by strip and never exist
whole in memory. Pixels are 0.75 um (Vivascope 2500 mosaics).

The model, from large scale to small:

- **Tissue**: an irregular island (an ellipse filling ~half the slide, its border displaced by
  value-noise octaves) on a dark background. Depth below the tissue border comes from an
  exact Euclidean distance transform on a coarse lattice (windowed with a margin larger than
  the deepest depth used, so it stays exact per window).
- **Epidermis** along most of the border: a bright keratin layer (R) on top, then a band of
  densely packed keratinocyte nuclei with cytoplasm (F) and bright cell borders (R), with an
  undulating dermo-epidermal junction. Below: **dermis** with wavy, oriented collagen fibre
  bundles (R; two crossing families, domain-warped stripes broken into segments with
  per-fibre random width, offset and brightness), sparse fibroblast and lymphocyte nuclei,
  and a few dense nests of large nuclei (basal-cell-carcinoma-like).
- **Nuclei**: a marked point process per 128-px block (Poisson candidates thinned by the
  local density, then Matern type-II hard-core thinning so nuclei do not overlap and stay
  individually detectable); drawn as soft ellipses, 8-16 px across, bright in F and dark
  in R. :func:`synth_nuclei` returns them as ground truth.
- **Acquisition**: per-field-of-view vignetting (1000 px fields, as in Vivascope mosaics),
  multiplicative gamma speckle ``Y = X * S``, ``S ~ gamma(L, 1/L)`` on R, and
  signal-dependent sensor noise on F.

Public API: :func:`synth_region`, :func:`synth_nuclei`, :func:`synth_mosaic_arrays`,
:func:`synth_layers`, :func:`write_synthetic_mosaic`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shutil
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from napari_confocal_stain.errors import MosaicError
from napari_confocal_stain.io._synth_fields import (
    COARSE,
    NOISE_BLOCK,
    block_field,
    fbm,
    gamma_speckle,
    hash_u32,
    max_stamp,
    sample_nodes,
    sensor_noise,
    smoothstep,
    unit,
    upsample,
    value_noise,
)

__all__ = [
    "NUCLEUS_DTYPE",
    "PIXEL_SIZE_UM",
    "SYNTH_VERSION",
    "synth_layers",
    "synth_mosaic_arrays",
    "synth_nuclei",
    "synth_region",
    "write_synthetic_mosaic",
]

#: Pixel size of the synthetic slides (um), as in Vivascope 2500 mosaics.
PIXEL_SIZE_UM = 0.75
#: Bumped whenever the generated pixels change for a given seed.
SYNTH_VERSION = 1
#: Ground-truth nuclei: centre (px, global slide coordinates) and equivalent radius sqrt(a*b).
NUCLEUS_DTYPE = np.dtype([("y", "f4"), ("x", "f4"), ("radius_px", "f4")])

# ---------------------------------------------------------------------------------------------
# Model constants (pixels unless stated). Tags separate independent random fields.
# ---------------------------------------------------------------------------------------------
_T_TISSUE, _T_EPI, _T_KER, _T_RETE, _T_NEST, _T_FAM, _T_DENS = range(1, 8)
_T_WARP1, _T_WARP2, _T_KGAIN, _T_FIB1, _T_FIB2, _T_ANGLE = range(8, 14)
_T_NUC_N, _T_NUC_Y, _T_NUC_X, _T_NUC_ACC, _T_NUC_PRIO, _T_NUC_SHAPE = range(20, 26)
_T_SPECKLE, _T_FNOISE = 40, 41

_HALF = 2  # step of the half-resolution grid on which the smooth image layers are composed
_D_MAX = 320.0  # deepest depth below the surface the model distinguishes
_D_OUT = 24.0  # signed depth is clipped here outside the tissue
_EDT_MARGIN = int(_D_MAX // COARSE) + 3  # lattice margin that keeps the windowed EDT exact

_NUC_BLOCK = 128  # blocks of the nucleus point process
_A_MAX = 10.0  # bound on any nucleus' semi-major axis
_INTERACT = 2.0 * _A_MAX  # hard-core interaction range
_CORE_R = 12  # half-size of a nucleus stamp at full resolution (>= _A_MAX + soft edge)
_HALO_R = 16.0  # bound on the cytoplasm halo radius
_HALO_MARGIN = int(_HALO_R) + 2
_LAMBDA_MAX = 1.0 / 70.0  # candidate intensity (per px^2): the densest class

# Nucleus classes: base intensities (per px^2) before hard-core thinning.
_GRANULAR, _SPINOUS, _BASAL, _LYMPHO, _FIBRO, _NEST = range(6)
_LAMBDA_GRANULAR = 1.0 / 220.0
_LAMBDA_SPINOUS = 1.0 / 120.0
_LAMBDA_BASAL = 1.0 / 75.0
_LAMBDA_DERMIS = 1.0 / 2600.0
_LAMBDA_NEST = 1.0 / 70.0

_FOV = 1000  # Vivascope field of view (px) for vignetting

# Reflectance / fluorescence levels of the clean image (before vignetting and noise).
_R_BG, _F_BG = 0.02, 0.008


@dataclass(frozen=True)
class _Slide:
    """Size-dependent geometry of one slide."""

    h: int
    w: int
    seed: int

    @property
    def radius(self) -> float:
        return 0.40 * min(self.h, self.w)

    def fibre_angles(self) -> tuple[float, float]:
        u = unit(hash_u32(self.seed, _T_ANGLE, 0, np.arange(2)))
        a1 = float(u[0]) * math.pi
        return a1, a1 + math.pi * (0.30 + 0.15 * float(u[1]))


# ---------------------------------------------------------------------------------------------
# Coarse lattice fields
# ---------------------------------------------------------------------------------------------
@dataclass
class _Coarse:
    """Smooth fields on lattice nodes ``[ny0, ny0+ny) x [nx0, nx0+nx)`` (spacing COARSE)."""

    ny0: int
    nx0: int
    stack: np.ndarray  # (len(_FIELDS), ny, nx) float32

    def covers(self, ny0: int, ny1: int, nx0: int, nx1: int) -> bool:
        _, ny, nx = self.stack.shape
        return (
            ny0 >= self.ny0 and nx0 >= self.nx0 and ny1 <= self.ny0 + ny and nx1 <= self.nx0 + nx
        )


_FIELDS = (
    "depth",  # signed depth below the tissue border (px), negative outside
    "ny",  # unit inward normal of the border (y, x)
    "nx",
    "epi",  # epidermis presence along the border, 0..1
    "ker",  # keratin layer thickness
    "rete",  # depth of the dermo-epidermal junction
    "nest",  # nest noise (nests where high)
    "fam",  # fibre family balance (-1..1)
    "dens",  # collagen density 0..1
    "warp1",  # fibre displacement fields (px)
    "warp2",
    "kgain",  # keratin brightness
)
_F = {name: i for i, name in enumerate(_FIELDS)}
# Fields needed on the half-resolution grid (the normal is only used for nuclei).
_HALF_FIELDS = [i for i, name in enumerate(_FIELDS) if name not in ("ny", "nx")]


def _tissue_potential(slide: _Slide, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Approximately the signed distance (px) to the tissue border, positive inside."""
    cy, cx = slide.h / 2.0, slide.w / 2.0
    ay, ax = 0.40 * slide.h, 0.40 * slide.w
    rad = slide.radius
    ry = ((ys - cy) / ay).astype(np.float32)
    rx = ((xs - cx) / ax).astype(np.float32)
    rho = np.sqrt(ry[:, None] ** 2 + rx[None, :] ** 2)
    base = (np.float32(1.0) - rho) * np.float32(rad)
    # Each octave displaces the border by about amplitude px; amplitude/scale stays below
    # ~0.35 so the border does not fold on itself too often.
    octaves = [
        (0.5 * rad, 0.15 * rad),
        (0.18 * rad, 0.06 * rad),
        (260.0, 55.0),
        (70.0, 10.0),
    ]
    return base + fbm(slide.seed, _T_TISSUE, ys, xs, octaves)


def _coarse_fields(slide: _Slide, ny0: int, ny1: int, nx0: int, nx1: int) -> _Coarse:
    """Evaluate all lattice fields on nodes ``[ny0, ny1) x [nx0, nx1)``."""
    m = _EDT_MARGIN
    ys_e = np.arange(ny0 - m, ny1 + m, dtype=np.float64) * COARSE
    xs_e = np.arange(nx0 - m, nx1 + m, dtype=np.float64) * COARSE
    t = _tissue_potential(slide, ys_e, xs_e)
    inside = t > 0
    if inside.all():
        edt = np.full(t.shape, np.inf, dtype=np.float32)
    else:
        edt = ndimage.distance_transform_edt(inside).astype(np.float32) * np.float32(COARSE)
    crop = (slice(m, m + ny1 - ny0), slice(m, m + nx1 - nx0))
    gy = t[m + 1 : m + 1 + ny1 - ny0, m : m + nx1 - nx0] - t[m - 1 : m - 1 + ny1 - ny0, crop[1]]
    gx = t[crop[0], m + 1 : m + 1 + nx1 - nx0] - t[crop[0], m - 1 : m - 1 + nx1 - nx0]
    gy /= np.float32(2 * COARSE)
    gx /= np.float32(2 * COARSE)
    gnorm = np.sqrt(gy * gy + gx * gx) + np.float32(1e-6)
    tc = t[crop]
    d_lin = tc / gnorm
    # Near the border the lattice EDT is quantised; the potential/gradient ratio is smooth
    # and exact at the border itself, so blend from it to the EDT over 16..32 px.
    d_edt = edt[crop] - np.float32(COARSE / 2)
    wb = smoothstep(d_edt, 16.0, 32.0)
    depth = np.where(
        tc > 0, (1 - wb) * np.clip(d_lin, 0.0, 48.0) + wb * d_edt, np.maximum(d_lin, -_D_OUT)
    )
    depth = np.clip(depth, -_D_OUT, _D_MAX).astype(np.float32)

    ys = np.arange(ny0, ny1, dtype=np.float64) * COARSE
    xs = np.arange(nx0, nx1, dtype=np.float64) * COARSE
    s, rad = slide.seed, slide.radius
    epi_n = fbm(s, _T_EPI, ys, xs, [(0.6 * rad, 1.0), (350.0, 0.4)])
    stack = np.empty((len(_FIELDS), len(ys), len(xs)), dtype=np.float32)
    stack[_F["depth"]] = depth
    stack[_F["ny"]] = gy / gnorm
    stack[_F["nx"]] = gx / gnorm
    stack[_F["epi"]] = smoothstep(epi_n, -0.45, -0.10)
    stack[_F["ker"]] = 17.0 + 6.0 * value_noise(s, _T_KER, ys, xs, 110.0)
    stack[_F["rete"]] = 110.0 + fbm(s, _T_RETE, ys, xs, [(45.0, 28.0), (240.0, 25.0)])
    # Nests cluster in a few regions of large slides (the large-scale octave).
    stack[_F["nest"]] = fbm(s, _T_NEST, ys, xs, [(170.0, 0.75), (50.0, 0.25), (0.3 * rad, 0.3)])
    stack[_F["fam"]] = value_noise(s, _T_FAM, ys, xs, 420.0)
    stack[_F["dens"]] = 0.62 + fbm(
        s, _T_DENS, ys, xs, [(260.0, 0.25), (70.0, 0.15), (0.25 * rad, 0.12)]
    )
    stack[_F["warp1"]] = fbm(s, _T_WARP1, ys, xs, [(360.0, 38.0), (90.0, 11.0), (40.0, 3.0)])
    stack[_F["warp2"]] = fbm(s, _T_WARP2, ys, xs, [(300.0, 32.0), (70.0, 8.0), (34.0, 2.5)])
    stack[_F["kgain"]] = 0.85 + 0.15 * value_noise(s, _T_KGAIN, ys, xs, 40.0)
    return _Coarse(ny0, nx0, stack)


def _coarse_for(slide: _Slide, y_lo: float, y_hi: float, x_lo: float, x_hi: float) -> _Coarse:
    """Lattice window whose bilinear interpolation covers pixels [y_lo, y_hi] x [x_lo, x_hi]."""
    ny0, nx0 = math.floor(y_lo / COARSE) - 1, math.floor(x_lo / COARSE) - 1
    ny1, nx1 = math.floor(y_hi / COARSE) + 3, math.floor(x_hi / COARSE) + 3
    return _coarse_fields(slide, ny0, ny1, nx0, nx1)


def _layers(
    depth: np.ndarray, epi: np.ndarray, ker: np.ndarray, rete: np.ndarray, nest: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights of keratin, epidermis, dermis (without nests) and nests; they sum to tissue."""
    tissue = np.clip(np.float32(0.5) + depth * np.float32(1 / 2.5), 0.0, 1.0)
    below_ker = smoothstep(depth, ker - 2.0, ker + 2.0)
    below_rete = smoothstep(depth, rete - 4.0, rete + 4.0)
    te = tissue * epi
    wk = te * (1 - below_ker)
    we = te * (below_ker - below_rete)
    wd = tissue - wk - we
    wn = wd * smoothstep(nest, 0.47, 0.55) * smoothstep(depth - rete, 50.0, 110.0)
    return wk, we, wd - wn, wn


# ---------------------------------------------------------------------------------------------
# Nuclei: marked point process
# ---------------------------------------------------------------------------------------------
@dataclass
class _Nuclei:
    y: np.ndarray  # float64 (values representable in float32)
    x: np.ndarray
    a: np.ndarray  # semi-axes (px)
    b: np.ndarray
    theta: np.ndarray  # orientation of the a axis (radians, from +x towards +y)
    inten: np.ndarray  # F brightness of the centre
    halo_amp: np.ndarray  # cytoplasm brightness
    halo_r: np.ndarray  # cytoplasm radius (px)

    def select(self, keep: np.ndarray) -> _Nuclei:
        return _Nuclei(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    @property
    def r_eq(self) -> np.ndarray:
        return np.sqrt(self.a * self.b)


@functools.lru_cache(maxsize=8)
def _poisson_cdf(lam: float) -> np.ndarray:
    from scipy.stats import poisson

    n = int(lam + 12 * math.sqrt(lam) + 20)
    return poisson.cdf(np.arange(n), lam)


def _candidates(slide: _Slide, y_lo: float, y_hi: float, x_lo: float, x_hi: float):
    """All candidate points (and their hash keys) of the blocks meeting the area."""
    nb = _NUC_BLOCK
    by = np.arange(
        max(0, math.floor(y_lo / nb)), min(math.ceil(slide.h / nb), math.floor(y_hi / nb) + 1)
    )
    bx = np.arange(
        max(0, math.floor(x_lo / nb)), min(math.ceil(slide.w / nb), math.floor(x_hi / nb) + 1)
    )
    BY, BX = np.meshgrid(by, bx, indexing="ij")
    BY, BX = BY.ravel(), BX.ravel()
    s = slide.seed
    cdf = _poisson_cdf(_LAMBDA_MAX * nb * nb)
    counts = np.searchsorted(cdf, unit(hash_u32(s, _T_NUC_N, BY, BX)).astype(np.float64), "right")
    n = int(counts.sum())
    bi = np.repeat(np.arange(len(BY)), counts)
    k = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    cby, cbx = BY[bi], BX[bi]
    y = (cby * nb + unit(hash_u32(s, _T_NUC_Y, cby, cbx, k)) * np.float64(nb)).astype(np.float32)
    x = (cbx * nb + unit(hash_u32(s, _T_NUC_X, cby, cbx, k)) * np.float64(nb)).astype(np.float32)
    # Only the points in the area matter; whole blocks stick out of it.
    keep = (y < slide.h) & (x < slide.w) & (y >= y_lo) & (y < y_hi) & (x >= x_lo) & (x < x_hi)
    return y[keep].astype(np.float64), x[keep].astype(np.float64), cby[keep], cbx[keep], k[keep]


def _nuclei(
    slide: _Slide, coarse: _Coarse, y_lo: float, y_hi: float, x_lo: float, x_hi: float
) -> _Nuclei:
    """Final nuclei with centres in ``[y_lo, y_hi) x [x_lo, x_hi)``.

    Candidates are taken from an area larger by the hard-core interaction range so that the
    Matern-II decision for every returned nucleus sees all its potential competitors.
    """
    r = _INTERACT + 1.0
    cand = _candidates(slide, y_lo - r, y_hi + r, x_lo - r, x_hi + r)
    y, x, cby, cbx, k, cls, normal = _thinned(slide, coarse, *cand)
    hs = hash_u32(slide.seed, _T_NUC_SHAPE, cby, cbx, k)
    ur, ua, ut, ui = (unit(hs, sh, 8) + np.float32(1 / 512) for sh in (0, 8, 16, 24))
    # Per-class shape and brightness: (r_eq lo, span), (aspect lo, span), (I lo, span),
    # halo amplitude, halo radius factor.
    prm = _NUCLEUS_PARAMS[cls]
    r_eq = prm[:, 0] + prm[:, 1] * ur
    aspect = prm[:, 2] + prm[:, 3] * ua
    inten = prm[:, 4] + prm[:, 5] * np.where(cls == _LYMPHO, ut, ui)
    sq = np.sqrt(aspect)
    a, b = r_eq * sq, r_eq / sq
    # Orientation: flattened granular cells lie along the surface, basal cells stand
    # perpendicular to it, fibroblasts follow a collagen family, the rest are random.
    a1, a2 = slide.fibre_angles()
    jitter = (ut - 0.5) * np.float32(0.5)
    fam = np.where(ut < 0.5, np.float32(a1 + math.pi / 2), np.float32(a2 + math.pi / 2))
    theta = np.select(
        [cls == _GRANULAR, cls == _BASAL, cls == _FIBRO],
        [normal + np.float32(math.pi / 2) + jitter, normal + jitter, fam + 2 * jitter],
        ut * np.float32(math.pi),
    ).astype(np.float32)
    alive = _hard_core(slide.seed, y, x, a, cby, cbx, k)
    keep = alive & (y >= y_lo) & (y < y_hi) & (x >= x_lo) & (x < x_hi)
    prm = prm[keep]
    return _Nuclei(
        y=y[keep],
        x=x[keep],
        a=a[keep],
        b=b[keep],
        theta=theta[keep],
        inten=inten[keep],
        halo_amp=prm[:, 6],
        halo_r=prm[:, 7] * r_eq[keep],
    )


_NUCLEUS_PARAMS = np.array(
    [
        (4.0, 1.2, 1.8, 0.6, 0.45, 0.25, 0.8, 2.2),  # _GRANULAR
        (4.3, 1.6, 1.0, 0.35, 0.55, 0.35, 1.0, 2.4),  # _SPINOUS
        (4.0, 1.2, 1.2, 0.4, 0.70, 0.30, 1.0, 2.0),  # _BASAL
        (4.0, 0.6, 1.0, 0.15, 0.75, 0.25, 0.25, 1.6),  # _LYMPHO
        (4.0, 1.0, 1.8, 0.7, 0.50, 0.30, 0.3, 1.8),  # _FIBRO
        (5.0, 2.5, 1.0, 0.5, 0.65, 0.35, 0.9, 2.0),  # _NEST
    ],
    dtype=np.float32,
)
"""Per nucleus class (rows in class order): r_eq lo, span; aspect lo, span; intensity lo,
span; halo amplitude; halo radius factor."""


def _thinned(
    slide: _Slide,
    coarse: _Coarse,
    y: np.ndarray,
    x: np.ndarray,
    cby: np.ndarray,
    cbx: np.ndarray,
    k: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Candidates kept by the local nuclear density, with their class and surface normal.

    Returns ``(y, x, cby, cbx, k, cls, normal)`` of the accepted candidates.
    """
    s = slide.seed
    # Local density from the same lattice fields the image layers use.
    # Only the fields the density needs for every candidate; the rest after thinning.
    dens_fields = [_F[n] for n in ("depth", "epi", "ker", "rete", "nest")]
    depth, epi, ker, rete, nest = sample_nodes(
        coarse.stack[dens_fields], COARSE, coarse.ny0, coarse.nx0, y, x
    )
    _wk, we, wd, wn = _layers(depth, epi, ker, rete, nest)
    dk = depth - ker
    lam_epi = np.where(
        dk < 18.0,
        _LAMBDA_GRANULAR,
        np.where(depth < rete - 14.0, _LAMBDA_SPINOUS, _LAMBDA_BASAL),
    )
    parts = np.stack([we * lam_epi, wd * _LAMBDA_DERMIS, wn * _LAMBDA_NEST])
    lam = parts.sum(0)
    acc = unit(hash_u32(s, _T_NUC_ACC, cby, cbx, k)).astype(np.float64) * _LAMBDA_MAX < lam
    y, x, cby, cbx, k, parts, dk, depth, rete = (
        v[..., acc] for v in (y, x, cby, cbx, k, parts, dk, depth, rete)
    )
    f = sample_nodes(coarse.stack[[_F["ny"], _F["nx"]]], COARSE, coarse.ny0, coarse.nx0, y, x)
    normal = np.arctan2(f[0], f[1]).astype(np.float32)
    cls_major = np.argmax(parts, axis=0)  # 0 epidermis, 1 dermis, 2 nest
    ui = unit(hash_u32(s, _T_NUC_SHAPE, cby, cbx, k), 24, 8) + np.float32(1 / 512)
    cls = np.full(len(y), _SPINOUS)
    cls[(cls_major == 0) & (dk < 18.0)] = _GRANULAR
    cls[(cls_major == 0) & (depth >= rete - 14.0)] = _BASAL
    cls[cls_major == 1] = np.where(ui[cls_major == 1] < 0.35, _LYMPHO, _FIBRO)
    cls[cls_major == 2] = _NEST
    return y, x, cby, cbx, k, cls, normal


def _hard_core(
    seed: int,
    y: np.ndarray,
    x: np.ndarray,
    a: np.ndarray,
    cby: np.ndarray,
    cbx: np.ndarray,
    k: np.ndarray,
) -> np.ndarray:
    """Matern type-II hard core: which candidates survive (bool mask).

    A nucleus goes if any competitor whose ellipse could touch it has a smaller priority
    mark. The decision only depends on candidates within _INTERACT, all of which are
    present, so it is the same in every window.
    """
    prio = (hash_u32(seed, _T_NUC_PRIO, cby, cbx, k).astype(np.uint64) << np.uint64(32)) | (
        hash_u32(seed, _T_NUC_PRIO + 100, cby, cbx, k).astype(np.uint64)
    )
    alive = np.ones(len(y), dtype=bool)
    if len(y) > 1:
        pairs = cKDTree(np.stack([y, x], 1)).query_pairs(_INTERACT, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            d2 = (y[i] - y[j]) ** 2 + (x[i] - x[j]) ** 2
            lim = a[i].astype(np.float64) + a[j]
            clash = d2 < lim * lim
            i, j = i[clash], j[clash]
            loser = np.where(prio[i] > prio[j], i, j)
            alive[loser] = False
    return alive


def _stamp_nuclei(nuc: _Nuclei, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Full-resolution F brightness of the nuclei (max-composited soft ellipses)."""
    out = np.zeros((h, w), dtype=np.float32)
    if len(nuc.y) == 0:
        return out
    # The ellipse ends within a + 1.5 px of its centre (soft edge <= 0.9 * sqrt(aspect));
    # a batch only needs stamps as big as its largest nucleus. Pixel values do not depend
    # on the stamp size, so this stays region-independent.
    rad = min(_CORE_R, math.ceil(float(nuc.a.max()) + 2.0))
    q = 2 * rad + 1
    oy = np.rint(nuc.y).astype(np.int64) - rad
    ox = np.rint(nuc.x).astype(np.int64) - rad
    off = np.arange(q)
    py = (oy[:, None] + off[None, :]).astype(np.float64)  # (n, q) global rows
    px = (ox[:, None] + off[None, :]).astype(np.float64)
    dy = (py - nuc.y[:, None]).astype(np.float32)[:, :, None]
    dx = (px - nuc.x[:, None]).astype(np.float32)[:, None, :]
    c = np.cos(nuc.theta)[:, None, None]
    s = np.sin(nuc.theta)[:, None, None]
    u = (dx * c + dy * s) * (np.float32(1.0) / nuc.a)[:, None, None]
    v = (dy * c - dx * s) * (np.float32(1.0) / nuc.b)[:, None, None]
    rho = np.sqrt(u * u + v * v)
    soft = (np.float32(0.9) / nuc.r_eq)[:, None, None]
    edge = np.float32(1.0) - smoothstep(rho, 1.0 - soft, 1.0 + soft)
    val = edge * (np.float32(1.0) - np.float32(0.15) * np.minimum(rho * rho, 1.0))
    val *= nuc.inten[:, None, None]
    max_stamp(out, oy - y0, ox - x0, val)
    return out


def _stamp_halo(nuc: _Nuclei, hy0: int, hx0: int, nh: int, nw: int) -> np.ndarray:
    """Cytoplasm brightness on the half-resolution grid (node i at pixel 2*i)."""
    out = np.zeros((nh, nw), dtype=np.float32)
    if len(nuc.y) == 0:
        return out
    rq = math.ceil(_HALO_R / _HALF)
    q = 2 * rq + 1
    oy = np.rint(nuc.y / _HALF).astype(np.int64) - rq
    ox = np.rint(nuc.x / _HALF).astype(np.int64) - rq
    off = np.arange(q)
    dy = ((oy[:, None] + off[None, :]) * _HALF - nuc.y[:, None]).astype(np.float32)
    dx = ((ox[:, None] + off[None, :]) * _HALF - nuc.x[:, None]).astype(np.float32)
    inv = (np.float32(1.0) / nuc.halo_r)[:, None]
    ry = dy * inv
    rx = dx * inv
    r2 = ry[:, :, None] ** 2 + rx[:, None, :] ** 2
    val = np.maximum(np.float32(1.0) - r2, 0.0)
    val *= val
    val *= nuc.halo_amp[:, None, None]
    max_stamp(out, oy - hy0, ox - hx0, val)
    return out


# ---------------------------------------------------------------------------------------------
# Collagen fibres
# ---------------------------------------------------------------------------------------------
def _fibres(
    seed: int,
    tag: int,
    ys: np.ndarray,
    xs: np.ndarray,
    warp: np.ndarray,
    angle: float,
    spacing: float,
    seg_len: float,
) -> np.ndarray:
    """One family of wavy fibre bundles, 0..1, on the grid ``ys x xs`` (px).

    The stripes are level sets of ``n . p + warp(p)`` (n the family's normal, warp a smooth
    displacement whose gradient stays below 1, so stripes never fold); each stripe is one
    fibre with its own width, lateral offset and brightness, cut into segments along its
    length with random gaps. All randomness is hashed from the fibre and segment indices.
    """
    ny, nx = math.sin(angle), math.cos(angle)
    inv = 1.0 / spacing
    u = (ys * (ny * inv)).astype(np.float32)[:, None] + (xs * (nx * inv)).astype(np.float32)
    u += warp * np.float32(inv)
    i = np.floor(u)
    frac = u - i
    i = i.astype(np.int32)
    h1 = hash_u32(seed, tag, i)
    off = (unit(h1, 0, 8) - np.float32(0.5)) * np.float32(0.45)
    width = np.float32(0.16) + np.float32(0.28) * unit(h1, 8, 8)
    phase = unit(h1, 16, 8)
    t = (frac - np.float32(0.5) - off) / width
    prof = np.maximum(np.float32(1.0) - t * t, 0.0)
    vseg = (ys * (nx / seg_len)).astype(np.float32)[:, None] - (xs * (ny / seg_len)).astype(
        np.float32
    )
    vseg += phase
    j = np.floor(vseg)
    g = vseg - j
    h2 = hash_u32(seed, tag + 1000, i, j.astype(np.int32))
    present = unit(h2, 0, 8) < np.float32(0.72)
    bright = np.float32(0.45) + np.float32(0.55) * unit(h2, 8, 8)
    taper = np.clip(np.minimum(g, np.float32(1.0) - g) * np.float32(5.0), 0.0, 1.0)
    return prof * taper * np.where(present, bright, np.float32(0.0))


# ---------------------------------------------------------------------------------------------
# Region rendering
# ---------------------------------------------------------------------------------------------
def _check_region(size: tuple[int, int], y0: int, x0: int, h: int, w: int) -> None:
    hh, ww = (int(v) for v in size)
    if hh < 1 or ww < 1:
        raise ValueError(f"slide size must be positive, got {size!r}")
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > hh or x0 + w > ww:
        raise ValueError(
            f"region (y0={y0}, x0={x0}, h={h}, w={w}) is not inside a {hh}x{ww} slide"
        )


def _slide(size: tuple[int, int], seed: int) -> _Slide:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _Slide(int(size[0]), int(size[1]), seed)


def _vignetting(coords: np.ndarray, strength: float) -> np.ndarray:
    r = (2.0 * ((coords % _FOV) + 0.5) / _FOV - 1.0).astype(np.float32)
    return np.float32(1.0) - np.float32(strength) * r * r


def _compose_half(
    slide: _Slide,
    coarse: _Coarse,
    y0: int,
    x0: int,
    h: int,
    w: int,
    hy0: int,
    hx0: int,
    nh: int,
    nw: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], _Nuclei]:
    """Clean R and F without nuclei cores, on the half-resolution grid; layers; nuclei."""
    s = slide.seed
    fl = upsample(
        coarse.stack[_HALF_FIELDS],
        COARSE,
        coarse.ny0,
        coarse.nx0,
        hy0 * _HALF,
        hx0 * _HALF,
        nh,
        nw,
        _HALF,
    )
    g = {_FIELDS[k]: fl[i] for i, k in enumerate(_HALF_FIELDS)}
    wk, we, wd, wn = _layers(g["depth"], g["epi"], g["ker"], g["rete"], g["nest"])

    a1, a2 = slide.fibre_angles()
    yf = np.arange(hy0, hy0 + nh, dtype=np.float64) * _HALF
    xf = np.arange(hx0, hx0 + nw, dtype=np.float64) * _HALF
    fib1 = _fibres(s, _T_FIB1, yf, xf, g["warp1"], a1, 22.0, 220.0)
    fib2 = _fibres(s, _T_FIB2, yf, xf, g["warp2"], a2, 14.0, 120.0)
    # Mostly one family at a time, crossing where the balance field is near zero.
    w1 = np.clip(np.float32(0.55) + np.float32(1.6) * g["fam"], 0.0, 1.0)
    w2 = np.clip(np.float32(0.55) - np.float32(1.6) * g["fam"], 0.0, 1.0)
    # Papillary dermis (just below the junction) has finer, fainter collagen.
    pap = np.float32(0.55) + np.float32(0.45) * smoothstep(g["depth"] - g["rete"], 15.0, 110.0)
    fib = g["dens"] * pap * np.maximum(w1 * fib1, w2 * fib2 * np.float32(0.85))

    m = _HALO_MARGIN
    nuc = _nuclei(slide, coarse, y0 - m, y0 + h + m, x0 - m, x0 + w + m)
    halo = _stamp_halo(nuc, hy0, hx0, nh, nw)
    border = (np.float32(1.0) - halo) ** 2

    r_half = (
        _R_BG
        + wk * (np.float32(0.62) * g["kgain"])
        + we * (np.float32(0.09) + np.float32(0.20) * border)
        + wd * (np.float32(0.13) + np.float32(0.75) * fib)
        + wn * (np.float32(0.06) + np.float32(0.06) * border)
    )
    f_half = (
        _F_BG
        + wk * np.float32(0.05)
        + we * (np.float32(0.04) + np.float32(0.20) * halo)
        + wd * (np.float32(0.02) + np.float32(0.05) * fib + np.float32(0.10) * halo)
        + wn * (np.float32(0.04) + np.float32(0.14) * halo)
    )
    layers = {"keratin": wk, "epidermis": we, "dermis": wd, "nest": wn, "fibres": wd * fib}
    return r_half, f_half, layers, nuc


def _render(
    slide: _Slide,
    y0: int,
    x0: int,
    h: int,
    w: int,
    looks: float | None,
    vignetting: float,
    noise: bool,
    coarse: _Coarse | None = None,
    want_layers: bool = False,
) -> dict[str, np.ndarray]:
    s = slide.seed
    margin = _HALO_MARGIN + _INTERACT + 2.0
    win = (
        math.floor((y0 - margin) / COARSE) - 1,
        math.floor((y0 + h + margin) / COARSE) + 3,
        math.floor((x0 - margin) / COARSE) - 1,
        math.floor((x0 + w + margin) / COARSE) + 3,
    )
    if coarse is None or not coarse.covers(*win):
        coarse = _coarse_for(slide, y0 - margin, y0 + h + margin, x0 - margin, x0 + w + margin)

    # Half-resolution grid: nodes hy0..hy1 (inclusive) cover every pixel's bilinear stencil.
    hy0, hy1 = y0 // _HALF, (y0 + h - 1) // _HALF + 1
    hx0, hx1 = x0 // _HALF, (x0 + w - 1) // _HALF + 1
    nh, nw = hy1 - hy0 + 1, hx1 - hx0 + 1
    depth = coarse.stack[
        _F["depth"],
        win[0] - coarse.ny0 : win[1] - coarse.ny0,
        win[2] - coarse.nx0 : win[3] - coarse.nx0,
    ]
    if depth.max() < -3.0 and not want_layers:
        # Background only, nuclei included (they need tissue, which starts at depth -1.25):
        # every layer weight is exactly 0, so the full path would produce exactly these
        # constants; skipping it halves the cost of background-heavy slides.
        r_half = np.full((nh, nw), _R_BG, dtype=np.float32)
        f_half = np.full((nh, nw), _F_BG, dtype=np.float32)
        layers, nuc = {}, None
    else:
        r_half, f_half, layers, nuc = _compose_half(slide, coarse, y0, x0, h, w, hy0, hx0, nh, nw)
    base = upsample(np.stack([r_half, f_half]), _HALF, hy0, hx0, y0, x0, h, w)
    r, f = base[0], base[1]

    if nuc is not None:
        keep = (
            (nuc.y >= y0 - _CORE_R)
            & (nuc.y < y0 + h + _CORE_R)
            & (nuc.x >= x0 - _CORE_R)
            & (nuc.x < x0 + w + _CORE_R)
        )
        nucf = _stamp_nuclei(nuc.select(keep), y0, x0, h, w)
        # Nuclei scatter little light back: dark in R where bright in F.
        r *= np.float32(1.0) - np.float32(0.6) * np.minimum(nucf * np.float32(1 / 0.4), 1.0)
        np.maximum(f, nucf, out=f)
    if vignetting:
        ys = np.arange(y0, y0 + h, dtype=np.int64)
        xs = np.arange(x0, x0 + w, dtype=np.int64)
        vig = _vignetting(ys, vignetting)[:, None] * _vignetting(xs, vignetting)[None, :]
        r *= vig
        f *= vig
    out: dict[str, np.ndarray] = {}
    if want_layers:
        lay = upsample(np.stack(list(layers.values())), _HALF, hy0, hx0, y0, x0, h, w)
        out.update(zip(layers, lay, strict=True))
        out["tissue"] = lay[0] + lay[1] + lay[2] + lay[3]
        out.update(nuclei=nucf, r_clean=r.copy(), f_clean=f.copy())
    if looks:
        r *= block_field(
            s, _T_SPECKLE, y0, x0, h, w, lambda rng, shp: gamma_speckle(rng, shp, looks)
        )
    if noise:
        sig = np.sqrt(np.float32(0.006**2) + np.float32(0.0025) * f)
        sig *= block_field(s, _T_FNOISE, y0, x0, h, w, sensor_noise)
        f += sig
    np.clip(r, 0.0, 1.0, out=r)
    np.clip(f, 0.0, 1.0, out=f)
    out["r"], out["f"] = r, f
    return out


_STRIP = NOISE_BLOCK  # rows rendered at once: whole noise blocks, no random numbers wasted
_CHUNK_W = 2048  # columns rendered at once (bounds the working memory, ~0.1 GB)


def _render_tiled(
    slide: _Slide,
    y0: int,
    x0: int,
    h: int,
    w: int,
    looks: float | None,
    vignetting: float,
    noise: bool,
    want_layers: bool,
    store: str = "float32",
) -> dict[str, np.ndarray]:
    """Render a region in chunks aligned to the global strip/chunk grid.

    The lattice fields are evaluated once per strip for the region's full width. Since
    every pixel is a pure function of its global coordinates, chunking changes nothing but
    the memory used.
    """
    out: dict[str, np.ndarray] = {}
    margin = _HALO_MARGIN + _INTERACT + 2.0
    for ty in range(y0 - y0 % _STRIP, y0 + h, _STRIP):
        ya, yb = max(ty, y0), min(ty + _STRIP, y0 + h)
        coarse = _coarse_for(slide, ya - margin, yb + margin, x0 - margin, x0 + w + margin)
        for tx in range(x0 - x0 % _CHUNK_W, x0 + w, _CHUNK_W):
            xa, xb = max(tx, x0), min(tx + _CHUNK_W, x0 + w)
            part = _render(
                slide, ya, xa, yb - ya, xb - xa, looks, vignetting, noise, coarse, want_layers
            )
            for key, val in part.items():
                if key in ("r", "f"):
                    val = _quantize(val, store)
                if key not in out:
                    out[key] = np.empty((h, w), dtype=val.dtype)
                out[key][ya - y0 : yb - y0, xa - x0 : xb - x0] = val
    return out


def _check_looks(looks: float | None) -> float | None:
    if looks is None or looks == 0:
        return None
    looks = float(looks)
    if not looks > 0 or not math.isfinite(looks):
        raise ValueError(f"looks must be a positive number or None, got {looks!r}")
    return looks


def synth_region(
    size: tuple[int, int],
    y0: int,
    x0: int,
    h: int,
    w: int,
    seed: int = 1,
    looks: float | None = 5,
    *,
    vignetting: float = 0.12,
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the R and F pixels of a region of a synthetic slide.

    Parameters
    ----------
    size
        ``(H, W)`` of the whole slide in pixels (the tissue layout scales with it).
    y0, x0, h, w
        The region, in global slide pixels; it must lie inside the slide.
    seed
        Non-negative integer; the slide is a deterministic function of it.
    looks
        Number of looks ``L`` of the multiplicative gamma(L, 1/L) speckle on R;
        ``None`` (or 0) for a speckle-free R.
    vignetting
        Relative darkening at the corners of each 1000-px field of view (0 disables).
    noise
        Add signal-dependent sensor noise to F.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        R and F, each ``(h, w)`` float32 in [0, 1]; bit-identical to the same pixels of any
        larger region of the same slide.
    """
    _check_region(size, y0, x0, h, w)
    out = _render_tiled(
        _slide(size, seed), y0, x0, h, w, _check_looks(looks), vignetting, noise, False
    )
    return out["r"], out["f"]


def synth_layers(
    size: tuple[int, int],
    y0: int,
    x0: int,
    h: int,
    w: int,
    seed: int = 1,
    looks: float | None = 5,
    *,
    vignetting: float = 0.12,
    noise: bool = True,
) -> dict[str, np.ndarray]:
    """Like :func:`synth_region`, plus the model's layers (for tests, masks and figures).

    Returns
    -------
    dict
        ``r``, ``f`` (as :func:`synth_region`), ``r_clean``, ``f_clean`` (before speckle and
        sensor noise), and weights in [0, 1]: ``tissue``, ``keratin``, ``epidermis``,
        ``dermis`` (without nests), ``nest``, ``fibres`` (collagen brightness in the dermis),
        ``nuclei`` (F brightness of the nuclei).
    """
    _check_region(size, y0, x0, h, w)
    return _render_tiled(
        _slide(size, seed), y0, x0, h, w, _check_looks(looks), vignetting, noise, True
    )


def synth_nuclei(
    size: tuple[int, int],
    seed: int = 1,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Ground-truth nuclei whose centres lie in a region (or the whole slide).

    Parameters
    ----------
    size
        ``(H, W)`` of the slide.
    seed
        Generator seed.
    region
        ``(y0, x0, h, w)``; default the whole slide (mind the memory for huge slides:
        about 1 nucleus per 400 px^2 of epidermis).

    Returns
    -------
    numpy.ndarray
        Structured array of dtype :data:`NUCLEUS_DTYPE` (``y``, ``x``: centre in global slide
        pixels, ``radius_px``: equivalent radius sqrt(a*b) of the ellipse), sorted by (y, x).
        These are exactly the nuclei drawn into F (each visible where the region is
        rendered; those near the region's edge extend beyond it).
    """
    slide = _slide(size, seed)
    if region is None:
        region = (0, 0, slide.h, slide.w)
    y0, x0, h, w = (int(v) for v in region)
    _check_region(size, y0, x0, h, w)
    parts = []
    step = 2048  # bounded memory for big regions; the result does not depend on the tiling
    for ty in range(y0, y0 + h, step):
        for tx in range(x0, x0 + w, step):
            th, tw = min(step, y0 + h - ty), min(step, x0 + w - tx)
            m = _INTERACT + 2.0
            coarse = _coarse_for(slide, ty - m, ty + th + m, tx - m, tx + tw + m)
            nuc = _nuclei(slide, coarse, ty, ty + th, tx, tx + tw)
            arr = np.empty(len(nuc.y), dtype=NUCLEUS_DTYPE)
            arr["y"], arr["x"], arr["radius_px"] = nuc.y, nuc.x, nuc.r_eq
            parts.append(arr)
    out = np.concatenate(parts) if parts else np.empty(0, NUCLEUS_DTYPE)
    return out[np.lexsort((out["x"], out["y"]))]


_DTYPES = {"uint8": 255, "uint16": 65535, "float32": None}


def _check_dtype(dtype: str | np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


def _quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 in [0, 1] -> the stored dtype (round to nearest)."""
    if dtype == "float32":
        return x
    scale = _DTYPES[dtype]
    return np.rint(x * np.float32(scale)).astype(dtype)


def synth_mosaic_arrays(
    size: tuple[int, int],
    seed: int = 1,
    looks: float | None = 5,
    dtype: str = "float32",
    *,
    vignetting: float = 0.12,
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A whole (small) synthetic slide in memory.

    Parameters
    ----------
    size, seed, looks, vignetting, noise
        As :func:`synth_region`.
    dtype
        ``"float32"`` (values in [0, 1]), or ``"uint8"`` / ``"uint16"``: exactly the
        values :func:`write_synthetic_mosaic` stores for the same arguments.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        R and F, ``size``-shaped.
    """
    dtype = _check_dtype(dtype)
    r, f = synth_region(
        size, 0, 0, int(size[0]), int(size[1]), seed, looks, vignetting=vignetting, noise=noise
    )
    if dtype == "float32":
        return r, f
    return _quantize(r, dtype), _quantize(f, dtype)


# ---------------------------------------------------------------------------------------------
# Streaming writer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _WriteSpec:
    """What :func:`write_synthetic_mosaic` writes (validated arguments)."""

    slide: _Slide
    looks: float | None
    dtype: str
    tile: int
    vignetting: float
    noise: bool
    compression: str
    workers: int

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "uint8" else 16

    @property
    def bigtiff(self) -> bool:
        """Level 0 needs BigTIFF: the pyramid adds a third; compression is not guaranteed."""
        itemsize = {"uint8": 1, "uint16": 2}.get(self.dtype, 4)
        return self.slide.h * self.slide.w * itemsize * 4 / 3 > 3.5e9

    def metadata(self) -> dict:
        """The generator parameters stored as ``mosaic.json`` beside the TIFFs."""
        return {
            "generator": "napari_confocal_stain.io.synthetic",
            "synth_version": SYNTH_VERSION,
            "package_version": _package_version(),
            "seed": self.slide.seed,
            "size": [self.slide.h, self.slide.w],
            "looks": self.looks,
            "dtype": self.dtype,
            "pixel_size_um": PIXEL_SIZE_UM,
            "vignetting": self.vignetting,
            "noise": self.noise,
            "tile": self.tile,
            "compression": self.compression,
            "channels": {"R": "DET#1/highres_raw.tif", "F": "DET#2/highres_raw.tif"},
        }


def _render_strip(spec: _WriteSpec, y0: int) -> tuple[np.ndarray, np.ndarray]:
    slide = spec.slide
    h = min(_STRIP, slide.h - y0)
    store = "uint16" if spec.dtype == "float32" else spec.dtype
    out = _render_tiled(
        slide, y0, 0, h, slide.w, spec.looks, spec.vignetting, spec.noise, False, store
    )
    return out["r"], out["f"]


class _PngStream:
    """A grayscale PNG, produced strip by strip, read by libvips through a SourceCustom.

    libvips in the pyvips wheel has no PPM loader, but PNG streams sequentially; the zlib
    stream uses stored (level-0) blocks so encoding costs a copy and a checksum.
    """

    _EOF = object()

    def __init__(self, width: int, height: int, bits: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=3)  # ~one strip
        self.aborted = threading.Event()
        self._buf = memoryview(b"")
        self._pos = 0
        self._z = zlib.compressobj(0)
        self._bits = bits
        ihdr = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
        self._head = b"\x89PNG\r\n\x1a\n" + b"".join(self._chunk(b"IHDR", ihdr))

    @staticmethod
    def _chunk(kind: bytes, data: bytes) -> list[bytes]:
        # Kept as parts: joining would copy the (strip-sized) data once more.
        crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
        return [struct.pack(">I", len(data)) + kind, data, struct.pack(">I", crc)]

    def encode(self, rows: np.ndarray) -> list[bytes]:
        """PNG byte parts for ``rows`` (filter type 0 prefix per row); maybe empty."""
        data = rows.astype(">u2", copy=False).view(np.uint8) if self._bits == 16 else rows
        raw = np.empty((rows.shape[0], 1 + data.shape[1]), dtype=np.uint8)
        raw[:, 0] = 0
        raw[:, 1:] = data
        parts = [self._head] if self._head else []
        self._head = b""
        comp = self._z.compress(raw.data)
        del raw
        if comp:
            parts += self._chunk(b"IDAT", comp)
        return parts

    def finish(self) -> list[bytes]:
        """The last IDAT and the IEND chunk."""
        return self._chunk(b"IDAT", self._z.flush()) + self._chunk(b"IEND", b"")

    def put(self, parts: list[bytes] | object, alive: Callable[[], bool]) -> None:
        """Queue byte parts (or the EOF marker), waiting while the reader is alive."""
        for data in parts if isinstance(parts, list) else [parts]:
            while True:
                try:
                    self.queue.put(data, timeout=0.2)
                    break
                except queue.Full:
                    if not alive():
                        return

    def read(self, size: int) -> memoryview | None:
        # An empty answer means end of stream to libvips, so never return one early
        # (zlib may hold small inputs back, leaving empty items in the queue).
        while self._pos >= len(self._buf):
            if self.aborted.is_set():
                return None
            item = self.queue.get()
            if item is self._EOF or self.aborted.is_set():
                return None
            self._buf, self._pos = memoryview(item), 0
        out = self._buf[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def abort(self) -> None:
        self.aborted.set()
        try:  # wake a reader blocked on an empty queue
            self.queue.put_nowait(self._EOF)
        except queue.Full:
            pass


def _tiff_writer(
    stream: _PngStream, path: Path, tile: int, compression: str, bigtiff: bool, dtype: str
):
    """Thread body: pull the PNG stream through libvips into a tiled single-level TIFF."""
    import pyvips

    def run() -> None:
        source = pyvips.SourceCustom()
        source.on_read(stream.read)
        image = pyvips.Image.new_from_source(
            source, "", access="sequential", fail_on="truncated", unlimited=True
        )
        if dtype == "float32":
            image = image.cast("float") * (1.0 / 65535.0)
            image = image.cast("float")
        px_per_mm = 1000.0 / PIXEL_SIZE_UM
        image.tiffsave(
            str(path),
            tile=True,
            tile_width=tile,
            tile_height=tile,
            compression=compression,
            # Measured on these slides: deflate level 3 without predictor is within 3% of
            # level 6's size at ~60% of its CPU time (speckle leaves little to predict).
            level=3,
            predictor="none",
            xres=px_per_mm,
            yres=px_per_mm,
            resunit="cm",
            bigtiff=bigtiff,
        )

    return run


def _ordered_strips(spec: _WriteSpec) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Strips in order, rendered by a small thread pool (numpy releases the GIL)."""
    starts = list(range(0, spec.slide.h, _STRIP))
    with ThreadPoolExecutor(max_workers=spec.workers) as pool:
        pending: list = []
        nxt = 0
        for _ in starts:
            while nxt < len(starts) and len(pending) < spec.workers:
                pending.append(pool.submit(_render_strip, spec, starts[nxt]))
                nxt += 1
            fut = pending.pop(0)
            try:
                yield fut.result()
            except BaseException:
                for p in pending:
                    p.cancel()
                raise


def write_synthetic_mosaic(
    out: str | os.PathLike,
    size: tuple[int, int] = (4096, 4096),
    seed: int = 1,
    looks: float | None = 5,
    dtype: str = "uint8",
    tile: int = 512,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    *,
    vignetting: float = 0.12,
    noise: bool = True,
    compression: str = "deflate",
    workers: int | None = None,
) -> Path:
    """Write a synthetic slide as a Vivascope mosaic folder, streaming (bounded memory).

    ``out/DET#1/highres_raw.tif`` is R and ``out/DET#2/highres_raw.tif`` is F: tiled
    pyramidal TIFFs (level 0 first, then 2x2-mean reduced pages down to one tile, as
    libvips' ``pyramid=True`` lays them out), deflate-compressed, with 0.75 um/px in the
    resolution tags (per level), plus ``out/mosaic.json`` with the generator parameters.

    Peak memory depends on the slide's width, not its area (see :func:`_write_into`).
    Everything is written into a temporary sibling folder that is renamed to ``out`` at the
    end; on any error (or an exception raised by ``progress``) it is removed.

    Parameters
    ----------
    out
        Destination folder.
    size
        ``(H, W)`` in pixels.
    seed, looks, vignetting, noise
        As :func:`synth_region`.
    dtype
        ``"uint8"``, ``"uint16"`` or ``"float32"`` (float32 values are stored with 16-bit
        precision: multiples of 1/65535).
    tile
        TIFF tile side (multiple of 16).
    overwrite
        Replace an existing non-empty ``out``; otherwise that raises :class:`MosaicError`.
    progress
        Called as ``progress(done, total)`` after each strip is handed to the writers.
    compression
        TIFF compression: ``"deflate"`` (default, read everywhere), ``"lzw"`` or
        ``"none"``.
    workers
        Threads rendering strips (default: up to 2, at most the CPU count).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    MosaicError
        ``out`` exists and is not empty (without ``overwrite``), or is a file, or writing
        failed.
    """
    out = Path(out)
    spec = _write_spec(size, seed, looks, dtype, tile, vignetting, noise, compression, workers)
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            _write_into(tmp, spec, progress)
        except _WriteFailed as exc:
            raise MosaicError(out, f"writing the synthetic slide failed: {exc.__cause__}") from (
                exc.__cause__
            )
        (tmp / "mosaic.json").write_text(json.dumps(spec.metadata(), indent=2) + "\n")
        _check_destination(out, overwrite)
        if out.exists():
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_spec(
    size: tuple[int, int],
    seed: int,
    looks: float | None,
    dtype: str,
    tile: int,
    vignetting: float,
    noise: bool,
    compression: str,
    workers: int | None,
) -> _WriteSpec:
    """Validate :func:`write_synthetic_mosaic`'s arguments (ValueError on bad ones)."""
    slide = _slide(size, seed)
    if slide.h < 1 or slide.w < 1:
        raise ValueError(f"slide size must be positive, got {size!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("deflate", "lzw", "none"):
        # (zstd is not compiled into the libvips of the pyvips wheel.)
        raise ValueError(f"compression must be deflate, lzw or none, got {compression!r}")
    return _WriteSpec(
        slide=slide,
        looks=_check_looks(looks),
        dtype=_check_dtype(dtype),
        tile=tile,
        vignetting=vignetting,
        noise=noise,
        compression=compression,
        workers=workers or max(1, min(2, os.cpu_count() or 1)),
    )


class _WriteFailed(Exception):
    """libvips failed in a writer thread (the cause is chained)."""


def _package_version() -> str:
    from napari_confocal_stain import __version__

    return __version__


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.is_file() and not overwrite:
        raise MosaicError(out, "exists and is a file; refusing to replace it (use overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MosaicError(out, "exists and is not empty; refusing to overwrite it")


def _pyramid_shapes(h: int, w: int, tile: int) -> list[tuple[int, int]]:
    """Level shapes, halving (floor) until a level fits in one tile, as libvips does."""
    shapes = [(h, w)]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


class _Reducer:
    """Streaming 2x2 mean pyramid: feed level-0 rows, get the rows of every level.

    Odd trailing rows wait for their partner in the next strip; a last odd row or column is
    dropped (floor), matching the level shapes of :func:`_pyramid_shapes`.
    """

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = shapes
        self.carry: list[np.ndarray | None] = [None] * len(shapes)

    def push(self, rows: np.ndarray) -> list[np.ndarray]:
        out = [rows]
        for k in range(1, len(self.shapes)):
            prev = out[-1]
            if self.carry[k] is not None:
                prev = np.concatenate([self.carry[k], prev])
            n = prev.shape[0] // 2 * 2
            self.carry[k] = prev[n:] if n < prev.shape[0] else None
            wk = self.shapes[k][1]
            q = prev[:n, : 2 * wk].astype(np.uint32)
            s = q[0::2, 0::2] + q[0::2, 1::2] + q[1::2, 0::2] + q[1::2, 1::2]
            out.append(((s + 2) >> 2).astype(rows.dtype))  # mean, rounded half up
        return out


def _append_levels(base: Path, levels: list[Path], tile: int) -> None:
    """Append the (already compressed) tiles of each level file to ``base`` as reduced pages.

    The tiles are copied as they are (no recompression), so this is a sequential copy of
    a third of the level-0 size at most, in bounded memory.
    """
    import tifffile

    with tifffile.TiffWriter(base, append=True) as tw:
        for k, path in enumerate(levels, start=1):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                fh = tif.filehandle

                def segments(page=page, fh=fh) -> Iterator[bytes]:
                    for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
                        fh.seek(off)
                        yield fh.read(cnt)

                res = 1e4 / PIXEL_SIZE_UM / 2**k  # px/cm
                tw.write(
                    segments(),
                    shape=page.shape,
                    dtype=page.dtype,
                    tile=(tile, tile),
                    compression=page.compression,
                    predictor=page.predictor,
                    photometric="minisblack",
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=1,  # reduced-resolution version of the first page
                    metadata=None,
                    software=False,
                )
            path.unlink()


def _write_into(
    folder: Path, spec: _WriteSpec, progress: Callable[[int, int], None] | None
) -> None:
    """Stream both channels, every pyramid level through its own libvips writer.

    Strips of 256 rows are rendered by numpy (a small thread pool) and streamed as PNG
    (uncompressed deflate blocks) through ``pyvips.SourceCustom`` into libvips
    ``tiffsave``, one sequential writer per channel and pyramid level.

    libvips' own ``pyramid=True`` keeps the compressed lower levels in memory until the end
    (measured: anonymous RSS grows by ~1/3 of the compressed output), so it cannot write
    100k-px slides in bounded memory. Instead each level is reduced here from the strips as
    they pass (a 2x2 mean) and streamed to a single-level tiled ``tiffsave`` of its own; at
    the end the lower levels' tiles are appended to the level-0 file as reduced pages.
    """
    shapes = _pyramid_shapes(spec.slide.h, spec.slide.w, spec.tile)
    errors: list[BaseException] = []
    streams, paths, threads = _start_writers(folder, spec, shapes, errors)

    def alive() -> bool:
        return not errors and all(th.is_alive() for th in threads)

    reducers = {det: _Reducer(shapes) for det in streams}
    total = math.ceil(spec.slide.h / _STRIP)
    strips = _ordered_strips(spec)
    try:
        for done, (r, f) in enumerate(strips, start=1):
            for det, rows in (("DET#1", r), ("DET#2", f)):
                for stream, level_rows in zip(streams[det], reducers[det].push(rows), strict=True):
                    if level_rows.shape[0]:
                        stream.put(stream.encode(level_rows), alive)
            if errors:
                break
            if progress is not None:
                progress(done, total)
        for det in streams:
            for stream in streams[det]:
                stream.put(stream.finish(), alive)
                stream.put(_PngStream._EOF, alive)
    except BaseException:
        for det in streams:
            for stream in streams[det]:
                stream.abort()
        for th in threads:
            th.join()
        raise
    finally:
        strips.close()  # stops the render pool before returning or re-raising
    for th in threads:
        th.join()
    if errors:
        raise _WriteFailed() from errors[0]
    for det in paths:
        _append_levels(paths[det][0], paths[det][1:], spec.tile)


def _start_writers(
    folder: Path, spec: _WriteSpec, shapes: list[tuple[int, int]], errors: list[BaseException]
) -> tuple[dict[str, list[_PngStream]], dict[str, list[Path]], list[threading.Thread]]:
    """One streaming libvips writer thread per channel and pyramid level, started.

    A writer that fails appends its exception to ``errors`` and aborts its stream.
    """
    streams: dict[str, list[_PngStream]] = {}
    paths: dict[str, list[Path]] = {}
    threads: list[threading.Thread] = []
    for det in ("DET#1", "DET#2"):
        (folder / det).mkdir()
        streams[det], paths[det] = [], []
        for k, (hk, wk) in enumerate(shapes):
            path = folder / det / ("highres_raw.tif" if k == 0 else f".level{k}.tif")
            stream = _PngStream(wk, hk, spec.bits)
            big = spec.bigtiff and k == 0
            body = _tiff_writer(stream, path, spec.tile, spec.compression, big, spec.dtype)

            def target(body=body, stream=stream) -> None:
                try:
                    body()
                except BaseException as exc:
                    errors.append(exc)
                    stream.abort()

            threads.append(threading.Thread(target=target, name=f"synth-{det}-{k}", daemon=True))
            streams[det].append(stream)
            paths[det].append(path)
    for th in threads:
        th.start()
    return streams, paths, threads
