"""``confocal-stain``: the headless entry point.

Subcommands::

    confocal-stain info PATH [--f-path F] [--channels R,F] [--normalization MODE]
    confocal-stain synth OUT --size 30000x30000 --seed 1 [--looks 5] [--dtype uint8]
    confocal-stain sample            # prints the bundled sample slide's folder
    confocal-stain stain SLIDE --out OUT.ome.zarr|OUT.ome.tif [--method linear|gan] [--resume]
    confocal-stain batch SLIDES... --out-dir DIR
    confocal-stain metrics SLIDE [--model M] [--strategy S ...] [--cell 512] [--csv C] [--plot P]

Errors the user can cause (bad paths, bad files, bad options, permission denied, a
read-only or full disk, out of memory) print one line to stderr naming the file and the
problem and exit with status 2; Ctrl-C exits with 130; a bug prints a one-line summary and
exits with 1 (``--debug`` shows the traceback). See :mod:`napari_confocal_stain.cli_common`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_confocal_stain import __version__
from napari_confocal_stain.cli_common import (
    add_debug_flag,
    nonnegative_float,
    positive_float,
    report_error,
)
from napari_confocal_stain.errors import OutputError

NORMALIZATIONS = ("percentile", "independent", "global", "average", "dtype")


def _size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (or a single number for a square) into (height, width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 30000x30000, got {text!r}"
        ) from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 64:
        raise argparse.ArgumentTypeError(f"size must be HxW with both sides >= 64, got {text!r}")
    return nums[0], nums[1]


def _channels(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(
            f"channels must be two names or indices like R,F, got {text!r}"
        )
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``confocal-stain`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="confocal-stain",
        description="Open, inspect and stain ex vivo confocal (reflectance + fluorescence) "
        "slides.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="print a slide's shape, levels, pixel size, dtype and layout as JSON",
        description="Open a slide lazily (headers and one coarse level only) and print JSON.",
    )
    info.add_argument(
        "path",
        type=Path,
        help="Vivascope mosaic folder, R TIFF (with --f-path), folder with *_R.tif/*_F.tif, "
        "2-channel (OME-)TIFF or OME-Zarr",
    )
    info.add_argument("--f-path", type=Path, default=None, help="F TIFF when PATH is the R TIFF")
    info.add_argument(
        "--channels",
        type=_channels,
        default=None,
        help="channel order of a 2-channel file, as names or indices, R first (e.g. 1,0)",
    )
    info.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default="percentile",
        help="how intensities are mapped to [0, 1] (default: %(default)s)",
    )
    info.add_argument("--pixel-size", type=positive_float, default=None, help="override µm/px")

    synth = sub.add_parser(
        "synth",
        help="write a synthetic dual-mode confocal slide (Vivascope layout)",
        description="Write a deterministic synthetic R/F mosaic as tiled pyramidal TIFFs, "
        "streaming (the slide is never held in memory).",
    )
    synth.add_argument("out", type=Path, help="output mosaic folder (must not exist or be empty)")
    synth.add_argument(
        "--size", type=_size, default=(4096, 4096), help="HxW in px (default 4096x4096)"
    )
    synth.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    synth.add_argument(
        "--looks",
        type=nonnegative_float,
        default=5,
        help="speckle looks L of gamma(L, 1/L); 0 disables (default 5)",
    )
    synth.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = sub.add_parser(
        "sample",
        help="print the folder of the bundled sample slide (generated on first use)",
    )
    sample.add_argument("--quiet", action="store_true", help="no progress bar")

    # Subcommands that live in their own modules (each registers `func=run`).
    from napari_confocal_stain import cli_export, cli_metrics

    cli_export.add_parsers(sub)
    cli_metrics.add_parser(sub)
    for subparser in sub.choices.values():
        add_debug_flag(subparser)
    return parser


def _progress_bar(desc: str, quiet: bool):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr, and a closer."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar: list = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="strip", file=sys.stderr))
        bar[0].update(done - bar[0].n)

    return progress, lambda: bar and bar[0].close()


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_confocal_stain.io.readers import open_mosaic

    channels = None
    if args.channels is not None:
        channels = tuple(int(c) if c.isdigit() else c for c in args.channels)
    mosaic = open_mosaic(
        args.path,
        f_path=args.f_path,
        channels=channels,
        normalization=args.normalization,
        pixel_size_um=args.pixel_size,
    )
    print(json.dumps(mosaic.info(), indent=2, default=str))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    for parent in args.out.parents:  # mkdir would call a file in the way "already exists"
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(parent, "is a file, not a folder")
            break
    progress, close = _progress_bar(f"synth {args.size[0]}x{args.size[1]}", args.quiet)
    try:
        out = write_synthetic_mosaic(
            args.out,
            size=args.size,
            seed=args.seed,
            looks=args.looks or None,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=progress,
        )
    finally:
        close()
    print(out)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from napari_confocal_stain.io.sample import sample_slide_path

    progress, close = _progress_bar("sample slide (first time only)", args.quiet)
    try:
        print(sample_slide_path(progress=progress))
    finally:
        close()
    return 0


def _subject(args: argparse.Namespace) -> Path | None:
    """The file a command works on, named by an error that names none (e.g. out of memory)."""
    for name in ("slide", "path", "out"):
        value = getattr(args, name, None)
        if value is not None:
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``confocal-stain``; returns the exit status (0, 1 bug, 2 bad input, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    handler = (
        getattr(args, "func", None)
        or {
            "info": _cmd_info,
            "synth": _cmd_synth,
            "sample": _cmd_sample,
        }[args.command]
    )
    try:
        return handler(args)
    except BrokenPipeError as exc:
        if exc.filename is not None:
            return report_error(args.command, exc, subject=_subject(args), debug=args.debug)
        # Our output went to a pipe that closed early (`| head`): nothing went wrong with
        # the slide. Quiet, with the status a shell gives a process killed by SIGPIPE; the
        # interpreter's final flush goes to /dev/null instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(args.command, exc, subject=_subject(args), debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
