"""Coordinate-pure building blocks of the synthetic slide generator.

Everything here is a pure function of *global* pixel (or lattice) coordinates and the seed,
so a region of a slide comes out bit-identical whether it is generated alone or as part of
a larger region. Three kinds of randomness are used:

- integer hashing of coordinates (:func:`hash_u32`) for lattice values of value noise,
  per-fibre and per-nucleus attributes: no state, fully vectorised;
- per-block numpy generators (:func:`block_rng`) seeded from ``(seed, tag, block_y,
  block_x)`` through :class:`numpy.random.SeedSequence` spawn keys, for the dense per-pixel
  streams (speckle, sensor noise) where numpy's samplers are faster than hashing;
- order-independent compositing (maximum) when stamping nuclei, so the result at a pixel
  does not depend on which other nuclei happen to be in the batch.

Every elementwise operation is applied to each output element with the same operands
whatever the array extent, which is what makes the bit-exactness hold (no BLAS, no
reductions across pixels).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

#: Spacing (px) of the coarse lattice on which smooth fields are evaluated.
COARSE = 8
#: Side (px) of the blocks of the per-pixel random streams (speckle, sensor noise).
NOISE_BLOCK = 256

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_GOLD = np.uint32(0x9E3779B1)
_U24 = np.float32(1.0 / (1 << 24))


def _mix(h: np.ndarray) -> np.ndarray:
    """Chris Wellons' ``lowbias32`` finaliser, in place on a uint32 array."""
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(15)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def _word(k: int) -> int:
    """Fold a Python int (any size, any sign) into a well-mixed 32-bit word."""
    h = 0x2545F491
    k = int(k)
    sign = 1 if k < 0 else 0
    k = abs(k)
    while True:
        h = _mix(np.array([h ^ (k & 0xFFFFFFFF)], dtype=np.uint32))[0].item()
        k >>= 32
        if not k:
            break
    return _mix(np.array([h ^ sign], dtype=np.uint32))[0].item()


def hash_u32(seed: int, tag: int, *keys: np.ndarray | int) -> np.ndarray:
    """Hash integer coordinates to uniformly distributed uint32 values.

    Parameters
    ----------
    seed, tag
        Python ints selecting the random field (``tag`` separates independent fields).
    *keys
        Integer arrays (or ints), broadcast together; negative values are fine.

    Returns
    -------
    numpy.ndarray
        uint32 array of the broadcast shape (at least 1-D).
    """
    arrays = np.broadcast_arrays(*[np.atleast_1d(np.asarray(k)) for k in keys])
    h = np.full(arrays[0].shape, _word(seed) ^ _word(tag + 0x51ED27), dtype=np.uint32)
    for k in arrays:
        # Integer casts to uint32 wrap modulo 2**32 (negative keys included).
        k32 = k.view(np.uint32) if k.dtype in (np.int32, np.uint32) else k.astype(np.uint32)
        h ^= k32 * _GOLD
        _mix(h)
    return h


def unit(h: np.ndarray, shift: int = 0, bits: int = 24) -> np.ndarray:
    """Uniform float32 in [0, 1) from ``bits`` bits of a hash, starting at bit ``shift``."""
    v = (h >> np.uint32(shift)) & np.uint32((1 << bits) - 1)
    return v.astype(np.float32) * np.float32(1.0 / (1 << bits))


def fade(t: np.ndarray) -> np.ndarray:
    """Quintic smootherstep on [0, 1] (C2 value noise)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def smoothstep(x: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    """Cubic Hermite step from 0 at ``lo`` to 1 at ``hi`` (float32)."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def value_noise(seed: int, tag: int, ys: np.ndarray, xs: np.ndarray, scale: float) -> np.ndarray:
    """Value noise in [-1, 1] on the grid ``ys x xs`` (pixel coordinates), lattice ``scale`` px.

    Evaluated separably (lattice rows interpolated along x, then along y), which costs a few
    operations per output element and is still exact per element.
    """
    gy = np.asarray(ys, dtype=np.float64) / scale
    gx = np.asarray(xs, dtype=np.float64) / scale
    iy = np.floor(gy).astype(np.int64)
    ix = np.floor(gx).astype(np.int64)
    sy = fade(gy - iy).astype(np.float32)
    sx = fade(gx - ix).astype(np.float32)
    r0, c0 = int(iy.min()), int(ix.min())
    rows = np.arange(r0, int(iy.max()) + 2)
    cols = np.arange(c0, int(ix.max()) + 2)
    lat = unit(hash_u32(seed, tag, rows[:, None], cols[None, :])) * np.float32(2.0) - 1.0
    jx = ix - c0
    a = lat[:, jx] * (1.0 - sx) + lat[:, jx + 1] * sx
    jy = iy - r0
    return a[jy] * (1.0 - sy)[:, None] + a[jy + 1] * sy[:, None]


def fbm(
    seed: int,
    tag: int,
    ys: np.ndarray,
    xs: np.ndarray,
    octaves: list[tuple[float, float]],
) -> np.ndarray:
    """Sum of value-noise octaves given as ``(scale_px, amplitude)`` pairs (float32)."""
    out = np.zeros((len(ys), len(xs)), dtype=np.float32)
    for i, (scale, amp) in enumerate(octaves):
        out += np.float32(amp) * value_noise(seed, tag * 16 + i, ys, xs, scale)
    return out


def _lerp_axis(a: np.ndarray, axis: int, step: int, n0: int, start: int, stride: int, count: int):
    """Linear interpolation along ``axis`` from nodes (spacing ``step``) to an arithmetic grid.

    Output element ``k`` is at pixel ``start + stride * k``; node ``i`` of ``a`` sits at pixel
    ``(n0 + i) * step``. ``step`` must be a multiple of ``stride``: the outputs then fall into
    ``step // stride`` phases that share one weight each, so each phase is two strided slices
    and a blend (no gathers). Every output element is ``a[i] * (1 - f) + a[i + 1] * f`` with
    the same ``i`` and ``f`` wherever the grid starts, which keeps regions bit-identical.
    """
    if step % stride:
        raise ValueError("step must be a multiple of stride")
    ratio = step // stride
    axis = axis % a.ndim
    shape = list(a.shape)
    shape[axis] = count
    out = np.empty(shape, dtype=np.float32)
    pre = (slice(None),) * axis
    for r in range(min(ratio, count)):
        pix = start + stride * r
        i = pix // step - n0
        f = np.float32((pix % step) / step)
        n = len(range(r, count, ratio))
        if i < 0 or i + n >= a.shape[axis] + (f == 0):
            raise IndexError("lattice window does not cover the requested pixels")
        dst = (*pre, slice(r, None, ratio))
        lo = a[(*pre, slice(i, i + n))]
        if f == 0:
            out[dst] = lo
        else:
            hi = a[(*pre, slice(i + 1, i + 1 + n))]
            out[dst] = lo * (np.float32(1.0) - f) + hi * f
    return out


def upsample(
    nodes: np.ndarray,
    step: int,
    ny0: int,
    nx0: int,
    y0: int,
    x0: int,
    h: int,
    w: int,
    stride: int = 1,
) -> np.ndarray:
    """Bilinear interpolation of lattice values to a regular pixel grid.

    Parameters
    ----------
    nodes
        ``(..., ny, nx)`` values at lattice nodes; node ``(i, j)`` sits at pixel
        ``((ny0 + i) * step, (nx0 + j) * step)``.
    step
        Lattice spacing in pixels.
    ny0, nx0
        Global index of ``nodes[..., 0, 0]``.
    y0, x0, h, w, stride
        Output grid: pixels ``(y0 + stride * k, x0 + stride * l)``, ``k < h``, ``l < w``.

    Returns
    -------
    numpy.ndarray
        ``(..., h, w)`` float32.
    """
    nodes = np.asarray(nodes, dtype=np.float32)
    # Only the node rows the output needs, so the x pass stays small.
    r0 = y0 // step - ny0
    r1 = min((y0 + stride * (h - 1)) // step - ny0 + 2, nodes.shape[-2])
    if r0 < 0:
        raise IndexError("lattice window does not cover the requested pixels")
    a = _lerp_axis(nodes[..., r0:r1, :], -1, step, nx0, x0, stride, w)
    return _lerp_axis(a, -2, step, ny0 + r0, y0, stride, h)


def sample_nodes(
    nodes: np.ndarray, step: int, ny0: int, nx0: int, py: np.ndarray, px: np.ndarray
) -> np.ndarray:
    """Bilinear interpolation of lattice values at arbitrary points ``(py, px)`` (pixels)."""
    gy = np.asarray(py, dtype=np.float64) / step
    gx = np.asarray(px, dtype=np.float64) / step
    iy = np.floor(gy).astype(np.int64)
    ix = np.floor(gx).astype(np.int64)
    fy = (gy - iy).astype(np.float32)
    fx = (gx - ix).astype(np.float32)
    iy -= ny0
    ix -= nx0
    if len(iy) and (
        iy.min() < 0
        or ix.min() < 0
        or iy.max() + 1 >= nodes.shape[-2]
        or ix.max() + 1 >= nodes.shape[-1]
    ):
        raise IndexError("lattice window does not cover the requested points")
    top = nodes[..., iy, ix] * (1.0 - fx) + nodes[..., iy, ix + 1] * fx
    bot = nodes[..., iy + 1, ix] * (1.0 - fx) + nodes[..., iy + 1, ix + 1] * fx
    return top * (1.0 - fy) + bot * fy


def block_rng(seed: int, tag: int, by: int, bx: int) -> np.random.Generator:
    """An independent generator for block ``(by, bx)`` of stream ``tag``.

    Block indices are offset so that blocks at negative indices (never used for pixels inside
    the slide) could not collide with others.
    """
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(tag, by + (1 << 20), bx + (1 << 20)))
    return np.random.Generator(np.random.PCG64(ss))


def block_field(
    seed: int,
    tag: int,
    y0: int,
    x0: int,
    h: int,
    w: int,
    draw: Callable[[np.random.Generator, tuple[int, int]], np.ndarray],
    block: int = NOISE_BLOCK,
) -> np.ndarray:
    """Assemble a per-pixel random field from globally aligned blocks.

    Each ``block x block`` block is drawn whole from its own generator (``draw(rng, shape)``),
    then the part inside the region is kept, so the field is a pure function of the
    global pixel coordinates.
    """
    out = np.empty((h, w), dtype=np.float32)
    for by in range(y0 // block, (y0 + h - 1) // block + 1):
        for bx in range(x0 // block, (x0 + w - 1) // block + 1):
            vals = draw(block_rng(seed, tag, by, bx), (block, block))
            ya, yb = max(y0, by * block), min(y0 + h, (by + 1) * block)
            xa, xb = max(x0, bx * block), min(x0 + w, (bx + 1) * block)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = vals[
                ya - by * block : yb - by * block, xa - bx * block : xb - bx * block
            ]
    return out


def gamma_speckle(rng: np.random.Generator, shape: tuple[int, int], looks: float) -> np.ndarray:
    """Multiplicative speckle S ~ gamma(k=L, theta=1/L): mean 1, variance 1/L (float32).

    For integer ``L <= 16`` S is drawn as ``-log(U_1 ... U_L) / L``: each ``-log U_i`` is
    Exp(1) and a sum of L independent Exp(1) is exactly gamma(L, 1); the uniforms are
    built from 23 raw generator bits each (``U = 2 - [1, 2)``, so U is in (0, 1] and the log
    is finite), the same resolution as numpy's own float32 uniforms. About 15 ns
    per pixel for L = 5 against 24 ns for ``standard_gamma`` (the raw bits are cheaper than
    numpy's uniform or gamma samplers). Other ``L`` use ``standard_gamma`` (Marsaglia-Tsang),
    also exactly gamma.
    """
    n = shape[0] * shape[1]
    if float(looks).is_integer() and 1 <= looks <= 16:
        k = int(looks)
        raw = rng.bit_generator.random_raw((k * n + 1) // 2).view(np.uint32)[: k * n]
        raw >>= np.uint32(9)
        raw |= np.uint32(0x3F800000)  # exponent of 1.0: the 23 bits become a float in [1, 2)
        u = raw.view(np.float32).reshape(k, n)
        np.subtract(np.float32(2.0), u, out=u)
        s = np.multiply.reduce(u, axis=0) if k > 1 else u[0].copy()
        np.log(s, out=s)
        s *= np.float32(-1.0 / k)
        return s.reshape(shape)
    s = rng.standard_gamma(looks, size=shape, dtype=np.float32)
    s *= np.float32(1.0 / looks)
    return s


def sensor_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Approximately standard-normal noise (float32), cheaply.

    The sum of four independent byte-uniforms (Irwin-Hall of 4), centred and scaled to unit
    variance: bell-shaped, bounded at +-3.45 sigma, 3x faster than ``standard_normal`` here.
    Good enough for sensor noise, which only has to look right.
    """
    n = shape[0] * shape[1]
    r = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    m = np.uint32(0xFF)
    s = (r & m) + ((r >> np.uint32(8)) & m) + ((r >> np.uint32(16)) & m) + (r >> np.uint32(24))
    out = s.astype(np.float32)
    out -= np.float32(510.0)
    out *= np.float32(1.0 / math.sqrt(4 * (256**2 - 1) / 12))
    return out.reshape(shape)


def max_stamp(out: np.ndarray, oy: np.ndarray, ox: np.ndarray, values: np.ndarray) -> None:
    """``out[patch] = max(out[patch], values)`` for many square stamps, order-free.

    Parameters
    ----------
    out
        2-D float32 canvas (modified in place).
    oy, ox
        ``(n,)`` canvas coordinates of each stamp's top-left corner (may lie outside).
    values
        ``(n, q, q)`` stamp values; elements <= 0 or falling outside the canvas are skipped.

    Notes
    -----
    ``numpy.maximum.at`` does this but is slow (~16 ns per element here). Instead stamps are
    split into groups whose boxes cannot overlap (cells of the box size, alternate cells,
    one stamp per cell per group) and each group is applied with plain fancy indexing. Since
    maximum is exact and commutative, the result does not depend on grouping or order.
    """
    n, q, _ = values.shape
    if n == 0:
        return
    h, w = out.shape
    cy = oy // q
    cx = ox // q
    cell = (cy - cy.min()) * (int(cx.max() - cx.min()) + 1) + (cx - cx.min())
    order = np.argsort(cell, kind="stable")
    sc = cell[order]
    first = np.r_[0, np.flatnonzero(np.diff(sc)) + 1]
    rank = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
    group = np.empty(n, dtype=np.int64)
    group[order] = rank * 4 + (cy[order] & 1) * 2 + (cx[order] & 1)
    off = np.arange(q)
    flat = out.reshape(-1)
    gorder = np.argsort(group, kind="stable")
    gs = group[gorder]
    bounds = np.r_[0, np.flatnonzero(np.diff(gs)) + 1, n]
    for a, b in itertools.pairwise(bounds):
        sel = gorder[a:b]
        py = oy[sel, None, None] + off[None, :, None]
        px = ox[sel, None, None] + off[None, None, :]
        vals = values[sel]
        m = (vals > 0) & (py >= 0) & (py < h) & (px >= 0) & (px < w)
        idx = (py * w + px)[m]
        flat[idx] = np.maximum(flat[idx], vals[m])
