"""Resumable whole-slide export: chunk tasks, done flags, completion mark, atomic final rename.

How a run goes (``OUT`` is ``x.ome.zarr`` or ``x.ome.tif``):

1. A work folder ``.OUT.partial`` is made next to ``OUT`` (never in the slide's folder) with
   ``manifest.json`` (slide identity, product, settings, geometry) and an empty OME-Zarr
   pyramid ``image.zarr`` (:mod:`~napari_confocal_stain.export.store`).
2. **Level 0** is computed chunk by chunk (``tile``² px) by tasks on threads or a dask
   cluster. A task writes its chunk *and* that chunk's 2×2 mean into level 1 (exactly one
   storage chunk); when it returns the driver flags the chunk done, at once as a *fresh*
   flag trusted on the same boot, and as a *durable* flag after the next ``syncfs`` (see
   :meth:`_Driver.flush`). Linear stain and despeckled R are exact per chunk (the pipeline
   reads the context they need). The GAN stain of a chunk is computed on the chunk grown
   by ``context`` px and kept as a *piece* in ``pieces/``; a chunk is *composed*
   (cross-faded with its neighbours' pieces by
   :func:`~napari_confocal_stain.engine.blend.compose`, exactly as the viewer composes
   tiles) once all its neighbours' pieces exist, and a piece is deleted once every chunk it
   overlaps is durably composed (so scratch space stays about two chunk rows). A piece is
   a pure function of its box and the settings, and compose sums pieces in a fixed order,
   so the result does not depend on the order of work or on interruptions.
3. **Levels 2…** are 2×2 means of the level above, one storage chunk per task.
4. The NGFF metadata is written (the image's completion mark); then an ``.ome.zarr`` is
   renamed into place, or an ``.ome.tif`` is assembled from the pyramid's chunk files
   (already encoded TIFF tiles for deflate) in a temporary file next to ``OUT`` and
   renamed; the work folder is removed last.

An interrupted run (Ctrl-C, ``kill -9``, power loss) or one that ran out of disk space
leaves the work folder; ``resume=True``
checks its manifest against the request, skips every chunk with a done flag (or, for the
GAN, an existing piece) and recomputes only chunks that were in flight: at most one per
worker. Tissue-free chunks cost little: the GAN engine skips tissue-free blocks (the model
does not run), and all-white storage chunks are not written at all (they read as the
arrays' fill value, white).

A run that fails for any other reason (a bad slide, NaN found mid-export, a corrupt chunk, a
bad checkpoint, a refused write) removes its work folder, and any folder it made for the
output, so nothing is left behind: resuming could not make such an export succeed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_confocal_stain._fs import work_folder, write_atomic
from napari_confocal_stain.engine.pipeline import StainPipeline, StainSettings, to_uint8
from napari_confocal_stain.errors import (
    ConfocalStainError,
    MosaicError,
    OutputError,
    UsageError,
    disk_full,
    user_fault,
)
from napari_confocal_stain.export import store
from napari_confocal_stain.export.distributed import on_worker_setup, open_pool
from napari_confocal_stain.export.plan import Box, ExportPlan, parse_region

__all__ = [
    "FORMATS",
    "METHODS",
    "WHATS",
    "ExportCancelled",
    "default_context",
    "export_array",
    "export_slide",
    "output_format",
]

FORMATS = (".ome.zarr", ".ome.tif", ".ome.tiff")
METHODS = ("linear", "gan")
WHATS = ("stain", "despeckled-r")
MANIFEST_VERSION = 1

FLUSH_SECONDS = 2.0
"""Finished chunks are synced to disk and flagged done in batches at most this far apart."""

DEFAULT_TILE = 1024
"""Default chunk side: a 1024² linear chunk is ~30 MB of float work; a GAN chunk grown by
its context is a ~1.6 Mpx seamless pass (~2 GB of activations on the CPU)."""


class ExportCancelled(ConfocalStainError):
    """The export was cancelled or interrupted; the work folder is kept for ``resume``."""

    exit_status = 130


def output_format(out: str | Path) -> str:
    """``"zarr"`` or ``"tiff"`` from the output's name (``.ome.zarr`` / ``.ome.tif[f]``).

    Raises
    ------
    MosaicError
        Any other suffix.
    """
    name = Path(out).name.lower()
    if name.endswith(".ome.zarr"):
        return "zarr"
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "tiff"
    raise MosaicError(out, "output must end in .ome.zarr or .ome.tif")


def default_context(settings: StainSettings) -> int:
    """GAN context per side: a quarter statistics tile, the engine's own block margin.

    ``stain_region`` cuts blocks with this margin when a region exceeds its memory budget,
    so chunking an export this way costs the same per cut as the engine's own blocking.
    """
    return max(32, int(settings.tile) // 4)


# ----------------------------------------------------------------------------------------------
# The job: everything a task needs (picklable; sent to dask workers).


@dataclass(frozen=True)
class Job:
    """One export's parameters as seen by a task."""

    mosaic: Any
    settings: StainSettings
    method: str
    what: str
    plan: ExportPlan
    work: str
    context: int
    token: str

    @property
    def image(self) -> str:
        return os.path.join(self.work, "image.zarr")

    @property
    def channels(self) -> int:
        return 1 if self.what == "despeckled-r" else 3

    def piece_path(self, ij: tuple[int, int]) -> str:
        return os.path.join(self.work, "pieces", f"{ij[0]}_{ij[1]}.npy")


_PIPELINES: dict[str, StainPipeline] = {}

TASK_LOG_ENV = "NAPARI_CONFOCAL_STAIN_EXPORT_LOG"
"""If set, every task appends ``"<kind> <level> <i> <j>"`` to this file when it starts: how
the benchmark counts chunks recomputed after a ``kill -9`` (started in both runs)."""


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


def _write_level0(job: Job, box: Box, image: np.ndarray) -> None:
    """Write a level-0 chunk (``(C, h, w)`` uint8) and its 2×2 mean into level 1."""
    write_chunk0(job.image, job.plan, box, image)


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
    if job.what == "despeckled-r":
        img = pipe.reflectance(0, sbox, despeckled=True)[None]
    else:
        img = np.moveaxis(pipe.linear(0, sbox), -1, 0)
    _write_level0(job, box, to_uint8(img))
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
    _write_level0(job, box, to_uint8(np.moveaxis(out, -1, 0)))
    return ij


def task_reduce(job: Job, level: int, ij: tuple[int, int]) -> tuple[int, int]:
    """One storage chunk of level ``level`` (≥ 2) of the job's pyramid."""
    on_worker_setup()
    _log_start("reduce", level, ij)
    reduce_chunk(job.image, job.plan, level, ij)
    return ij


# ----------------------------------------------------------------------------------------------
# The driver


def _slide_identity(mosaic: Any) -> dict[str, Any]:
    """What identifies the input: its files with sizes and modification times."""
    files = {}
    for key, f in sorted(dict(getattr(mosaic, "files", {}) or {}).items()):
        try:
            st = os.stat(f)
            files[key] = [str(_real(f)), st.st_size, st.st_mtime_ns]
        except OSError:
            files[key] = [str(f), None, None]
    return {
        "source": str(mosaic.source),
        "shape": list(mosaic.shape),
        "normalization": getattr(mosaic, "normalization", None),
        "files": files,
    }


def _real(path: str | os.PathLike) -> Path:
    """``path`` with symlinks resolved; never raises (``Path.resolve`` raises on a loop)."""
    return Path(os.path.realpath(path))


def _input_paths(mosaic: Any) -> list[Path]:
    paths = [Path(mosaic.source)]
    paths += [Path(f) for f in dict(getattr(mosaic, "files", {}) or {}).values()]
    return [_real(p) for p in paths]


def _check_not_in_input(out: Path, mosaic: Any) -> None:
    """Refuse an output (and so its work folder, its sibling) in an input's folder.

    A slide folder (Vivascope mosaic, OME-Zarr) may not contain the output at any depth; a
    slide file's folder may not hold it directly.
    """
    target = _real(out)
    for p in _input_paths(mosaic):
        if target == p:
            raise MosaicError(out, "is the input slide itself; inputs are never written to")
        if p.is_dir() and p in target.parents:
            raise MosaicError(out, f"is inside the input slide {p}; inputs are never written to")
        if p.is_file() and target.parent == p.parent:
            raise MosaicError(
                out, f"is in the folder of the input {p.name}; inputs are never written to"
            )


def _resolve_settings(settings: StainSettings, method: str) -> StainSettings:
    """Pin ``precision="auto"`` to what this machine chose, so a resumed run matches.

    On the CPU ``auto`` is decided by timing bf16 against fp32 once per process; two runs
    could decide differently, and a resumed export must compute exactly as the first run.
    """
    if method != "gan" or settings.precision != "auto":
        return settings
    from napari_confocal_stain.engine.pipeline import get_model
    from napari_confocal_stain.inference import resolve_device, resolve_precision

    model = get_model(settings.model, settings.device, "stain")
    return replace(
        settings, precision=resolve_precision("auto", resolve_device(settings.device), model)
    )


def _manifest(
    mosaic: Any, settings: StainSettings, method: str, what: str, plan: ExportPlan, context: int,
    fmt: str, compression: str,
) -> dict[str, Any]:  # fmt: skip
    request = {
        "version": MANIFEST_VERSION,
        "slide": _slide_identity(mosaic),
        "method": method,
        "what": what,
        "settings": settings.to_dict(),
        "region": list(plan.region),
        "tile": plan.tile,
        "levels": [list(s) for s in plan.levels],
        "context": context,
        "format": fmt,
        "compression": compression,
    }
    return request


def _token(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _store_format(fmt: str, compression: str) -> dict[str, str]:
    """Layout and codec of the pyramid store for an output format.

    An OME-Zarr is the store itself (NGFF ``c, y, x``, zstd). For an OME-TIFF the store is
    scratch in the TIFF's own tile layout (``y, x, c``) and, for deflate or no compression,
    its codec, so the chunk tasks do the encoding in parallel and the TIFF is assembled by
    copying bytes; JPEG/LZW tiles are encoded at assembly from a fast lz4 scratch store.
    """
    if fmt == "zarr":
        return {"layout": "cyx", "codec": "zstd"}
    return {"layout": "yxc", "codec": {"deflate": "zlib", "none": "none"}.get(compression, "lz4")}


def _boot_id() -> str:
    """This boot's id (Linux), or a constant where there is none (fresh flags then die
    with the process: see :meth:`_Driver.flush`)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"pid-{os.getpid()}"


def _flag(work: Path, name: str) -> Path:
    return work / "done" / name


def export_slide(
    mosaic_or_path: Any,
    out: str | os.PathLike,
    *,
    settings: StainSettings | None = None,
    method: str = "gan",
    what: str = "stain",
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
    method
        ``"linear"`` or ``"gan"`` (for ``what="stain"``).
    what
        ``"stain"`` (RGB) or ``"despeckled-r"`` (grey; uses ``settings.despeckle``, the
        bundled despeckler if none is set).
    region
        ``"y0:y1,x0:x1"`` or a ``(y0, y1, x0, x1)`` box of level 0; ``None`` = whole slide.
    tile
        Chunk side in px (multiple of 64): the unit of work, resumption and progress;
        storage chunks and TIFF tiles are ``tile // 2``.
    context
        GAN context per chunk side (default :func:`default_context`), ≤ ``tile // 2``.
    compression
        OME-TIFF codec: ``"deflate"`` (lossless, default), ``"jpeg"``, ``"lzw"``, ``"none"``.
    resume
        Continue an interrupted export of the same request (its work folder must exist).
    overwrite
        Replace an existing ``out`` (only once the new one is complete) or discard an
        interrupted export's work folder.
    progress
        ``progress(done, total)`` in output pixels (all levels) after each chunk.
    cancel
        Polled between chunks (and between GAN blocks on threads); True stops cleanly,
        keeping the work folder: raises :class:`ExportCancelled`.
    scheduler
        ``None`` (local threads), ``"local"`` (a LocalCluster), a scheduler address, or a
        ``distributed.Client``.
    workers
        Threads, or LocalCluster processes (default: 2 for linear/despeckled R, 1 for the
        GAN, whose torch pass uses every core already).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    MosaicError
        Bad slide, bad output name, output exists, output inside the input, mismatching
        partial export.
    ExportCancelled
        ``cancel()`` returned True, or the run was interrupted (KeyboardInterrupt).
    """
    from napari_confocal_stain.engine.pipeline import default_despeckle_settings
    from napari_confocal_stain.io.readers import open_mosaic

    out = Path(out)
    fmt = output_format(out)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if what not in WHATS:
        raise ValueError(f"what must be one of {WHATS}, got {what!r}")
    from napari_confocal_stain.export.ometiff import TIFF_COMPRESSIONS

    if compression not in TIFF_COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(TIFF_COMPRESSIONS)}")
    mosaic = (
        open_mosaic(mosaic_or_path) if isinstance(mosaic_or_path, str | os.PathLike)
        else mosaic_or_path
    )  # fmt: skip
    settings = settings or StainSettings()
    if what == "despeckled-r":
        settings = default_despeckle_settings(settings)
        method = "linear"  # no GAN involved: an exact per-chunk product
    box = region if isinstance(region, tuple) else None
    try:
        if box is None:
            box = parse_region(region, mosaic.shape)  # type: ignore[arg-type]
        else:
            box = parse_region("{}:{},{}:{}".format(*box), mosaic.shape)
    except ValueError as exc:
        raise MosaicError(mosaic.source, str(exc)) from None
    try:
        plan = ExportPlan.make(box, tile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ctx = 0 if method != "gan" else int(default_context(settings) if context is None else context)
    if method == "gan" and not 0 < ctx <= plan.tile // 2:
        raise UsageError(f"context must be in 1..tile/2 = {plan.tile // 2}, got {ctx}")

    _check_not_in_input(out, mosaic)
    work = work_folder(out)
    manifest_path = work / "manifest.json"
    if resume and manifest_path.is_file():
        stored = _read_manifest(work)
        # A finished export whose work folder was not yet removed: nothing left to do.
        if stored.get("finalized") and out.exists() and not (work / "image.zarr").exists():
            shutil.rmtree(work, ignore_errors=True)
            return out
    _check_output(out, fmt, overwrite)
    if work.exists() and not resume:
        if not overwrite:
            raise MosaicError(
                work,
                "holds an interrupted export; pass --resume to continue it or --overwrite "
                "to start again",
            )
        shutil.rmtree(work)
    # The models before anything is written: a bad checkpoint leaves nothing behind.
    _check_models(settings, method)
    made = _missing_folders(out.parent)
    fresh = not work.exists()

    # The pool first: a cluster that cannot be reached must not leave a work folder behind.
    # The GAN and the despeckling net run torch on every core already: one task at a time.
    default_workers = 1 if method == "gan" or settings.despeckle is not None else 2
    pool = open_pool(scheduler, workers, default_workers)
    try:
        job = _prepare(mosaic, settings, method, what, plan, ctx, fmt, compression, work, resume)
    except BaseException as exc:
        pool.close()
        # A resume refused (other options, say) must not remove the export it refused.
        err = _failed(exc, out, work, made, remove=fresh)
        if err is exc:
            raise
        raise err from exc

    try:
        try:
            _run(job, pool, progress, cancel if scheduler is None else None, cancel)
        finally:
            pool.close()
        return _complete(job, mosaic, out, fmt, compression)
    except BaseException as exc:
        err = _failed(exc, out, work, made)
        if err is exc:
            raise
        raise err from exc


def _complete(job: Job, mosaic: Any, out: Path, fmt: str, compression: str) -> Path:
    """Write the image's metadata (its completion mark) and put the output in place."""
    plan, method, what = job.plan, job.method, job.what
    provenance = {
        "source": str(mosaic.source),
        "method": method,
        "what": what,
        "settings": job.settings.to_dict(),
        "region": list(plan.region),
        "tile": plan.tile,
        "context": job.context,
    }
    store.write_multiscales(
        job.image,
        plan,
        what=what,
        pixel_size_um=float(mosaic.pixel_size_um),
        name=f"{getattr(mosaic, 'name', 'slide')} {what if what != 'stain' else method}",
        provenance=provenance,
    )
    return _finalize(
        Path(job.work), job.image, plan, out, fmt, compression, float(mosaic.pixel_size_um),
        str(getattr(mosaic, "name", "slide")),
    )  # fmt: skip


def _read_manifest(work: Path) -> dict[str, Any]:
    try:
        stored = json.loads((work / "manifest.json").read_text())
        if not isinstance(stored, dict) or not isinstance(stored.get("request"), dict):
            raise ValueError("not one of ours")
    except ValueError:
        raise MosaicError(
            work / "manifest.json",
            "is not a readable export manifest; pass --overwrite to start the export again",
        ) from None
    return stored


def _check_output(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an output that exists (even as a dangling or looping symlink) or cannot be one."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise MosaicError(out, "already exists; pass --overwrite (overwrite=True) to replace it")
    if fmt == "tiff" and out.is_dir():
        raise OutputError(out, "is a folder; an .ome.tif output must be a file")


def _check_models(settings: StainSettings, method: str) -> None:
    """Load the export's models (cached per process) so a bad checkpoint fails at once."""
    from napari_confocal_stain.engine.pipeline import get_model

    if method == "gan":
        get_model(settings.model, settings.device, "stain")
    if settings.despeckle is not None:
        get_model(settings.despeckle, settings.device, "despeckle")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet (outermost first)."""
    missing = []
    for p in [folder, *folder.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing[::-1]


def _failed(
    exc: BaseException, out: Path, work: Path, made: list[Path], *, remove: bool = True
) -> BaseException:
    """Tidy up after a failed export and return the error to raise.

    Ctrl-C, a cancel and a full disk keep the work folder, since ``resume`` can then finish
    the export. Anything else removes it (if ``remove``), and the folders made for the
    output, so nothing is left behind (the output itself only ever appears complete).
    """
    if isinstance(exc, KeyboardInterrupt):
        if not work.is_dir():
            return ExportCancelled(f"export to {out} interrupted before it started")
        return ExportCancelled(
            f"export to {out} interrupted; the work so far is kept in {work}: run again "
            "with --resume to continue"
        )
    if isinstance(exc, ExportCancelled):
        return exc
    full = disk_full(exc)
    if full is not None and work.is_dir():
        writing = f" writing {os.fsdecode(full.filename)}" if full.filename is not None else ""
        return OutputError(
            out,
            f"disk full{writing}; the work so far is kept in {work}: free space and run "
            "again with --resume",
        )
    if remove:
        _remove_work(work, made)
    fault = user_fault(exc)
    if isinstance(fault, OSError) and fault.filename is None:
        # A failed write() on an open file names none; reads of the slide fail as
        # MosaicError naming it, so the export's own files are what the OS refused.
        fault.filename = str(out)
    return exc


def _remove_work(work: Path, made: list[Path]) -> None:
    """Remove a work folder and the (now empty) folders made for the output."""
    store.forget_arrays(str(work / "image.zarr"))
    shutil.rmtree(work, ignore_errors=True)
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (someone else's files) or gone


def _prepare(
    mosaic: Any, settings: StainSettings, method: str, what: str, plan: ExportPlan, ctx: int,
    fmt: str, compression: str, work: Path, resume: bool,
) -> Job:  # fmt: skip
    """Create the work folder and manifest, or check and reload them on resume."""
    manifest_path = work / "manifest.json"
    request_settings = settings
    if resume and manifest_path.is_file():
        stored = _read_manifest(work)
        # Compare with the request as the user gave it (precision "auto" before pinning).
        asked = _manifest(mosaic, request_settings, method, what, plan, ctx, fmt, compression)
        differs = [
            k for k in asked if k != "settings" and stored["request"].get(k) != asked[k]
        ] + (["settings"] if stored["request"]["settings"] != asked["settings"] else [])
        if differs:
            raise MosaicError(
                work,
                "is an interrupted export of a different request (differs in "
                f"{', '.join(differs)}); resume with the same options or pass --overwrite",
            )
        settings = StainSettings(
            **{
                **stored["resolved_settings"],
                "linear_coefficients": tuple(
                    tuple(c) for c in stored["resolved_settings"]["linear_coefficients"]
                ),
            }
        )
        token = stored["token"]
    else:
        settings = _resolve_settings(settings, method)
        request = _manifest(mosaic, request_settings, method, what, plan, ctx, fmt, compression)
        token = _token(request)
        work.mkdir(parents=True, exist_ok=True)
        write_atomic(
            manifest_path,
            json.dumps(
                {
                    "request": request,
                    "resolved_settings": settings.to_dict(),
                    "token": token,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            ),
        )
    job = Job(mosaic, settings, method, what, plan, str(work), ctx, token)
    (work / "done").mkdir(exist_ok=True)
    (work / "pieces").mkdir(exist_ok=True)
    store.create_pyramid(job.image, plan, job.channels, **_store_format(fmt, compression))

    return job


def _finalize(
    work: Path, image: str, plan: ExportPlan, out: Path, fmt: str, compression: str,
    pixel_size_um: float, name: str,
) -> Path:  # fmt: skip
    """Put the finished output in place atomically and remove the work folder."""
    manifest_path = work / "manifest.json"
    if fmt == "tiff":
        from napari_confocal_stain.export.ometiff import write_ome_tiff

        levels = [store.open_level(image, k) for k in range(len(plan.levels))]
        tmp = out.parent / f".{out.name}.tmp"
        try:
            write_ome_tiff(
                levels, tmp, pixel_size_um=pixel_size_um, name=name, tile=plan.store_chunk,
                compression=compression,
            )  # fmt: skip
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
    else:
        if manifest_path.is_file():
            data = json.loads(manifest_path.read_text())
            data["finalized"] = True
            write_atomic(manifest_path, json.dumps(data, indent=1))
        store.forget_arrays(image)
        # zarr writes each chunk to "<key>.<uuid>.partial" and renames it; a kill -9 can
        # leave such a temporary behind. It is no part of the image: sweep it out.
        for junk in Path(image).rglob("*.partial"):
            junk.unlink(missing_ok=True)
        if out.exists():  # overwrite: move the old one aside, then the new one in
            os.replace(out, work / "replaced")
        os.replace(image, out)
    store.forget_arrays(image)
    shutil.rmtree(work, ignore_errors=True)
    return out


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
    out = Path(out)
    fmt = output_format(out)
    _check_output(out, fmt, overwrite)
    shape = tuple(int(n) for n in array.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4))):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {shape}")
    if np.dtype(array.dtype) != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    channels = 1 if len(shape) == 2 else 3
    plan = ExportPlan.make((0, shape[0], 0, shape[1]), tile)
    work = work_folder(out)
    made = _missing_folders(out.parent)
    shutil.rmtree(work, ignore_errors=True)
    image = str(work / "image.zarr")
    try:
        work.mkdir(parents=True)
        store.create_pyramid(image, plan, channels, **_store_format(fmt, compression))
        for box in plan.chunks(0).values():
            y0, y1, x0, x1 = box
            block = np.asarray(array[y0:y1, x0:x1])
            block = block[None] if block.ndim == 2 else np.moveaxis(block[..., :3], -1, 0)
            write_chunk0(image, plan, box, np.ascontiguousarray(block))
        for level in range(2, len(plan.levels)):
            for ij in plan.chunks(level):
                reduce_chunk(image, plan, level, ij)
        store.write_multiscales(
            image, plan, what="stain" if channels == 3 else "despeckled-r",
            pixel_size_um=pixel_size_um, name=name, provenance={"source": "napari layer"},
        )  # fmt: skip
        return _finalize(work, image, plan, out, fmt, compression, pixel_size_um, name)
    except BaseException:
        _remove_work(work, made)  # not resumable: nothing is kept
        raise


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
                _flag(self.work, name).touch()
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
        gan = self.job.method == "gan"
        for level in [0, *range(2, len(plan.levels))]:
            self.advance(
                sum(self.area(level, ij) for ij in plan.chunks(level)
                    if self.name(level, ij) in self.flags
                    or (gan and level == 0 and os.path.exists(self.job.piece_path(ij))))
            )  # fmt: skip
        try:
            if self.job.method == "gan":
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


def _run(
    job: Job,
    pool: Any,
    progress: Callable[[int, int], None] | None,
    task_cancel: Callable[[], bool] | None,
    cancel: Callable[[], bool] | None,
) -> None:
    """Drive all chunk tasks of ``job`` on ``pool``, resuming from the done flags."""
    _Driver(job, pool, progress, task_cancel, cancel).run()
