"""``confocal-stain``: the headless entry point.

Subcommands::

    confocal-stain info PATH [--f-path F] [--channels R,F] [--normalization MODE]
    confocal-stain synth OUT --size 30000x30000 --seed 1 [--looks 5] [--dtype uint8]
    confocal-stain sample            # prints the bundled sample slide's folder
    confocal-stain stain SLIDE --out OUT.ome.zarr|OUT.ome.tif [--method linear|gan] [--resume]
    confocal-stain batch SLIDES... --out-dir DIR
    confocal-stain metrics SLIDE [--model M] [--strategy S ...] [--cell 512] [--csv C] [--plot P]

Each subcommand module (:mod:`~.inspect`: info, synth, sample; :mod:`~.export`: stain,
batch; :mod:`~.metrics`: metrics) adds its parsers with ``add_parsers(subparsers)``, each
setting ``func=run_…``; :func:`main` calls ``args.func(args)``. A ``run_…`` raises; errors
the user can cause (bad paths, bad files, bad options, permission denied, a read-only or
full disk, out of memory) print one line to stderr naming the file and the problem and
exit with status 2; Ctrl-C exits with 130; a bug prints a one-line summary and exits with 1
(``--debug`` shows the traceback). See :mod:`napari_confocal_stain.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_confocal_stain import __version__
from napari_confocal_stain.cli import export, inspect, metrics
from napari_confocal_stain.cli.common import add_debug_flag, report_error

__all__ = ["build_parser", "main"]

SUBCOMMAND_MODULES = (inspect, export, metrics)
"""Modules adding subcommands, in the order ``--help`` lists them."""


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
    for module in SUBCOMMAND_MODULES:
        module.add_parsers(sub)
    for subparser in sub.choices.values():
        add_debug_flag(subparser)
    return parser


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
    try:
        return args.func(args)
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
