"""The export's tasks: module functions of a picklable :class:`Job`, run on threads or dask.

* :func:`task_chunk` — linear stain or despeckled R of one level-0 chunk (exact per chunk:
  the pipeline reads the context it needs), written with its 2×2 mean into level 1.
* :func:`task_piece` — GAN stain of one chunk grown by the context, kept as a *piece*.
* :func:`task_compose` — a chunk cross-faded from its 3×3 neighbours' pieces, written.
* :func:`task_reduce` — one storage chunk of level ≥ 2: the 2×2 mean of the level above.

A task writes whole storage chunks only (see :mod:`~napari_confocal_stain.export.plan`),
so tasks never share a read-modify-write, and returns its chunk's index; the driver
(:mod:`~napari_confocal_stain.export.driver`) records what finished.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_confocal_stain._fs import write_atomic
from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings, to_uint8
from napari_confocal_stain.export import store
from napari_confocal_stain.export.distributed import on_worker_setup
from napari_confocal_stain.export.plan import Box, ExportPlan

__all__ = [
    "PRODUCTS",
    "TASK_LOG_ENV",
    "Job",
    "reduce_chunk",
    "task_chunk",
    "task_compose",
    "task_piece",
    "task_reduce",
    "write_chunk0",
]

PRODUCTS = ("gan", "linear", "despeckled-r")
"""What an export makes: the GAN stain, the linear stain (both RGB), the despeckled R (grey)."""

TASK_LOG_ENV = "NAPARI_CONFOCAL_STAIN_EXPORT_LOG"
"""If set, every task appends ``"<kind> <level> <i> <j>"`` to this file when it starts: how
the benchmark counts chunks recomputed after a ``kill -9`` (started in both runs)."""


@dataclass(frozen=True)
class Job:
    """One export's parameters as a task sees them (picklable; sent to dask workers)."""

    mosaic: Any
    settings: StainSettings
    product: str
    plan: ExportPlan
    work: str
    context: int
    token: str

    @property
    def image(self) -> str:
        """The pyramid store being filled."""
        return os.path.join(self.work, "image.zarr")

    @property
    def channels(self) -> int:
        """3 for a stain (RGB), 1 for the despeckled R (grey)."""
        return 1 if self.product == "despeckled-r" else 3

    def piece_path(self, ij: tuple[int, int]) -> str:
        """Where chunk ``ij``'s GAN piece is kept until its neighbours are composed."""
        return os.path.join(self.work, "pieces", f"{ij[0]}_{ij[1]}.npy")


_PIPELINES: dict[str, StainPipeline] = {}


def _log_start(kind: str, level: int, ij: tuple[int, int]) -> None:
    path = os.environ.get(TASK_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{kind} {level} {ij[0]} {ij[1]}\n".encode())
        finally:
            os.close(fd)


def _pipeline(job: Job) -> StainPipeline:
    """The job's pipeline, built once per process (models load once per process too)."""
    pipe = _PIPELINES.get(job.token)
    if pipe is None:
        pipe = StainPipeline(job.mosaic, job.settings)
        _PIPELINES.clear()  # one export at a time per process: drop the previous slide's
        _PIPELINES[job.token] = pipe
    return pipe


def write_chunk0(image_path: str, plan: ExportPlan, box: Box, image: np.ndarray) -> None:
    """Write a level-0 chunk of a pyramid store and its 2×2 mean (one level-1 chunk)."""
    store.write_block(image_path, 0, box, image)
    if len(plan.levels) > 1:
        y0, y1, x0, x1 = box
        h1, w1 = plan.levels[1]
        b1 = (y0 // 2, min(h1, y1 // 2), x0 // 2, min(w1, x1 // 2))
        small = store.downsample2(image)[:, : b1[1] - b1[0], : b1[3] - b1[2]]
        if small.size:
            store.write_block(image_path, 1, b1, small)


def reduce_chunk(image_path: str, plan: ExportPlan, level: int, ij: tuple[int, int]) -> None:
    """One storage chunk of level ``level`` (≥ 2): the 2×2 mean of the level above."""
    y0, y1, x0, x1 = plan.chunks(level)[ij]
    src = store.open_level(image_path, level - 1)
    block = src.read((2 * y0, 2 * y1, 2 * x0, 2 * x1))
    small = store.downsample2(block)[:, : y1 - y0, : x1 - x0]
    store.write_block(image_path, level, (y0, y1, x0, x1), small)


def task_chunk(job: Job, ij: tuple[int, int]) -> tuple[int, int]:
    """Linear stain or despeckled R of one level-0 chunk, written (exact per chunk)."""
    on_worker_setup()
    _log_start("chunk", 0, ij)
    pipe = _pipeline(job)
    box = job.plan.chunks(0)[ij]
    sbox = job.plan.slide_box(box)
    if job.product == "despeckled-r":
        img = pipe.reflectance(0, sbox, despeckled=True)[None]
    else:
        img = np.moveaxis(pipe.linear(0, sbox), -1, 0)
    write_chunk0(job.image, job.plan, box, to_uint8(img))
    return ij


def task_piece(job: Job, ij: tuple[int, int], cancel: Callable[[], bool] | None = None) -> Any:
    """GAN stain of one chunk grown by the context, saved as a piece (atomically)."""
    on_worker_setup()
    _log_start("piece", 0, ij)
    pipe = _pipeline(job)
    sbox = job.plan.slide_box(job.plan.chunks(0)[ij])
    piece = pipe.gan(0, sbox, context=job.context, cancel=cancel)
    flat = piece.reshape(-1, piece.shape[-1])
    if np.all(flat == flat[0]):
        # Tissue-free: the engine filled it with one colour; keep just that colour.
        piece = flat[:1].reshape(1, 1, -1)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(piece, dtype=np.float32))
    write_atomic(job.piece_path(ij), buf.getvalue())
    return ij


def _load_piece(job: Job, ij: tuple[int, int], grown: Box) -> np.ndarray:
    piece = np.load(job.piece_path(ij))
    shape = (grown[1] - grown[0], grown[3] - grown[2], piece.shape[-1])
    return np.broadcast_to(piece, shape) if piece.shape[:2] == (1, 1) else piece


def task_compose(job: Job, ij: tuple[int, int]) -> tuple[int, int]:
    """Cross-fade a chunk's piece with its neighbours' and write the chunk."""
    from napari_confocal_stain.engine.blend import compose

    on_worker_setup()
    _log_start("compose", 0, ij)
    pipe = _pipeline(job)
    box = job.plan.chunks(0)[ij]
    pieces = []
    for n in job.plan.neighbours(ij):  # fixed order: the float sum is reproducible
        grown = pipe.grown(0, job.plan.slide_box(job.plan.chunks(0)[n]), job.context)
        pieces.append((grown, _load_piece(job, n, grown)))
    out = compose(job.plan.slide_box(box), pieces, pipe.level_shapes[0], job.context)
    write_chunk0(job.image, job.plan, box, to_uint8(np.moveaxis(out, -1, 0)))
    return ij


def task_reduce(job: Job, level: int, ij: tuple[int, int]) -> tuple[int, int]:
    """One storage chunk of level ``level`` (≥ 2) of the job's pyramid."""
    on_worker_setup()
    _log_start("reduce", level, ij)
    reduce_chunk(job.image, job.plan, level, ij)
    return ij
