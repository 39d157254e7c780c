"""The ``seamless`` strategy: one layer-synchronous pass with windowed normalisation statistics.

Why tiles show seams
    A generator with InstanceNorm normalises every feature map by the mean and variance of the
    whole input. Run tile by tile, each tile is normalised by its *own* statistics, so the same
    tissue gets a different colour on either side of a tile boundary; the convolutions also see
    padding instead of neighbours at every tile edge (thesis §3.4, Fig. 3.5). The overlap
    strategies hide this by running the model 4–16 times per pixel.

What this module does instead (model-agnostic)
    1. **Dense instance norm.** A copy of the model that *shares the original's parameters* gets
       every ``nn.InstanceNorm2d`` (without running statistics) replaced by
       :class:`DenseInstanceNorm2d`: statistics of ``N × N`` windows (``N`` = the tile at the
       input, ``N/s`` on an activation of stride ``s``) evaluated on a lattice ``K`` times finer
       than the tile grid and interpolated per pixel, as affine maps ``y = a·x + b``. Every
       pixel is thus normalised by (nearly) the tile centred on it, the scale the network was
       trained at. With ``K = 1`` this is KIN / Dense Normalization (Ho et al., ECCV 2022 /
       2024: per-tile statistics interpolated between tile centres). We measured that ``K = 1``
       still leaves a tile-periodic trace: the bilinear maps have kinks at the tile centres and
       full slopes at the tile edges, and the seam index of a random U-Net on the H&E test crop
       was 1.06–1.18. ``K = 8`` (the default) removes the tile period altogether; the residual
       lattice period ``N/8`` has a seam index within ±1 % of 1.
    2. **Layer-synchronous region pass.** The whole (padded) region goes through the network as
       *one* forward pass: every norm layer sees the activations of the whole region before the
       next layer runs, and convolutions see real neighbours instead of padding at tile edges.
       Unlike KIN (a statistics pass, then a normalisation pass: about 2× the work), this is
       1× the model's work.
    3. **Costs kept at the tile level.** The engine runs this copy channels-last (NHWC), where
       oneDNN's convolutions and transposed convolutions are faster, for *every* strategy, so
       ``independent`` gets the same speed-up and the comparison stays fair. The dense norm is
       written for that layout and is as fast as a plain instance norm: cell statistics by
       streaming row sums over cache-sized slabs (a single strided reduction, or
       ``F.instance_norm`` on NHWC, is 3× slower), maps interpolated one lattice interval at
       a time. A norm that directly follows a convolution in an ``nn.Sequential`` normalises
       in place; on the CPU the largest remaining overhead of a whole-region pass over tiles
       is page-faulting fresh memory for its larger activations, so every avoided allocation
       counts. Measured on the 2-core benchmark machine, 2048² U-Net base 64 (bench/tiling.py):
       the whole-region pass takes 1.05–1.15× the wall time of 16 independent 512² tiles.
    4. **Blocks for memory.** Regions larger than the memory budget are split into blocks cut
       on the tile grid, each read with a context ``margin`` and cross-faded linearly with its
       neighbour over ``margin`` pixels. Work is ``(core + 2·margin) / core`` per split axis,
       so blocks are as large as the budget allows (full-width bands first).

With one block the result is exactly the model with dense instance norm on the reflect-padded
region, and if the region is no larger than a tile it is the original model's single pass.
The output depends on the tile grid only through the fine lattice (anchored at ``origin``), so
regions computed separately on a shared lattice differ only through what each saw as context
near its borders; callers stitching regions should give them context (a tile is ample: the
influence of far context decays) and cross-fade, as :func:`plan_blocks` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from napari_confocal_stain.core.tiling import crossfade_blocks, pad_reflect, round_up
from napari_confocal_stain.inference.background import (
    all_tiles_background,
    background_response,
    fill_background_cells,
)
from napari_confocal_stain.inference.dense_norm import (
    SUBDIVISIONS,
    SeamlessModel,
    StatsGrid,
)
from napari_confocal_stain.inference.device import available_bytes
from napari_confocal_stain.inference.executor import (
    DeviceOutOfMemory,
    RegionRun,
    bytes_per_pixel,
)

__all__ = ["Block", "default_margin", "plan_blocks", "run_region", "stain_seamless"]


@dataclass(frozen=True)
class Block:
    """One block of a region pass: input rows/cols and the output cross-fade weights."""

    y0: int
    y1: int
    x0: int
    x1: int
    wy: np.ndarray
    wx: np.ndarray

    @property
    def pixels(self) -> int:
        """Model input pixels of the block."""
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def plan_blocks(
    shape: tuple[int, int],
    tile: int,
    origin: tuple[int, int],
    *,
    max_pixels: float,
    margin: int,
    multiple: int,
) -> list[Block]:
    """Split a padded region into cross-faded blocks of at most ``max_pixels`` input pixels.

    One block if the region fits; else full-width bands of as many tiles as fit; else square
    blocks. Cuts lie at statistics-tile centres (``origin + N/2 + k·N``).

    Parameters
    ----------
    shape
        Padded region ``(H, W)``, multiples of ``multiple``.
    tile
        Statistics tile ``N``.
    origin
        A statistics-grid line, in region pixels.
    max_pixels
        Memory budget in model input pixels per block.
    margin
        Context each side of a cut (a multiple of ``multiple``); also the cross-fade width.
    multiple
        The model's size multiple.

    Returns
    -------
    list of Block
    """
    h, w = shape
    if h * w <= max_pixels:
        return [Block(0, h, 0, w, np.ones(h), np.ones(w))]
    cy, cx = origin
    core = (int(max_pixels // w) - 2 * margin) // tile * tile
    if core >= tile:
        rows = crossfade_blocks(h, core, margin, cy, multiple)
        cols = [(0, w, np.ones(w))]
    else:
        core = max(tile, (int(math.sqrt(max_pixels)) - 2 * margin) // tile * tile)
        rows = crossfade_blocks(h, core, margin, cy, multiple)
        cols = crossfade_blocks(w, core, margin, cx, multiple)
    return [Block(y0, y1, x0, x1, wy, wx) for y0, y1, wy in rows for x0, x1, wx in cols]


def run_region(
    x: torch.Tensor,
    model: SeamlessModel,
    tile: int,
    origin: tuple[int, int],
    blocks: list[Block],
    *,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    on_block: Callable[[int], None] | None = None,
    subdivisions: int = SUBDIVISIONS,
) -> torch.Tensor:
    """Run the blocks of a region pass and cross-fade them into one output.

    Parameters
    ----------
    x
        ``(1, C, H, W)`` padded region, already on the model's device and scaled for the model.
    model
        From :func:`make_seamless`.
    tile, origin
        Statistics grid in region pixels.
    blocks
        From :func:`plan_blocks`.
    forward
        ``forward(model, tensor) -> tensor``; the engine's device runner (autocast, OOM seam).
    on_block
        Called with the block index after each block (progress, cancellation).

    Returns
    -------
    torch.Tensor
        ``(1, C_out, H, W)`` float32 on the CPU.
    """
    h, w = x.shape[-2:]
    if len(blocks) == 1:
        (blk,) = blocks
        grid = StatsGrid((h, w), tile, (float(origin[0]), float(origin[1])), subdivisions)
        with model.grid(grid):
            out = forward(model, x).float().cpu()
        if on_block is not None:
            on_block(0)
        return out
    canvas: torch.Tensor | None = None
    for k, blk in enumerate(blocks):
        part = x[:, :, blk.y0 : blk.y1, blk.x0 : blk.x1]
        grid = StatsGrid(
            (blk.y1 - blk.y0, blk.x1 - blk.x0),
            tile,
            (float(origin[0] - blk.y0), float(origin[1] - blk.x0)),
            subdivisions,
        )
        with model.grid(grid):
            y = forward(model, part).float().cpu()
        if canvas is None:
            canvas = torch.zeros((1, y.shape[1], h, w))
        wgt = torch.as_tensor(np.outer(blk.wy, blk.wx), dtype=torch.float32)
        canvas[:, :, blk.y0 : blk.y1, blk.x0 : blk.x1] += y * wgt
        if on_block is not None:
            on_block(k)
    assert canvas is not None
    return canvas


def default_margin(tile: int, multiple: int) -> int:
    """Context each side of a block cut: a quarter tile, at least 4 size multiples."""
    return round_up(max(tile // 4, 4 * multiple), multiple)


def stain_seamless(
    run: RegionRun, max_block_pixels: float | None = None, subdivisions: int = SUBDIVISIONS
) -> np.ndarray:
    """Stain ``run.image`` in one layer-synchronous pass (or cross-faded blocks of one).

    Parameters
    ----------
    run
        The region, model, executor and callbacks.
    max_block_pixels
        Largest block in model input pixels (default: from free memory). Out of memory
        halves it and starts again; at one tile per block the run moves to the CPU.
    subdivisions
        Lattice cells per tile (``K``; 1 = KIN-style per-tile statistics).

    Returns
    -------
    numpy.ndarray
        ``(H, W, C')`` float32 in [0, 1]; ``run.info`` gets ``model_pixels``, ``windows``,
        ``skipped``, ``blocks`` and ``margin``.
    """
    tile, mult, mins = run.tile, run.multiple, run.min_size
    if tile < mins or tile % mult:
        raise ValueError(
            f"tile {tile} must be a multiple of the model's size multiple {mult} and ≥ {mins}"
        )
    h, w = run.image.shape[:2]
    hp, wp = max(round_up(h, mult), mins), max(round_up(w, mult), mins)
    padded = pad_reflect(run.image, ((0, hp - h), (0, wp - w)))
    margin = default_margin(tile, mult)
    while True:
        budget = max_block_pixels
        if budget is None:
            budget = available_bytes(run.executor.device) / bytes_per_pixel(run.model)
        blocks = plan_blocks(
            (hp, wp), tile, run.origin, max_pixels=budget, margin=margin, multiple=mult
        )
        try:
            out_img, model_pixels, skipped = _seamless_blocks(run, padded, blocks, subdivisions)
            break
        except DeviceOutOfMemory as exc:
            # Halve the block area and start again (blocks are cheap to re-plan); at one tile
            # per block there is nothing left to shrink.
            smallest = (tile + 2 * margin) ** 2
            if min(b.pixels for b in blocks) <= smallest:
                run.executor.fall_back(str(exc))
                max_block_pixels = None
            else:
                max_block_pixels = max(smallest, max(b.pixels for b in blocks) / 2)
    run.info.update(model_pixels=model_pixels, windows=len(blocks), skipped=skipped,
                    blocks=len(blocks), margin=margin)  # fmt: skip
    return out_img[:h, :w]


def _seamless_blocks(
    run: RegionRun, padded: np.ndarray, blocks: list[Block], subdivisions: int
) -> tuple[np.ndarray, int, int]:
    """Run (or fill) every block; the image in [0, 1], model pixels run, blocks skipped."""
    model, execu, tile, origin = run.model, run.executor, run.tile, run.origin
    net = execu.model("engine")
    assert isinstance(net, SeamlessModel)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None].mul_(2.0).sub_(1.0)
    hp, wp = padded.shape[:2]
    todo, skipped = [], []
    for blk in blocks:
        part = padded[blk.y0 : blk.y1, blk.x0 : blk.x1]
        if run.skip_background and all_tiles_background(part, tile, origin, (blk.y0, blk.x0)):
            skipped.append(blk)
        else:
            todo.append(blk)
    total = len(blocks)
    state = {"done": 0}

    def on_block(_k: int) -> None:
        state["done"] += 1
        run.report(state["done"], total)

    result: torch.Tensor | None = None
    if todo:

        def forward(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
            run.check_cancel()  # before every block
            return execu.forward(m, t)

        result = run_region(x, net, tile, origin, todo, forward=forward, on_block=on_block,
                            subdivisions=subdivisions)  # fmt: skip
    if skipped:
        fill = background_response(model, (tile, tile), kind="constant", execu=execu)
        if result is None:
            result = torch.zeros((1, len(fill), hp, wp))
        fill_t = torch.as_tensor(fill * 2.0 - 1.0).view(1, -1, 1, 1)
        for blk in skipped:
            wgt = torch.as_tensor(np.outer(blk.wy, blk.wx), dtype=torch.float32)
            if len(blocks) == 1:
                result[...] = fill_t
            else:
                result[:, :, blk.y0 : blk.y1, blk.x0 : blk.x1] += wgt * fill_t
            on_block(0)
    assert result is not None
    out = ((result[0] + 1.0) / 2.0).clamp_(0.0, 1.0).permute(1, 2, 0).numpy()
    if run.skip_background and todo and net.dense_norms:
        # Only normalising models amplify a tissue-free cell's faint noise into texture; a
        # norm-free model's computed glass is already what it draws there, and filling it
        # with the constant would put a step at every cell edge between glass and tissue.
        fill_background_cells(padded, out, model, execu, tile, origin)
    return out, sum(b.pixels for b in todo), len(skipped)
