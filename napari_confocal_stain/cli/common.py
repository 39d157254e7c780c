"""What every ``confocal-stain`` subcommand shares: option types, progress bars, errors.

A subcommand's ``run(args)`` raises; :func:`napari_confocal_stain.cli.main` (and ``batch``,
for each slide) turns the error into one line with :func:`describe_failure`, which asks
:func:`napari_confocal_stain.errors.explain` for the words and the exit status:

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
from typing import Any

from napari_confocal_stain.errors import INTERNAL_ERROR, INTERRUPTED, explain

__all__ = [
    "Progress",
    "add_debug_flag",
    "describe_failure",
    "device",
    "int_at_least",
    "nonnegative_float",
    "positive_float",
    "report_error",
]


def describe_failure(
    exc: BaseException, *, subject: str | Path | None = None, debug: bool = False
) -> tuple[str, int]:
    """The one line telling the user what went wrong, and the exit status.

    With ``debug`` the traceback is printed to stderr at once (so the line, printed by the
    caller, stays last); otherwise a bug's line says how to get it.

    Parameters
    ----------
    exc
        The error.
    subject
        The file the command was working on, named when the error names none.
    debug
        Print the traceback.

    Returns
    -------
    tuple of (str, int)
        The message (no command prefix) and the exit status (see the module notes).
    """
    message, status = explain(exc, subject)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    elif status == INTERNAL_ERROR:
        message += " (run with --debug for the traceback)"
    return message, status


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
    message, status = describe_failure(exc, subject=subject, debug=debug)
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


class Progress:
    """A tqdm bar on stderr fed ``progress(done, total)``; draws nothing when ``quiet``.

    The bar is made at the first call, when the total is known, starting at ``done`` (a
    resumed export's rate and ETA then count only this run's work).

    Parameters
    ----------
    desc
        The bar's label.
    unit
        What ``done`` counts (``"px"``, ``"strip"``, ``"chunk"``).
    quiet
        Draw nothing.
    unit_scale
        Show ``done`` with SI prefixes (``12.3Mpx``).
    """

    def __init__(self, desc: str, unit: str, *, quiet: bool = False, unit_scale: bool = False):
        self.desc, self.unit, self.quiet, self.unit_scale = desc, unit, quiet, unit_scale
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=self.desc, unit=self.unit,
                unit_scale=self.unit_scale, file=sys.stderr,
            )  # fmt: skip
        self.bar.update(done - self.bar.n)

    def note(self, text: str) -> None:
        """Show ``text`` after the bar (e.g. which of several runs is going)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    """An ``argparse`` type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    value = text.strip().lower()
    if not _DEVICE.match(value):
        raise argparse.ArgumentTypeError(
            f"device must be auto, cpu, cuda, cuda:N or mps, got {text!r}"
        )
    return value
