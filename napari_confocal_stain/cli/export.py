"""``confocal-stain stain`` and ``confocal-stain batch``: whole-slide export from the shell.

::

    confocal-stain stain SLIDE --out OUT.ome.zarr|OUT.ome.tif [--method linear|gan]
        [--what stain|despeckled-r] [--model NAME|PATH] [--strategy S] [--despeckle [NAME|PATH]]
        [--tile N] [--stats-tile N] [--context N] [--device D] [--precision P]
        [--region y0:y1,x0:x1] [--compression deflate|jpeg|lzw|none]
        [--resume] [--overwrite] [--scheduler ADDRESS|local] [--workers N] [--quiet]
    confocal-stain batch SLIDES... --out-dir DIR [--format ome.zarr|ome.tif] [same options]

The product is the GAN stain by default; ``--method linear`` gives the linear stain and
``--what despeckled-r`` the despeckled reflectance (:func:`product`; ``--method`` with
``--what despeckled-r`` is refused as contradictory). ``--despeckle`` despeckles R before
staining, or names the despeckling model of ``--what despeckled-r``.

An error reaches the user as one line (see :mod:`napari_confocal_stain.cli.common`). ``batch``
goes on after a slide that fails and lists every failure at the end (exit status 2 if any
failed). A failed export leaves nothing behind, except after Ctrl-C or on a full disk:
then its work folder ``.OUT.partial`` is kept and ``--resume`` finishes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_confocal_stain._fs import work_folder
from napari_confocal_stain.cli.common import Progress, describe_failure, device, int_at_least
from napari_confocal_stain.errors import INTERRUPTED, USER_ERROR, OutputError, UsageError
from napari_confocal_stain.models.defaults import DEFAULT_DESPECKLE_MODEL, DEFAULT_STAIN_MODEL

__all__ = ["add_parsers", "product", "run_batch", "run_stain"]


def _add_common(p: argparse.ArgumentParser) -> None:
    from napari_confocal_stain.core.tiling import STRATEGIES

    p.add_argument(
        "--method",
        choices=("linear", "gan"),
        default=None,
        help="how the stain is made (default: gan); not with --what despeckled-r",
    )
    p.add_argument(
        "--what",
        choices=("stain", "despeckled-r"),
        default="stain",
        help="the RGB stain (default) or the despeckled reflectance (grey)",
    )
    p.add_argument("--model", default=DEFAULT_STAIN_MODEL, help="GAN generator name or path")
    p.add_argument("--strategy", choices=STRATEGIES, default="seamless", help="GAN tiling")
    p.add_argument(
        "--despeckle",
        nargs="?",
        const=DEFAULT_DESPECKLE_MODEL,
        default=None,
        metavar="MODEL",
        help=f"despeckle R before staining (default model: {DEFAULT_DESPECKLE_MODEL})",
    )
    p.add_argument(
        "--tile",
        type=int_at_least(64, 64),
        default=1024,
        help="export chunk side in px: the unit of work and resumption (default 1024)",
    )
    p.add_argument(
        "--stats-tile",
        type=int_at_least(16, 16),
        default=512,
        help="the GAN's statistics tile (the scale it was trained at; default 512)",
    )
    p.add_argument(
        "--context", type=int_at_least(1), default=None, help="GAN context per chunk side"
    )
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument(
        "--compression",
        choices=("deflate", "jpeg", "lzw", "none"),
        default="deflate",
        help="OME-TIFF codec (default deflate, lossless)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask.distributed scheduler address, or 'local' for a local cluster "
        "(default: threads in this process)",
    )
    p.add_argument(
        "--workers", type=int_at_least(1), default=None, help="threads or local workers"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parsers(subparsers: Any) -> None:
    """Add the ``stain`` and ``batch`` subcommands to ``confocal-stain``'s subparsers.

    Parameters
    ----------
    subparsers
        What ``ArgumentParser.add_subparsers`` returned; each subcommand sets ``func``.
    """
    stain = subparsers.add_parser(
        "stain",
        help="export a slide's stain (or despeckled R) as pyramidal OME-Zarr / OME-TIFF",
        description="Stain a whole slide (or --region) chunk by chunk and write it as a "
        "pyramidal OME-Zarr or tiled OME-TIFF. Interrupted runs continue with --resume.",
    )
    stain.add_argument("slide", type=Path, help="slide (any layout `confocal-stain info` reads)")
    stain.add_argument("--out", type=Path, required=True, help="OUT.ome.zarr or OUT.ome.tif")
    stain.add_argument("--region", default=None, help="y0:y1,x0:x1 in level-0 px")
    _add_common(stain)
    stain.set_defaults(func=run_stain)

    batch = subparsers.add_parser(
        "batch",
        help="export many slides into one folder (one cluster for all)",
        description="Export every SLIDE to OUT_DIR/<slide name>.<format>. A slide that fails "
        "is reported and the rest continue; the exit status is 2 if any failed.",
    )
    batch.add_argument("slides", type=Path, nargs="+", help="slides to export")
    batch.add_argument("--out-dir", type=Path, required=True, help="output folder")
    batch.add_argument("--format", choices=("ome.zarr", "ome.tif"), default="ome.zarr")
    _add_common(batch)
    batch.set_defaults(func=run_batch)


def product(args: argparse.Namespace) -> str:
    """The export product the options ask for: ``"gan"``, ``"linear"`` or ``"despeckled-r"``.

    Raises
    ------
    UsageError
        ``--method`` together with ``--what despeckled-r`` (no stain is made then).
    """
    if args.what == "despeckled-r":
        if args.method is not None:
            raise UsageError(
                f"--method {args.method} makes a stain and --what despeckled-r the despeckled "
                "reflectance: pass one of them"
            )
        return "despeckled-r"
    return args.method or "gan"


def _settings(args: argparse.Namespace) -> Any:
    from napari_confocal_stain.engine.pipeline import StainSettings

    return StainSettings(
        despeckle=args.despeckle,
        model=args.model,
        strategy=args.strategy,
        tile=args.stats_tile,
        device=args.device,
        precision=args.precision,
    )


def _export(slide: Path, out: Path, args: argparse.Namespace, scheduler: Any, region: Any) -> Path:
    from napari_confocal_stain.export import export_slide

    with Progress(out.name, "px", quiet=args.quiet, unit_scale=True) as bar:
        return export_slide(
            slide,
            out,
            settings=_settings(args),
            product=product(args),
            region=region,
            tile=args.tile,
            context=args.context,
            compression=args.compression,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=bar,
            scheduler=scheduler,
            workers=args.workers,
        )


def run_stain(args: argparse.Namespace) -> int:
    """``confocal-stain stain``: export one slide; prints the output path."""
    print(_export(args.slide, args.out, args, args.scheduler, args.region))
    return 0


def _batch_outputs(slides: list[Path], out_dir: Path, fmt: str) -> list[Path]:
    """``OUT_DIR/<slide name>.<format>``, made unique when two slides share a name."""
    names: set[str] = set()
    outs = []
    for slide in slides:
        stem = slide.name.removesuffix(".ome.zarr").removesuffix(".ome.tif")
        try:
            is_file = slide.is_file()
        except OSError:  # unreadable: the export reports it; the name just needs to be unique
            is_file = False
        stem = stem.rsplit(".", 1)[0] if is_file else stem
        if stem in names:
            stem = f"{stem}-{len(names)}"
        names.add(stem)
        outs.append(out_dir / f"{stem}.{fmt}")
    return outs


def run_batch(args: argparse.Namespace) -> int:
    """``confocal-stain batch``: export each slide; one cluster client serves them all.

    A slide that fails does not stop the others; every failure is listed at the end, one
    line each (exit status 2 if any failed). Ctrl-C stops the batch (exit status 130); the
    slide being exported keeps its work folder, so the same command with ``--resume``
    continues where it stopped.
    """
    from napari_confocal_stain.export.distributed import DaskPool

    debug = getattr(args, "debug", False)
    product(args)  # contradictory options fail before any slide
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise OutputError(args.out_dir, "is a file, not a folder")
    pool = None if args.scheduler is None else DaskPool(args.scheduler, args.workers)
    failures: list[str] = []
    interrupted: str | None = None
    try:
        scheduler = None if pool is None else pool.client
        outs = _batch_outputs(args.slides, args.out_dir, args.format)
        for slide, out in zip(args.slides, outs, strict=True):
            if args.resume and out.exists() and not work_folder(out).exists():
                print(f"{out} (already done)")
                continue
            try:
                print(_export(slide, out, args, scheduler, None))
            except (Exception, KeyboardInterrupt) as exc:
                message, status = describe_failure(exc, subject=slide, debug=debug)
                if status == INTERRUPTED:
                    interrupted = message
                    break
                # Name the slide when the reason is about something else (its output).
                failures.append(message if str(slide) in message else f"{slide}: {message}")
    finally:
        if pool is not None:
            pool.close()
    for message in failures:
        print(f"confocal-stain batch: error: {message}", file=sys.stderr)
    if len(args.slides) > 1 and failures:
        print(
            f"confocal-stain batch: {len(failures)} of {len(args.slides)} slides failed",
            file=sys.stderr,
        )
    if interrupted is not None:
        print(f"confocal-stain batch: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return USER_ERROR if failures else 0
