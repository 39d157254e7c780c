"""An export's files: the work folder ``.OUT.partial``, its manifest, and the output put in place.

The work folder sits next to ``OUT`` (never in the slide's folder) and holds
``manifest.json`` (the request: slide identity, product, settings, geometry), the pyramid
store ``image.zarr`` being filled, GAN ``pieces/`` and the done flags. :func:`prepare`
makes it, or checks it against the request on resume; :func:`finalize` puts the finished
output in place atomically and removes it; :func:`failed` decides what a failure leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from napari_confocal_stain._fs import work_folder, write_atomic
from napari_confocal_stain.engine.pipeline import StainSettings
from napari_confocal_stain.errors import (
    ConfocalStainError,
    MosaicError,
    OutputError,
    disk_full,
    user_fault,
)
from napari_confocal_stain.export import store
from napari_confocal_stain.export.plan import ExportPlan
from napari_confocal_stain.export.tasks import Job

__all__ = [
    "FORMATS",
    "MANIFEST_VERSION",
    "ExportCancelled",
    "ExportRequest",
    "Target",
    "check_not_in_input",
    "check_output",
    "failed",
    "finalize",
    "is_finished",
    "missing_folders",
    "output_format",
    "prepare",
    "read_manifest",
    "remove_work",
]

FORMATS = (".ome.zarr", ".ome.tif", ".ome.tiff")
MANIFEST_VERSION = 2


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


@dataclass(frozen=True)
class Target:
    """Where a finished pyramid goes and how it is encoded.

    Attributes
    ----------
    out
        ``*.ome.zarr`` or ``*.ome.tif`` (any other name raises :class:`MosaicError`).
    compression
        OME-TIFF codec (a key of :data:`~napari_confocal_stain.export.ometiff.TIFF_COMPRESSIONS`).
    """

    out: Path
    compression: str = "deflate"

    def __post_init__(self) -> None:
        output_format(self.out)  # a bad name is refused before anything else

    @property
    def fmt(self) -> str:
        """``"zarr"`` or ``"tiff"``."""
        return output_format(self.out)

    @property
    def work(self) -> Path:
        """The work folder ``.OUT.partial`` next to ``out``."""
        return work_folder(self.out)

    @property
    def image(self) -> str:
        """The pyramid store inside the work folder."""
        return str(self.work / "image.zarr")

    def store_format(self) -> dict[str, str]:
        """Layout and codec of the pyramid store for this output.

        An OME-Zarr is the store itself (NGFF ``c, y, x``, zstd). For an OME-TIFF the store
        is scratch in the TIFF's own tile layout (``y, x, c``) and, for deflate or no
        compression, its codec, so the chunk tasks do the encoding in parallel and the TIFF
        is assembled by copying bytes; JPEG/LZW tiles are encoded at assembly from a fast
        lz4 scratch store.
        """
        if self.fmt == "zarr":
            return {"layout": "cyx", "codec": "zstd"}
        codec = {"deflate": "zlib", "none": "none"}.get(self.compression, "lz4")
        return {"layout": "yxc", "codec": codec}


@dataclass(frozen=True)
class ExportRequest:
    """An export as asked for, checked: what the manifest records and a resume must match.

    Attributes
    ----------
    mosaic
        The opened slide.
    settings
        Stain parameters as asked (``precision="auto"`` not yet pinned).
    product
        One of :data:`~napari_confocal_stain.export.tasks.PRODUCTS`.
    plan
        The region's chunk grid and output pyramid.
    context
        GAN context per chunk side (0 for the other products).
    target
        The output.
    """

    mosaic: Any
    settings: StainSettings
    product: str
    plan: ExportPlan
    context: int
    target: Target

    def manifest(self) -> dict[str, Any]:
        """The request as the manifest records it (JSON)."""
        plan = self.plan
        return {
            "version": MANIFEST_VERSION,
            "slide": _slide_identity(self.mosaic),
            "product": self.product,
            "settings": self.settings.to_dict(),
            "region": list(plan.region),
            "tile": plan.tile,
            "levels": [list(s) for s in plan.levels],
            "context": self.context,
            "format": self.target.fmt,
            "compression": self.target.compression,
        }


# ---------------------------------------------------------------------------------- checks


def _real(path: str | os.PathLike) -> Path:
    """``path`` with symlinks resolved; never raises (``Path.resolve`` raises on a loop)."""
    return Path(os.path.realpath(path))


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


def check_not_in_input(out: Path, mosaic: Any) -> None:
    """Refuse an output (and so its work folder, its sibling) in an input's folder.

    A slide folder (Vivascope mosaic, OME-Zarr) may not contain the output at any depth; a
    slide file's folder may not hold it directly.
    """
    target = _real(out)
    paths = [Path(mosaic.source)]
    paths += [Path(f) for f in dict(getattr(mosaic, "files", {}) or {}).values()]
    for p in (_real(p) for p in paths):
        if target == p:
            raise MosaicError(out, "is the input slide itself; inputs are never written to")
        if p.is_dir() and p in target.parents:
            raise MosaicError(out, f"is inside the input slide {p}; inputs are never written to")
        if p.is_file() and target.parent == p.parent:
            raise MosaicError(
                out, f"is in the folder of the input {p.name}; inputs are never written to"
            )


def check_output(target: Target, overwrite: bool) -> None:
    """Refuse an output that exists (even as a dangling or looping symlink) or cannot be one."""
    out = target.out
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise MosaicError(out, "already exists; pass --overwrite (overwrite=True) to replace it")
    if target.fmt == "tiff" and out.is_dir():
        raise OutputError(out, "is a folder; an .ome.tif output must be a file")


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet (outermost first)."""
    missing = []
    for p in [folder, *folder.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing[::-1]


# --------------------------------------------------------------------------------- manifest


def read_manifest(work: Path) -> dict[str, Any]:
    """The work folder's manifest, or a :class:`MosaicError` saying it is not one of ours."""
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


def _resolve_settings(settings: StainSettings, product: str) -> StainSettings:
    """Pin ``precision="auto"`` to what this machine chose, so a resumed run matches.

    On the CPU ``auto`` is decided by timing bf16 against fp32 once per process; two runs
    could decide differently, and a resumed export must compute exactly as the first run.
    """
    if product != "gan" or settings.precision != "auto":
        return settings
    from napari_confocal_stain.engine.pipeline import get_model
    from napari_confocal_stain.inference import resolve_device, resolve_precision

    model = get_model(settings.model, settings.device, "stain")
    return replace(
        settings, precision=resolve_precision("auto", resolve_device(settings.device), model)
    )


def _resumed(request: ExportRequest, stored: dict[str, Any]) -> tuple[StainSettings, str]:
    """The stored run's resolved settings and token, once the request is found the same."""
    # Compare with the request as the user gave it (precision "auto" before pinning).
    asked = request.manifest()
    differs = [k for k in asked if k != "settings" and stored["request"].get(k) != asked[k]] + (
        ["settings"] if stored["request"]["settings"] != asked["settings"] else []
    )
    if differs:
        raise MosaicError(
            request.target.work,
            "is an interrupted export of a different request (differs in "
            f"{', '.join(differs)}); resume with the same options or pass --overwrite",
        )
    resolved = stored["resolved_settings"]
    coefficients = tuple(tuple(c) for c in resolved["linear_coefficients"])
    return StainSettings(**{**resolved, "linear_coefficients": coefficients}), stored["token"]


def _started(request: ExportRequest) -> tuple[StainSettings, str]:
    """Write a new run's manifest; its resolved settings and token."""
    settings = _resolve_settings(request.settings, request.product)
    manifest = request.manifest()
    token = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    work = request.target.work
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "request": manifest,
        "resolved_settings": settings.to_dict(),
        "token": token,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(work / "manifest.json", json.dumps(record, indent=1))
    return settings, token


def prepare(request: ExportRequest, resume: bool) -> Job:
    """Create the work folder and manifest, or check and reload them on resume."""
    target = request.target
    work = target.work
    if resume and (work / "manifest.json").is_file():
        settings, token = _resumed(request, read_manifest(work))
    else:
        settings, token = _started(request)
    job = Job(
        request.mosaic, settings, request.product, request.plan, str(work), request.context,
        token,
    )  # fmt: skip
    (work / "done").mkdir(exist_ok=True)
    (work / "pieces").mkdir(exist_ok=True)
    store.create_pyramid(job.image, request.plan, job.channels, **target.store_format())
    return job


# ------------------------------------------------------------------------------ the output


def finalize(target: Target, plan: ExportPlan, pixel_size_um: float, name: str) -> Path:
    """Put the finished output in place atomically and remove the work folder."""
    work, image, out = target.work, target.image, target.out
    if target.fmt == "tiff":
        _assemble_tiff(target, plan, pixel_size_um, name)
    else:
        manifest_path = work / "manifest.json"
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


def _assemble_tiff(target: Target, plan: ExportPlan, pixel_size_um: float, name: str) -> None:
    """Write the OME-TIFF next to ``OUT`` under a temporary name, then rename it into place."""
    from napari_confocal_stain.export.ometiff import write_ome_tiff

    out = target.out
    levels = [store.open_level(target.image, k) for k in range(len(plan.levels))]
    tmp = out.parent / f".{out.name}.tmp"
    try:
        write_ome_tiff(
            levels, tmp, pixel_size_um=pixel_size_um, name=name, tile=plan.store_chunk,
            compression=target.compression,
        )  # fmt: skip
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def is_finished(target: Target) -> bool:
    """A finished export whose work folder was not yet removed: nothing left to do."""
    work = target.work
    if not (work / "manifest.json").is_file():
        return False
    finalized = bool(read_manifest(work).get("finalized"))
    return finalized and target.out.exists() and not Path(target.image).exists()


# ---------------------------------------------------------------------------------- failure


def remove_work(work: Path, made: list[Path]) -> None:
    """Remove a work folder and the (now empty) folders made for the output."""
    store.forget_arrays(str(work / "image.zarr"))
    shutil.rmtree(work, ignore_errors=True)
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (someone else's files) or gone


def failed(
    exc: BaseException, out: Path, made: list[Path], *, remove: bool = True
) -> BaseException:
    """Tidy up after a failed export of ``out`` and return the error to raise.

    Ctrl-C, a cancel and a full disk keep the work folder, since ``resume`` can then finish
    the export. Anything else removes it (if ``remove``), and the folders made for the
    output (``made``), so nothing is left behind (the output itself only ever appears
    complete).
    """
    work = work_folder(out)
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
        remove_work(work, made)
    fault = user_fault(exc)
    if isinstance(fault, OSError) and fault.filename is None:
        # A failed write() on an open file names none; reads of the slide fail as
        # MosaicError naming it, so the export's own files are what the OS refused.
        fault.filename = str(out)
    return exc
