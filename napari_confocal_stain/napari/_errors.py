"""How the napari widgets word an error: one line for one notification and the status line.

Work in a background thread returns (or yields) its error instead of raising it: a raised
error would also reach napari's own handler, a second report with a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from napari_confocal_stain.errors import INTERNAL_ERROR, explain

_LOG = logging.getLogger("napari_confocal_stain")


def describe(exc: BaseException, subject: str | Path | None = None) -> str:
    """One line naming the file and the problem (as :func:`napari_confocal_stain.errors.explain`).

    A bug (not a failure the user caused) is logged with its traceback, and the line says
    where to find it.
    """
    message, status = explain(exc, subject)
    if status == INTERNAL_ERROR:
        _LOG.error("napari-confocal-stain: %s", message, exc_info=exc)
        message += " (the traceback is in the log)"
    return message
