"""What every ``confocal-stain`` subcommand shares: option types and the error report.

Errors reach the user through :func:`report_error`, which asks
:func:`napari_confocal_stain.errors.explain` for the one line and the exit status:

* a failure the user caused (bad or missing file, bad option value, permission denied,
  read-only or full disk, a folder where a file belongs, a symlink loop, out of memory):
  ``confocal-stain CMD: error: <file>: <problem>``, exit status 2;
* Ctrl-C: ``confocal-stain CMD: interrupted…``, exit status 130 (an export keeps its
  work folder for ``--resume``);
* anything else is a bug: ``confocal-stain CMD: internal error: <type>: <message> (run
  with --debug for the traceback)``, exit status 1.

``--debug`` (before or after the subcommand) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from napari_confocal_stain.errors import INTERNAL_ERROR, INTERRUPTED, explain

__all__ = [
    "add_debug_flag",
    "device",
    "int_at_least",
    "nonnegative_float",
    "positive_float",
    "report_error",
]


def report_error(
    command: str, exc: BaseException, *, subject: str | Path | None = None, debug: bool = False
) -> int:
    """Print what went wrong as one line on stderr; return the exit status.

    Parameters
    ----------
    command
        The subcommand (``"stain"``, ``"batch"``, …), named in the line.
    exc
        The error.
    subject
        The file the command was working on, named when the error names none.
    debug
        Also print the traceback (before the line, so the line stays last).
    """
    message, status = explain(exc, subject)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    elif status == INTERNAL_ERROR:
        message += " (run with --debug for the traceback)"
    label = "" if status == INTERRUPTED else "error: "
    print(f"confocal-stain {command}: {label}{message}", file=sys.stderr)
    return status


def add_debug_flag(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--debug``: show the traceback of an error (on the main parser and every subcommand).

    The subcommands' flag has no default of its own, so ``confocal-stain --debug stain …``
    is not reset by the subparser.
    """
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print the traceback of an error as well",
    )


def int_at_least(low: int, multiple: int = 1) -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= low`` (and a multiple of ``multiple``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or value % multiple:
            what = f"a multiple of {multiple} " if multiple > 1 else "an integer "
            raise argparse.ArgumentTypeError(f"expected {what}>= {low}, got {text!r}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    """An ``argparse`` type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    value = text.strip().lower()
    if not _DEVICE.match(value):
        raise argparse.ArgumentTypeError(
            f"device must be auto, cpu, cuda, cuda:N or mps, got {text!r}"
        )
    return value
