"""The file- and folder-naming rules of confocal slides, in one place.

Everything that decides from a name alone whether a path is part of a slide uses these
functions: :func:`~napari_confocal_stain.io.readers.open_mosaic` and the napari reader's
path claiming alike, so the two always agree.

* An R/F TIFF pair: ``<stem>_R.tif`` and ``<stem>_F.tif``, with ``_`` or ``-`` before the
  role letter, the role letter and the ``.tif``/``.tiff`` suffix in any case
  (``s1-r.TIF`` pairs with ``s1_F.tiff``); the stems must be equal.
* A Vivascope mosaic: a folder with detector sub-folders ``DET#1`` (R) and ``DET#2`` (F)
  (``#``, ``_``, ``-``, a space or nothing between, any case), each holding
  ``highres_raw.tif``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "RAW_NAMES",
    "detector_number",
    "pair_partner",
    "rf_pair",
    "rf_role",
]

_RF_RE = re.compile(r"^(?P<stem>.+)[_-](?P<role>[rf])\.tiff?$", re.IGNORECASE)
_DET_RE = re.compile(r"^det[#_ -]?([12])$", re.IGNORECASE)

RAW_NAMES = ("highres_raw.tif", "highres_raw.tiff")
"""Names (lower case) of a Vivascope detector's image file."""


def rf_role(name: str) -> tuple[str, str] | None:
    """The role and stem of an R/F pair file name.

    Parameters
    ----------
    name
        A file name (not a path), e.g. ``"s1_R.tif"``.

    Returns
    -------
    tuple or None
        ``("R" or "F", stem)``, or ``None`` if the name is not ``<stem>[_-][RrFf].tif(f)``.

    Examples
    --------
    >>> rf_role("s1-r.TIF")
    ('R', 's1')
    >>> rf_role("s1.tif") is None
    True
    """
    m = _RF_RE.match(name)
    if m is None:
        return None
    return m.group("role").upper(), m.group("stem")


def pair_partner(path: str | os.PathLike[str]) -> Path | None:
    """The other half of an R/F pair: the file of the other role with the same stem.

    Parameters
    ----------
    path
        An R/F-named file (see :func:`rf_role`).

    Returns
    -------
    pathlib.Path or None
        The partner in the same folder, or ``None`` if the name is not an R/F name,
        the partner is missing, or the folder cannot be listed. When several names
        qualify (``s1_F.tif`` and ``s1-f.tiff``), the one written like ``path`` wins,
        then the first in sorted order.
    """
    p = Path(path)
    role = rf_role(p.name)
    if role is None:
        return None
    want = ("F" if role[0] == "R" else "R", role[1])
    try:
        entries = sorted(os.scandir(p.parent or "."), key=lambda e: e.name)
    except OSError:
        return None
    names = [e.name for e in entries if e.name != p.name and rf_role(e.name) == want]
    if not names:
        return None
    # Prefer the name written like ``path`` (same separator, suffix and letter case).
    i = len(role[1]) + 1
    other = want[0] if p.name[i].isupper() else want[0].lower()
    same = p.name[:i] + other + p.name[i + 1 :]
    preferred = [n for n in names if n == same]
    return p.with_name((preferred or names)[0])


def rf_pair(path: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """``(R, F)`` paths if ``path`` is one half of an R/F pair whose partner exists.

    Parameters
    ----------
    path
        A file path.

    Returns
    -------
    tuple or None
    """
    p = Path(path)
    partner = pair_partner(p)
    if partner is None:
        return None
    return (p, partner) if rf_role(p.name)[0] == "R" else (partner, p)  # type: ignore[index]


def detector_number(name: str) -> int | None:
    """1 or 2 for a Vivascope detector folder name (``DET#1``, ``det_2``, ...), else ``None``.

    Parameters
    ----------
    name
        A folder name.

    Returns
    -------
    int or None
    """
    m = _DET_RE.match(name)
    return int(m.group(1)) if m else None
