"""Resumable whole-slide export: :func:`export_slide`, :func:`export_array` and the run loop.

How a run goes (``OUT`` is ``x.ome.zarr`` or ``x.ome.tif``):

1. A work folder ``.OUT.partial`` is made next to ``OUT`` (never in the slide's folder) with
   ``manifest.json`` (slide identity, product, settings, geometry) and an empty OME-Zarr
   pyramid ``image.zarr`` (:mod:`~napari_confocal_stain.export.workdir`,
   :mod:`~napari_confocal_stain.export.store`).
2. **Level 0** is computed chunk by chunk (``tile``² px) by tasks
   (:mod:`~napari_confocal_stain.export.tasks`) on threads or a dask cluster. A task writes
   its chunk *and* that chunk's 2×2 mean into level 1 (exactly one storage chunk); when it
   returns the driver flags the chunk done, at once as a *fresh* flag trusted on the same
   boot, and as a *durable* flag after the next ``syncfs`` (see :meth:`_Driver.flush`).
   Linear stain and despeckled R are exact per chunk (the pipeline reads the context they
   need). The GAN stain of a chunk is computed on the chunk grown by ``context`` px and
   kept as a *piece* in ``pieces/``; a chunk is *composed* (cross-faded with its
   neighbours' pieces by :func:`~napari_confocal_stain.engine.blend.compose`, exactly as
   the viewer composes tiles) once all its neighbours' pieces exist, and a piece is deleted
   once every chunk it overlaps is durably composed (so scratch space stays about two chunk
   rows). A piece is a pure function of its box and the settings, and compose sums pieces
   in a fixed order, so the result does not depend on the order of work or on
   interruptions.
3. **Levels 2…** are 2×2 means of the level above, one storage chunk per task.
4. The NGFF metadata is written (the image's completion mark); then an ``.ome.zarr`` is
   renamed into place, or an ``.ome.tif`` is assembled from the pyramid's chunk files
   (already encoded TIFF tiles for deflate) in a temporary file next to ``OUT`` and
   renamed; the work folder is removed last.

An interrupted run (Ctrl-C, ``kill -9``, power loss) or one that ran out of disk space
leaves the work folder; ``resume=True`` checks its manifest against the request, skips
every chunk with a done flag (or, for the GAN, an existing piece) and recomputes only
chunks that were in flight: at most one per worker. Tissue-free chunks cost little: the
GAN engine skips tissue-free blocks (the model does not run), and all-white storage chunks
are not written at all (they read as the arrays' fill value, white).

A run that fails for any other reason (a bad slide, NaN found mid-export, a corrupt chunk, a
bad checkpoint, a refused write) removes its work folder, and any folder it made for the
output, so nothing is left behind: resuming could not make such an export succeed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_confocal_stain.engine.pipeline import StainSettings
from napari_confocal_stain.errors import ConfocalStainError, MosaicError, UsageError
from napari_confocal_stain.export import store
from napari_confocal_stain.export.distributed import open_pool
from napari_confocal_stain.export.plan import Box, ExportPlan, parse_region
from napari_confocal_stain.export.tasks import (
    PRODUCTS,
    Job,
    reduce_chunk,
    task_chunk,
    task_compose,
    task_piece,
    task_reduce,
    write_chunk0,
)
from napari_confocal_stain.export.workdir import (
    ExportCancelled,
    ExportRequest,
    Target,
    check_not_in_input,
    check_output,
    failed,
    finalize,
    is_finished,
    missing_folders,
    prepare,
    remove_work,
)

__all__ = ["DEFAULT_TILE", "default_context", "export_array", "export_slide"]

FLUSH_SECONDS = 2.0
"""Finished chunks are synced to disk and flagged done in batches at most this far apart."""

DEFAULT_TILE = 1024
"""Default chunk side: a 1024² linear chunk is ~30 MB of float work; a GAN chunk grown by
its context is a ~1.6 Mpx seamless pass (~2 GB of activations on the CPU)."""


def default_context(settings: StainSettings) -> int:
    """GAN context per side: a quarter statistics tile, the engine's own block margin.

    ``stain_region`` cuts blocks with this margin when a region exceeds its memory budget,
    so chunking an export this way costs the same per cut as the engine's own blocking.
    """
    return max(32, int(settings.tile) // 4)


def export_slide(
    mosaic_or_path: Any,
    out: str | os.PathLike,
    *,
    settings: StainSettings | None = None,
    product: str = "gan",
    region: str | Box | None = None,
    tile: int = DEFAULT_TILE,
    context: int | None = None,
    compression: str = "deflate",
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
) -> Path:
    """Export a slide's (or region's) stain or despeckled R as a pyramidal OME-Zarr or OME-TIFF.

    Parameters
    ----------
    mosaic_or_path
        An opened :class:`~napari_confocal_stain.io.mosaic.ConfocalMosaic` or a slide path
        (opened with :func:`~napari_confocal_stain.io.readers.open_mosaic`'s defaults).
    out
        ``*.ome.zarr`` or ``*.ome.tif``; must not exist unless ``overwrite``.
    settings
        Stain parameters (default :class:`StainSettings()`); ``precision="auto"`` is pinned
        to what this machine resolves it to and recorded for resumption.
    product
        ``"gan"`` (the GAN stain, RGB), ``"linear"`` (the linear stain, RGB) or
        ``"despeckled-r"`` (the despeckled reflectance, grey; uses ``settings.despeckle``,
        the bundled despeckler if none is set).
    region
        ``"y0:y1,x0:x1"`` or a ``(y0, y1, x0, x1)`` box of level 0; ``None`` = whole slide.
    tile
        Chunk side in px (multiple of 64): the unit of work, resumption and progress;
        storage chunks and TIFF tiles are ``tile // 2``.
    context
        GAN context per chunk side (default :func:`default_context`), ≤ ``tile // 2``.
    compression
        OME-TIFF codec: ``"deflate"`` (lossless, default), ``"jpeg"``, ``"lzw"``, ``"none"``.
    resume, overwrite
        Continue an interrupted export of the same request; replace an existing ``out``
        (only once the new one is complete) or discard an interrupted export's work folder.
    progress
        ``progress(done, total)`` in output pixels (all levels) after each chunk.
    cancel
        Polled between chunks (and between GAN blocks on threads); True stops cleanly,
        keeping the work folder: raises :class:`ExportCancelled`.
    scheduler, workers
        ``None`` (local threads), ``"local"`` (a LocalCluster), a scheduler address, or a
        ``distributed.Client``; threads or LocalCluster processes (default: 2 for
        linear/despeckled R, 1 for the GAN, whose torch pass uses every core already).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ValueError
        An unknown ``product`` or ``compression``.
    MosaicError
        Bad slide, bad output name, output exists, output inside the input, mismatching
        partial export.
    ExportCancelled
        ``cancel()`` returned True, or the run was interrupted (KeyboardInterrupt).
    """
    request = _request(
        mosaic_or_path, Target(Path(out), compression), settings=settings, product=product,
        region=region, tile=tile, context=context,
    )  # fmt: skip
    return _export(
        request, resume=resume, overwrite=overwrite, progress=progress, cancel=cancel,
        scheduler=scheduler, workers=workers,
    )  # fmt: skip


def _export(
    request: ExportRequest,
    *,
    resume: bool,
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
    cancel: Callable[[], bool] | None,
    scheduler: Any,
    workers: int | None,
) -> Path:
    """Run a checked request (see :func:`export_slide`); a failure leaves what it should."""
    target = request.target
    check_not_in_input(target.out, request.mosaic)
    if resume and is_finished(target):
        shutil.rmtree(target.work, ignore_errors=True)
        return target.out
    _clear_the_way(target, resume, overwrite)
    # The models before anything is written: a bad checkpoint leaves nothing behind.
    _check_models(request.settings, request.product)
    made = missing_folders(target.out.parent)
    # A resume refused (other options, say) must not remove the export it refused.
    remove = not target.work.exists()
    # The pool first: a cluster that cannot be reached must not leave a work folder behind.
    # The GAN and the despeckling net run torch on every core already: one task at a time.
    one_task = request.product == "gan" or request.settings.despeckle is not None
    pool = open_pool(scheduler, workers, 1 if one_task else 2)
    try:
        try:
            job = prepare(request, resume)
            remove = True
            _Driver(job, pool, progress, cancel if scheduler is None else None, cancel).run()
        finally:
            pool.close()
        return _complete(job, request)
    except BaseException as exc:
        err = failed(exc, target.out, made, remove=remove)
        if err is exc:
            raise
        raise err from exc


def _request(
    mosaic_or_path: Any,
    target: Target,
    *,
    settings: StainSettings | None,
    product: str,
    region: str | Box | None,
    tile: int,
    context: int | None,
) -> ExportRequest:
    """Check :func:`export_slide`'s arguments and open the slide (nothing is written).

    ``target`` is made first: a bad output name is the first thing refused.
    """
    from napari_confocal_stain.engine.pipeline import default_despeckle_settings
    from napari_confocal_stain.export.ometiff import TIFF_COMPRESSIONS
    from napari_confocal_stain.io.readers import open_mosaic

    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    if target.compression not in TIFF_COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(TIFF_COMPRESSIONS)}")
    mosaic = (
        open_mosaic(mosaic_or_path) if isinstance(mosaic_or_path, str | os.PathLike)
        else mosaic_or_path
    )  # fmt: skip
    settings = settings or StainSettings()
    if product == "despeckled-r":
        settings = default_despeckle_settings(settings)
    if isinstance(region, tuple):
        region = "{}:{},{}:{}".format(*region)
    try:
        box = parse_region(region, mosaic.shape)
    except ValueError as exc:
        raise MosaicError(mosaic.source, str(exc)) from None
    try:
        plan = ExportPlan.make(box, tile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ctx = 0
    if product == "gan":
        ctx = int(default_context(settings) if context is None else context)
        if not 0 < ctx <= plan.tile // 2:
            raise UsageError(f"context must be in 1..tile/2 = {plan.tile // 2}, got {ctx}")
    return ExportRequest(mosaic, settings, product, plan, ctx, target)


def _clear_the_way(target: Target, resume: bool, overwrite: bool) -> None:
    """Refuse an existing output or work folder unless asked to replace or resume it."""
    check_output(target, overwrite)
    work = target.work
    if work.exists() and not resume:
        if not overwrite:
            raise MosaicError(
                work,
                "holds an interrupted export; pass --resume to continue it or --overwrite "
                "to start again",
            )
        shutil.rmtree(work)


def _check_models(settings: StainSettings, product: str) -> None:
    """Load the export's models (cached per process) so a bad checkpoint fails at once."""
    from napari_confocal_stain.engine.pipeline import get_model

    if product == "gan":
        get_model(settings.model, settings.device, "stain")
    if settings.despeckle is not None:
        get_model(settings.despeckle, settings.device, "despeckle")


def _complete(job: Job, request: ExportRequest) -> Path:
    """Write the image's metadata (its completion mark) and put the output in place."""
    mosaic, plan = request.mosaic, job.plan
    provenance = {
        "source": str(mosaic.source),
        "product": job.product,
        "settings": job.settings.to_dict(),
        "region": list(plan.region),
        "tile": plan.tile,
        "context": job.context,
    }
    name = str(getattr(mosaic, "name", "slide"))
    store.write_multiscales(
        job.image,
        plan,
        channels=job.channels,
        pixel_size_um=float(mosaic.pixel_size_um),
        name=f"{name} {job.product}",
        provenance=provenance,
    )
    return finalize(request.target, plan, float(mosaic.pixel_size_um), name)


def export_array(
    array: Any,
    out: str | os.PathLike,
    *,
    pixel_size_um: float = 1.0,
    name: str = "image",
    tile: int = DEFAULT_TILE,
    compression: str = "deflate",
    overwrite: bool = False,
) -> Path:
    """Write an RGB ``(H, W, 3)`` or grey ``(H, W)`` uint8 array-like as a pyramidal export.

    Streams ``tile``² blocks of ``array`` (numpy, dask, zarr or any lazily sliced array)
    into the same OME-Zarr / OME-TIFF layout as :func:`export_slide` (the napari writer's
    path). Not resumable: it is as fast as reading the array.

    Raises
    ------
    MosaicError
        Bad output name, or it exists and ``overwrite`` is False.
    ValueError
        ``array`` is not ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8.
    """
    target = Target(Path(out), compression)
    check_output(target, overwrite)
    shape = tuple(int(n) for n in array.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4))):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {shape}")
    if np.dtype(array.dtype) != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    channels = 1 if len(shape) == 2 else 3
    plan = ExportPlan.make((0, shape[0], 0, shape[1]), tile)
    work, image = target.work, target.image
    made = missing_folders(target.out.parent)
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        store.create_pyramid(image, plan, channels, **target.store_format())
        for box in plan.chunks(0).values():
            y0, y1, x0, x1 = box
            block = np.asarray(array[y0:y1, x0:x1])
            block = block[None] if block.ndim == 2 else np.moveaxis(block[..., :3], -1, 0)
            write_chunk0(image, plan, box, np.ascontiguousarray(block))
        for level in range(2, len(plan.levels)):
            for ij in plan.chunks(level):
                reduce_chunk(image, plan, level, ij)
        store.write_multiscales(
            image, plan, channels=channels, pixel_size_um=pixel_size_um, name=name,
            provenance={"source": "napari layer"},
        )  # fmt: skip
        return finalize(target, plan, pixel_size_um, name)
    except BaseException:
        remove_work(work, made)  # not resumable: nothing is kept
        raise


def _boot_id() -> str:
    """This boot's id (Linux), or a constant where there is none (fresh flags then die
    with the process: see :meth:`_Driver.flush`)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"pid-{os.getpid()}"


class _Driver:
    """Submits a job's tasks to a pool, records what finished, resumes from the flags."""

    def __init__(
        self,
        job: Job,
        pool: Any,
        progress: Callable[[int, int], None] | None,
        task_cancel: Callable[[], bool] | None,
        cancel: Callable[[], bool] | None,
    ) -> None:
        self.job, self.pool, self.progress = job, pool, progress
        self.task_cancel, self.cancel = task_cancel, cancel
        self.work = Path(job.work)
        self.plan = job.plan
        self.fresh = self.work / "fresh" / _boot_id()
        self.fresh.mkdir(parents=True, exist_ok=True)
        self.flags = {p.name for p in (self.work / "done").iterdir()}
        self.flags |= {p.name for p in self.fresh.iterdir()}  # same boot: page cache intact
        self.total = sum(h * w for h, w in self.plan.levels)
        self.done = 0
        # In flight: enough to keep every worker busy with one queued behind it, few enough
        # that an interruption loses little and memory stays bounded.
        self.limit = 2 * pool.workers
        self.running: dict[Any, tuple[str, Any]] = {}
        self.composed: set = set()
        self.have: set = set()
        self.composing: set = set()
        self.pending: list[str] = []
        self.to_tidy: list[tuple[int, int]] = []
        self.last_flush = time.monotonic()

    # -- bookkeeping
    @staticmethod
    def name(level: int, ij: tuple[int, int]) -> str:
        return f"L{level}_{ij[0]}_{ij[1]}"

    def area(self, level: int, ij: tuple[int, int]) -> int:
        y0, y1, x0, x1 = self.plan.chunks(level)[ij]
        n = (y1 - y0) * (x1 - x0)
        if level == 0 and len(self.plan.levels) > 1:  # a level-0 task also writes level 1
            h1, w1 = self.plan.levels[1]
            n += (min(h1, y1 // 2) - y0 // 2) * (min(w1, x1 // 2) - x0 // 2)
        return n

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finished(self, level: int, ij: tuple[int, int], *, count: bool = True) -> None:
        """A chunk's task returned: flag it at once as *fresh*, durably at the next flush."""
        name = self.name(level, ij)
        (self.fresh / name).touch()
        self.flags.add(name)
        self.pending.append(name)
        if count:
            self.advance(self.area(level, ij))
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Sync the work folder's filesystem, then write the pending *durable* done flags.

        Two kinds of flag, so that neither safety nor speed is given up: a *fresh* flag
        (``fresh/<boot id>/``) is written as soon as a task returns and is trusted only by a
        resumed run on the same boot (after Ctrl-C or kill -9 the page cache still holds the
        chunk); a *durable* flag (``done/``) is written only after a ``syncfs`` has put the
        data it vouches for on disk, and survives power loss. A flag lost to power loss just
        means one more chunk redone.
        """
        self.last_flush = time.monotonic()
        if self.pending:
            store.sync_folder(self.work)
            for name in self.pending:
                (self.work / "done" / name).touch()
            self.pending.clear()
        for ij in self.to_tidy:
            self.tidy(ij)
        self.to_tidy.clear()

    def submit(self, kind: str, fn: Callable[..., Any], *args: Any) -> None:
        while len(self.running) >= self.limit:
            self.wait_some()
        self.running[self.pool.submit(fn, self.job, *args)] = (kind, args)

    def wait_some(self) -> None:
        done, _ = self.pool.wait_any(self.running)
        for fut in done:
            kind, args = self.running.pop(fut)
            fut.result()  # a task's error surfaces here
            self.handle(kind, args)

    def handle(self, kind: str, args: tuple) -> None:
        if kind == "chunk":
            self.finished(0, args[0])
        elif kind == "reduce":
            self.finished(args[0], args[1])
        elif kind == "piece":
            self.have.add(args[0])
            # GAN progress counts pieces (the model's work); composing is cheap and follows.
            self.advance(self.area(0, args[0]))
            for n in self.plan.neighbours(args[0]):
                self.maybe_compose(n)
        elif kind == "compose":
            ij = args[0]
            self.finished(0, ij, count=False)
            self.composed.add(ij)
            # Pieces are deleted only once the composes that needed them are durably done.
            self.to_tidy.append(ij)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise ExportCancelled("export cancelled; run again with resume to continue")

    # -- GAN bookkeeping
    def maybe_compose(self, ij: tuple[int, int]) -> None:
        if ij in self.composed or ij in self.composing:
            return
        if all(n in self.have for n in self.plan.neighbours(ij)):
            self.composing.add(ij)
            self.running[self.pool.submit(task_compose, self.job, ij)] = ("compose", (ij,))

    def tidy(self, ij: tuple[int, int]) -> None:
        """Delete pieces no uncomposed chunk needs any more."""
        for n in self.plan.neighbours(ij):
            if n in self.have and all(m in self.composed for m in self.plan.neighbours(n)):
                Path(self.job.piece_path(n)).unlink(missing_ok=True)
                self.have.discard(n)

    # -- phases
    def run(self) -> None:
        plan = self.plan
        gan = self.job.product == "gan"
        for level in [0, *range(2, len(plan.levels))]:
            self.advance(
                sum(self.area(level, ij) for ij in plan.chunks(level)
                    if self.name(level, ij) in self.flags
                    or (gan and level == 0 and os.path.exists(self.job.piece_path(ij))))
            )  # fmt: skip
        try:
            if gan:
                self.run_gan()
            else:
                for ij in plan.chunks(0):
                    if self.name(0, ij) not in self.flags:
                        self.check_cancel()
                        self.submit("chunk", task_chunk, ij)
            while self.running:
                self.wait_some()
            self.flush()
            for level in range(2, len(plan.levels)):
                for ij in plan.chunks(level):
                    if self.name(level, ij) not in self.flags:
                        self.check_cancel()
                        self.submit("reduce", task_reduce, level, ij)
                while self.running:  # the next level reads this one
                    self.wait_some()
                self.flush()
        except KeyboardInterrupt:
            raise  # the user wants out now: in-flight chunks are simply redone on resume
        except Exception as exc:
            from napari_confocal_stain.inference import Cancelled

            self.settle()
            try:
                self.flush()
            except OSError:
                pass  # e.g. the disk is full: unflagged chunks are simply redone on resume
            if isinstance(exc, Cancelled):
                raise ExportCancelled(
                    "export cancelled; run again with resume to continue"
                ) from None
            raise

    def settle(self) -> None:
        """Let tasks in flight finish and record them (after a cancel or an error)."""
        while self.running:
            done, _ = self.pool.wait_any(self.running)
            for fut in done:
                kind, args = self.running.pop(fut)
                try:
                    fut.result()
                except Exception:  # cancelled, or failing too: redone on resume
                    continue
                if kind != "piece":  # a finished piece is its own file; no new work now
                    try:
                        self.handle(kind, args)
                    except OSError:
                        pass  # its flag could not be written (full disk?): redone on resume

    def run_gan(self) -> None:
        """Pieces in row-major order; a chunk is composed once its neighbours' pieces exist."""
        job, plan = self.job, self.plan
        chunks0 = plan.chunks(0)
        self.composed = {ij for ij in chunks0 if self.name(0, ij) in self.flags}
        # Pieces are deleted only once their whole 3×3 block is composed, so every piece an
        # uncomposed chunk needs either exists or was never computed.
        self.have = {ij for ij in chunks0 if os.path.exists(job.piece_path(ij))}
        for ij in chunks0:
            self.maybe_compose(ij)
        for ij in chunks0:
            needed = any(n not in self.composed for n in plan.neighbours(ij))
            if ij in self.have or not needed:
                continue
            self.check_cancel()
            args = (ij,) if self.task_cancel is None else (ij, self.task_cancel)
            self.submit("piece", task_piece, *args)
        while self.running:
            self.wait_some()
        self.flush()
        missing = [ij for ij in chunks0 if ij not in self.composed]
        if missing:  # only if a piece vanished under us: say so rather than leave a hole
            raise ConfocalStainError(f"chunks {missing[:4]} could not be composed")
