"""``confocal-stain info``, ``synth`` and ``sample``: look at a slide, or make one.

::

    confocal-stain info PATH [--f-path F] [--channels R,F] [--normalization MODE]
    confocal-stain synth OUT --size 30000x30000 --seed 1 [--looks 5] [--dtype uint8]
    confocal-stain sample            # prints the bundled sample slide's folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from napari_confocal_stain.cli.common import Progress, nonnegative_float, positive_float
from napari_confocal_stain.errors import OutputError

__all__ = ["NORMALIZATIONS", "add_parsers", "run_info", "run_sample", "run_synth"]

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


def add_parsers(subparsers: Any) -> None:
    """Add ``info``, ``synth`` and ``sample`` to ``confocal-stain``'s subparsers.

    Parameters
    ----------
    subparsers
        What ``ArgumentParser.add_subparsers`` returned; each subcommand sets ``func``.
    """
    info = subparsers.add_parser(
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
    info.set_defaults(func=run_info)

    synth = subparsers.add_parser(
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
    synth.set_defaults(func=run_synth)

    sample = subparsers.add_parser(
        "sample",
        help="print the folder of the bundled sample slide (generated on first use)",
    )
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=run_sample)


def run_info(args: argparse.Namespace) -> int:
    """``confocal-stain info``: print the slide's description as JSON."""
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


def run_synth(args: argparse.Namespace) -> int:
    """``confocal-stain synth``: write a synthetic slide; prints its folder."""
    from napari_confocal_stain.io.synthetic import write_synthetic_mosaic

    for parent in args.out.parents:  # mkdir would call a file in the way "already exists"
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(parent, "is a file, not a folder")
            break
    with Progress(f"synth {args.size[0]}x{args.size[1]}", "strip", quiet=args.quiet) as bar:
        out = write_synthetic_mosaic(
            args.out,
            size=args.size,
            seed=args.seed,
            looks=args.looks or None,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=None if args.quiet else bar,
        )
    print(out)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """``confocal-stain sample``: print the sample slide's folder (made on first use)."""
    from napari_confocal_stain.io.sample import sample_slide_path

    with Progress("sample slide (first time only)", "strip", quiet=args.quiet) as bar:
        print(sample_slide_path(progress=None if args.quiet else bar))
    return 0
