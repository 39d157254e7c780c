"""Dense instance norm: InstanceNorm with windowed statistics, for seam-free region passes.

:func:`make_seamless` copies a model (sharing its parameters) with every
``nn.InstanceNorm2d`` replaced by :class:`DenseInstanceNorm2d`: statistics of ``N × N``
windows (``N`` = the tile at the input, ``N/s`` on an activation of stride ``s``) evaluated on
a lattice ``K`` times finer than the tile grid and interpolated per pixel, as affine maps
``y = a·x + b``. Every pixel is thus normalised by (nearly) the tile centred on it, the scale
the network was trained at. With ``K = 1`` this is KIN / Dense Normalization (Ho et al., ECCV
2022 / 2024: per-tile statistics interpolated between tile centres). ``K = 1`` still leaves a
tile-periodic trace (the bilinear maps have kinks at the tile centres and full slopes at the
tile edges: seam index 1.06–1.18 for a random U-Net on the H&E test crop); ``K = 8`` (the
default) removes the tile period altogether, and the residual lattice period ``N/8`` has a
seam index within ±1 % of 1.

The norm is written for the channels-last layout the engine runs in and is as fast as a
plain instance norm: cell statistics by streaming row sums over cache-sized slabs (a single
strided reduction, or ``F.instance_norm`` on NHWC, is 3× slower), maps interpolated one
lattice interval at a time. A norm that directly follows a convolution in an
``nn.Sequential`` normalises in place: on the CPU the largest overhead of a whole-region pass
over tiles is page-faulting fresh memory for its larger activations, so every avoided
allocation counts. How the region pass uses it: :mod:`napari_confocal_stain.inference.seamless`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SUBDIVISIONS = 8
"""Default lattice cells per tile (``K``) of the dense instance norm."""

SUB_BAND = 4
"""Input-pixel rows that share one row of a dense norm's interpolated maps."""


@dataclass(frozen=True)
class StatsGrid:
    """The normalisation-statistics grid of one forward pass, in input pixels.

    Attributes
    ----------
    shape
        ``(H, W)`` of the model input of this pass.
    tile
        Grid spacing ``N``.
    origin
        ``(oy, ox)``: position of a grid line relative to this input's top-left pixel.
    subdivisions
        ``K``: lattice cells per tile along each axis (see :class:`DenseInstanceNorm2d`).
    """

    shape: tuple[int, int]
    tile: int
    origin: tuple[float, float]
    subdivisions: int = SUBDIVISIONS


class _GridHolder:
    """Per-thread current grid, shared by all dense norms of one converted model."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def grid(self) -> StatsGrid | None:
        return getattr(self._local, "grid", None)

    @grid.setter
    def grid(self, value: StatsGrid | None) -> None:
        self._local.grid = value
        self._local.cache = {}

    @property
    def cache(self) -> dict:
        if not hasattr(self._local, "cache"):
            self._local.cache = {}
        return self._local.cache


class DenseInstanceNorm2d(nn.Module):
    """InstanceNorm2d with windowed statistics on a fine lattice, interpolated per pixel.

    The tile grid (spacing ``N`` at the input, ``N/s`` on an activation of stride ``s``) is
    cut into ``K × K`` cells. Each lattice point gets the mean and variance of the ``N × N``
    window of cells centred on it (``K`` even: points are cell corners; ``K`` odd: cell
    centres), shifted inward where it would leave the region, so a region no larger than a tile
    is normalised exactly like the plain instance norm of a single pass. Each pixel uses the
    affine maps ``a = γ/σ``, ``b = β − γμ/σ`` interpolated between the lattice points around it:
    exactly linear along the width, and along the height evaluated once per band of
    :data:`SUB_BAND` input rows (per band the maps move by band/cell of a cell-to-cell
    difference, 1/16 at N = 512, far below any visible step, and the band structure cuts the
    memory traffic of the maps by that factor).
    ``K = 1`` is KIN / Dense Normalization (per-tile statistics between tile centres); larger
    ``K`` removes the tile-periodic structure: with ``K = 8`` every pixel is normalised by
    (nearly) the tile centred on it.

    Cell statistics are sums and sums of squares (one fast pass); where a window is so uniform
    that float32 cancellation could move its variance by more than 0.1 %, the layer's cells are
    recomputed about their means. Cells are merged into windows in float64 where the device
    has it.

    Without a grid it is a plain instance norm (computed the same way, so it is fast on
    channels-last tensors too, where ``F.instance_norm`` is ~3× slower). Inference only: it
    runs without autograd.

    Parameters
    ----------
    norm
        The ``nn.InstanceNorm2d`` it replaces (its ``eps`` and, if affine, its ``weight`` and
        ``bias`` *tensors* are shared, not copied).
    holder
        Where :meth:`SeamlessModel.grid` puts the current grid.
    in_place
        Write the result into the input tensor (only where nothing else holds it; see
        :func:`make_seamless`).
    """

    def __init__(
        self, norm: nn.InstanceNorm2d, holder: _GridHolder, *, in_place: bool = False
    ) -> None:
        super().__init__()
        self.in_place = bool(in_place)
        self.eps = float(norm.eps)
        self.weight = norm.weight if norm.affine else None
        self.bias = norm.bias if norm.affine else None
        self._holder = holder

    def _lattice(self, h: int, w: int, dev: torch.device) -> tuple:
        grid = self._holder.grid
        assert grid is not None
        key = ("lattice", h, w, str(dev))
        cache = self._holder.cache
        if key not in cache:
            k = grid.subdivisions
            stride_y = grid.shape[0] / h
            band = max(1, int(SUB_BAND // stride_y))
            band = math.gcd(band, h)
            axes = []
            for length, full, org in ((h, grid.shape[0], grid.origin[0]),
                                      (w, grid.shape[1], grid.origin[1])):  # fmt: skip
                stride = full / length
                tile = grid.tile / stride
                cell = max(1, round(tile / k))
                span = max(1, round(tile / cell))  # window length in cells
                axes.append(lattice_axis(length, cell, org / stride, span))
            (ey, wy, cy), (ex, wx, cx) = axes
            fdt = torch.float32 if dev.type == "mps" else torch.float64
            rows = np.arange(h // band) * band + (band - 1) / 2.0
            cache[key] = {
                "edges": (ey, ex),
                "windows": (
                    torch.as_tensor(wy, dtype=fdt, device=dev),
                    torch.as_tensor(wx, dtype=fdt, device=dev),
                ),
                "uniform": bool((wy == wy[:1]).all()) and bool((wx == wx[:1]).all()),
                "intervals": _intervals(rows, cy, dev),
                "axt": torch.as_tensor(
                    _interp_rows(np.arange(w, dtype=np.float64), cx).T.copy(),
                    dtype=torch.float32,
                    device=dev,
                ),
                "band": band,
            }
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DenseInstanceNorm2d expects (B, C, H, W), got {tuple(x.shape)}")
        # Inference only (it writes into preallocated outputs); its small statistics matmuls
        # stay in float32/64 under autocast, only the normalised output takes x's dtype.
        with torch.no_grad(), _no_autocast(x.device):
            return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        b_, c_, h, w = x.shape
        nhwc = c_ > 1 and x.is_contiguous(memory_format=torch.channels_last)
        if self._holder.grid is None:  # plain instance norm (any memory layout)
            lat = _whole(h, w, x.device)
        else:
            lat = self._lattice(h, w, x.device)
        ey, ex = lat["edges"]
        py, px = lat["windows"]
        fdt = py.dtype
        n, s1, m2, sq = (t.to(fdt) for t in _cell_stats(x, ey, ex, exact=False, nhwc=nhwc))
        mu, var, nw = _window_stats(n, s1, m2, py, px)
        # Σx² − (Σx)²/n in float32 is off by ~1e-7·Σx² per cell; where that could move a
        # window's variance by more than 0.1 % (near-uniform windows: background), redo the
        # cells about their own means (one more pass, only for such layers).
        err = _F32_SUM_ERROR * _window_sum(sq, py, px) / nw
        if bool((err > 1e-3 * (var + self.eps)).any()):
            n, s1, m2, _ = (
                t.to(fdt) for t in _cell_stats(x, ey, ex, exact=True, nhwc=nhwc)
            )  # fmt: skip
            mu, var, nw = _window_stats(n, s1, m2, py, px)
        a = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            a = a * self.weight.to(fdt).view(1, -1, 1, 1)
        bb = -mu * a
        if self.bias is not None:
            bb = bb + self.bias.to(fdt).view(1, -1, 1, 1)
        if lat["uniform"]:  # every window is the whole region: plain instance norm
            a, bb = a[..., :1, :1].to(x.dtype), bb[..., :1, :1].to(x.dtype)
            out = x if self.in_place else torch.empty_like(x)  # keeps the memory layout
            return torch.addcmul(bb, x, a, out=out)
        band = lat["band"]
        # Interpolate along the width once per lattice row, then, per lattice interval, lerp
        # between its two rows for the sub-bands it spans and normalise them (maps stay small:
        # one interval of rows, recycled from the heap; one large op per interval).
        axt = lat["axt"]
        if nhwc:
            ra = (a.float() @ axt).permute(2, 0, 3, 1).contiguous()  # (points_y, B, w, C)
            rb = (bb.float() @ axt).permute(2, 0, 3, 1).contiguous()
            xv = x.permute(0, 2, 3, 1).reshape(b_, h // band, band, w, c_)
            out = xv if self.in_place else torch.empty_like(xv)
        else:
            ra = (a.float() @ axt).permute(2, 0, 1, 3).contiguous()  # (points_y, B, C, w)
            rb = (bb.float() @ axt).permute(2, 0, 1, 3).contiguous()
            xv = x.reshape(b_, c_, h // band, band, w)
            out = xv if self.in_place else torch.empty_like(xv)
        for i, r0, r1, t in lat["intervals"]:
            ma = torch.lerp(ra[i], ra[i + 1], t).to(x.dtype)  # (rows, B, …)
            mb = torch.lerp(rb[i], rb[i + 1], t).to(x.dtype)
            if nhwc:  # (rows, B, w, C) → (B, rows, 1, w, C)
                ma, mb = ma.permute(1, 0, 2, 3)[:, :, None], mb.permute(1, 0, 2, 3)[:, :, None]
                torch.addcmul(mb, xv[:, r0:r1], ma, out=out[:, r0:r1])
            else:  # (rows, B, C, w) → (B, C, rows, 1, w)
                ma, mb = (
                    ma.permute(1, 2, 0, 3)[:, :, :, None],
                    mb.permute(1, 2, 0, 3)[:, :, :, None],
                )
                torch.addcmul(mb, xv[:, :, r0:r1], ma, out=out[:, :, r0:r1])
        if nhwc:
            return out.view(b_, h, w, c_).permute(0, 3, 1, 2)
        return out.view(b_, c_, h, w)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, affine={self.weight is not None}"


def _no_autocast(dev: torch.device):
    """Disable autocast on ``dev`` (a no-op context where autocast does not exist)."""
    if torch.amp.is_autocast_available(dev.type):
        return torch.autocast(dev.type, enabled=False)
    return contextlib.nullcontext()


def _whole(h: int, w: int, dev: torch.device) -> dict:
    """The lattice of a plain instance norm: one cell, one window, the whole input."""
    fdt = torch.float32 if dev.type == "mps" else torch.float64
    one = torch.ones((1, 1), dtype=fdt, device=dev)
    return {
        "edges": (np.array([0, h]), np.array([0, w])),
        "windows": (one, one),
        "uniform": True,
    }


def _window_sum(t: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """``py @ t @ px.T`` over the last two axes, as two plain matrix products (not a bmm)."""
    b_, c_, ny, nx = t.shape
    t = (t.reshape(-1, nx) @ px.T).reshape(b_ * c_, ny, -1)  # rows: one mm
    t = py @ t.transpose(0, 1).reshape(ny, -1)  # columns: one mm
    return t.reshape(py.shape[0], b_, c_, -1).permute(1, 2, 0, 3)


def _intervals(
    rows: np.ndarray, centres: np.ndarray, dev: torch.device
) -> list[tuple[int, int, int, torch.Tensor]]:
    """Group map rows by the pair of lattice points they interpolate between.

    Returns ``(i, r0, r1, t)``: rows ``r0:r1`` lie between points ``i`` and ``i + 1`` with
    weights ``t`` (``(r1 − r0, 1, 1, 1)``) on point ``i + 1`` (clamped outside the points).
    """
    n = len(centres)
    if n == 1:
        return [(0, 0, len(rows), torch.zeros((len(rows), 1, 1, 1), device=dev))]
    i = np.clip(np.searchsorted(centres, rows, side="right") - 1, 0, n - 2)
    t = np.clip((rows - centres[i]) / (centres[i + 1] - centres[i]), 0.0, 1.0)
    out = []
    start = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or i[k] != i[start]:
            tt = torch.as_tensor(t[start:k], dtype=torch.float32, device=dev).view(-1, 1, 1, 1)
            out.append((int(i[start]), start, k, tt))
            start = k
    return out


def _interp_rows(p: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``(len(p), len(centres))`` piecewise-linear interpolation weights (clamped outside)."""
    n = len(centres)
    if n == 1:
        return np.ones((len(p), 1))
    eye = np.eye(n)
    return np.stack([np.interp(p, centres, eye[j]) for j in range(n)], axis=1)


def lattice_axis(
    length: int, cell: int, origin: float, span: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of a dense norm's lattice.

    Parameters
    ----------
    length
        Activation length.
    cell
        Cell size in activation pixels (cells are cut at ``origin + k·cell``; the first and last
        may be partial).
    origin
        A grid line, in activation pixels.
    span
        Window length in cells (``K`` at full tile scale).

    Returns
    -------
    edges
        Cell cut positions ``[0, …, length]``.
    windows
        ``(points, cells)`` 0/1 matrix: which cells each lattice point's window sums.
    centres
        Position of every lattice point in pixel-index coordinates.
    """
    first = round(origin) % cell
    edges = np.asarray([0, *[c for c in range(first, length, cell) if 0 < c < length], length])
    ncell = len(edges) - 1
    if span % 2 == 0:
        centres = edges.astype(np.float64) - 0.5  # points at cell corners
        lo = np.arange(len(edges)) - span // 2
    else:
        centres = (edges[:-1] + edges[1:]) / 2.0 - 0.5  # points at cell centres
        lo = np.arange(ncell) - span // 2
    start = np.clip(lo, 0, max(ncell - span, 0))
    windows = np.zeros((len(centres), ncell))
    for i, s in enumerate(start):
        windows[i, s : s + span] = 1.0
    return edges, windows, centres


def _pieces(edges: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Group cells of equal size: (first cell index, first pixel, n cells, cell size)."""
    sizes = np.diff(edges)
    out: list[tuple[int, int, int, int]] = []
    i = 0
    while i < len(sizes):
        j = i
        while j + 1 < len(sizes) and sizes[j + 1] == sizes[i]:
            j += 1
        out.append((i, int(edges[i]), j - i + 1, int(sizes[i])))
        i = j + 1
    return out


_SLAB_BYTES = 8 << 20
"""Largest temporary of squares while gathering cell statistics (cache-sized)."""

_F32_SUM_ERROR = 1e-6
"""Relative error bound of a float32 sum of squares over one cell (with margin)."""


def _window_stats(
    n: torch.Tensor, s1: torch.Tensor, m2: torch.Tensor, py: torch.Tensor, px: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and count of every lattice window from cell counts, sums and M2.

    Parallel-variance merge about a per-channel shift, so no large numbers cancel.
    """
    mean_c = s1 / n
    ref = s1.sum(dim=(-2, -1), keepdim=True) / n.sum()
    d = mean_c - ref
    nw = py @ n @ px.T
    mu = _window_sum(n * d, py, px) / nw
    var = (_window_sum(m2 + n * d * d, py, px) / nw - mu * mu).clamp_min(0.0)
    return mu + ref, var, nw


def _cell_stats(
    x: torch.Tensor, ey: np.ndarray, ex: np.ndarray, *, exact: bool, nhwc: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, sum, sum of squared deviations and sum of squares of every cell.

    Returns ``(n (ny, nx), Σx, M2, Σx²)`` with the last three ``(B, C, ny, nx)``, float32.
    The fast path reads each cell once: ``M2 = Σx² − (Σx)²/n``; ``exact=True`` takes a second
    pass about each cell's mean. Squares are formed in slabs of at most :data:`_SLAB_BYTES`
    so the temporary stays in cache (a whole-tensor ``x*x`` or a strided ``vector_norm``
    is 3–7× slower). ``nhwc`` reads a channels-last tensor in its own layout.
    """
    b_, c_ = x.shape[:2]
    ny, nx = len(ey) - 1, len(ex) - 1
    s1 = x.new_zeros((b_, c_, ny, nx), dtype=torch.float32)
    m2 = torch.zeros_like(s1)
    sq = torch.zeros_like(s1)
    count = torch.empty((ny, nx), dtype=torch.float32, device=x.device)
    xn = x.permute(0, 2, 3, 1) if nhwc else x  # (B, H, W, C) or (B, C, H, W)
    for iy, y0, my, sy in _pieces(ey):
        for ix, x0, mx, sx in _pieces(ex):
            n = float(sy * sx)
            count[iy : iy + my, ix : ix + mx] = n
            row_bytes = 4 * b_ * c_ * mx * sx
            slab = max(1, min(sy, _SLAB_BYTES // max(row_bytes, 1)))
            for j in range(my):
                top = y0 + j * sy
                acc1 = acc2 = dev2 = None
                mean = None
                for exact_pass in (False, True) if exact else (False,):
                    for r0 in range(0, sy, slab):
                        r1 = min(sy, r0 + slab)
                        # Sum the slab's rows first (a streaming add of contiguous rows),
                        # then the few columns of each cell: 3× faster than one reduction.
                        if nhwc:  # (B, rows, W', C) → (B, W', C) → (B, mx, C)
                            t = xn[:, top + r0 : top + r1, x0 : x0 + mx * sx].float()
                            rows_dim, split = 1, (b_, mx, sx, c_)
                            if exact_pass:
                                t = t - mean.repeat_interleave(sx, dim=1)[:, None]
                        else:  # (B, C, rows, W') → (B, C, W') → (B, C, mx)
                            t = xn[:, :, top + r0 : top + r1, x0 : x0 + mx * sx].float()
                            rows_dim, split = 2, (b_, c_, mx, sx)
                            if exact_pass:
                                t = t - mean.repeat_interleave(sx, dim=2)[:, :, None]
                        col = 2 if nhwc else 3
                        p2 = (t * t).sum(dim=rows_dim).view(split).sum(dim=col)
                        if exact_pass:
                            dev2 = p2 if dev2 is None else dev2 + p2
                            continue
                        p1 = t.sum(dim=rows_dim).view(split).sum(dim=col)
                        acc1 = p1 if acc1 is None else acc1 + p1
                        acc2 = p2 if acc2 is None else acc2 + p2
                    if not exact_pass:
                        assert acc1 is not None and acc2 is not None
                        mean = acc1 / n
                if dev2 is None:
                    dev2 = (acc2 - acc1 * acc1 / n).clamp_min_(0.0)
                if nhwc:  # (B, mx, C) → (B, C, mx)
                    acc1, acc2, dev2 = (v.permute(0, 2, 1) for v in (acc1, acc2, dev2))
                s1[:, :, iy + j, ix : ix + mx] = acc1
                sq[:, :, iy + j, ix : ix + mx] = acc2
                m2[:, :, iy + j, ix : ix + mx] = dev2
    return count, s1, m2, sq


def _replace(module: nn.Module, holder: _GridHolder) -> int:
    """Swap the instance norms of ``module`` in place; return how many were swapped.

    A norm that directly follows a convolution inside a plain ``nn.Sequential`` normalises in
    place: the convolution's output is referenced by nothing else (the Sequential passes it
    on and drops it), and writing into it saves one activation-sized allocation per norm
    (fresh pages are the single largest overhead of a whole-region pass on the CPU).
    """
    count = 0
    previous: nn.Module | None = None
    for name, child in module.named_children():
        if type(child) is nn.InstanceNorm2d and not child.track_running_stats:
            in_place = type(module) is nn.Sequential and type(previous) in (
                nn.Conv2d,
                nn.ConvTranspose2d,
            )
            setattr(module, name, DenseInstanceNorm2d(child, holder, in_place=in_place))
            count += 1
        else:
            count += _replace(child, holder)
        previous = child
    return count


class SeamlessModel(nn.Module):
    """A region-pass copy of a model (see the module docstring); build with :func:`make_seamless`.

    Attributes
    ----------
    inner
        The converted copy (shares every parameter and buffer tensor with the original).
    dense_norms
        How many instance norms were replaced (0: the model has none and tiles trivially).
    """

    def __init__(self, inner: nn.Module, holder: _GridHolder, dense_norms: int) -> None:
        super().__init__()
        self.inner = inner
        self._holder = holder
        self.dense_norms = dense_norms

    @contextmanager
    def grid(self, grid: StatsGrid | None) -> Iterator[None]:
        """Use ``grid`` for the statistics of forward passes inside the ``with`` block."""
        previous = self._holder.grid
        self._holder.grid = grid
        try:
            yield
        finally:
            self._holder.grid = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def make_seamless(model: nn.Module) -> SeamlessModel:
    """Copy ``model`` for the engine: every instance norm becomes a :class:`DenseInstanceNorm2d`.

    The copy shares the original's parameter and buffer tensors (no weights are duplicated,
    and later in-place updates of the original are seen); only module objects are new. Norms
    that directly follow a convolution in a plain ``nn.Sequential`` work in place (its output
    has no other reference there). Without a grid (:meth:`SeamlessModel.grid`) the copy
    computes exactly what the model does, up to float rounding.

    Parameters
    ----------
    model
        Any ``nn.Module``; instance norms with running statistics and subclasses of
        ``nn.InstanceNorm2d`` are left untouched.

    Returns
    -------
    SeamlessModel
    """
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    inner = copy.deepcopy(model, memo)
    holder = _GridHolder()
    count = _replace(inner, holder)
    return SeamlessModel(inner.eval(), holder, count)
