"""Refusing stored values that are not intensities, wherever they are read.

Opening a slide looks at a sample only, so NaN or infinite floats (or negative values in
signed integer data) elsewhere are met later, when that region is read for display,
staining or export. Normalisation would quietly map them to 0 or 1 and the network would
stain them as tissue or background, so every read of such a plane checks what it read and
raises a :class:`MosaicError` naming the file and the region instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_confocal_stain.errors import MosaicError

__all__ = ["CheckedPlane", "check_values", "needs_value_check"]


def needs_value_check(dtype: np.dtype | str) -> bool:
    """Whether data of ``dtype`` can hold values that are not intensities (float, signed)."""
    return np.dtype(dtype).kind in "fi"


def check_values(
    block: np.ndarray, path: str, *, level: int, role: str, origin: tuple[int, int] = (0, 0)
) -> None:
    """Raise if a block read from a file holds NaN/inf (float) or negative (signed) values.

    Parameters
    ----------
    block
        2-D values as read.
    path
        The file they came from.
    level, role
        Pyramid level and mode (``"R"``/``"F"``), for the message.
    origin
        Row and column of ``block[0, 0]`` in the level.

    Raises
    ------
    MosaicError
        Naming the file, the level and the rows and columns holding the bad values.
    """
    kind = block.dtype.kind
    if kind == "f":
        bad = ~np.isfinite(block)
        what = "NaN or infinite values"
        why = "float intensities must be finite"
    elif kind == "i":
        bad = block < 0
        what = f"negative values ({block.dtype} data)"
        why = "confocal intensities are not negative, so this is not a raw R/F image"
    else:
        return
    if not bad.any():
        return
    rows = np.flatnonzero(bad.any(axis=1))
    cols = np.flatnonzero(bad.any(axis=0))
    y0, x0 = origin
    region = f"rows {y0 + rows[0]}:{y0 + rows[-1] + 1}, cols {x0 + cols[0]}:{x0 + cols[-1] + 1}"
    raise MosaicError(
        path,
        f"contains {what} in level {level} ({role}), {region} ({int(bad.sum())} px); {why}",
    )


def _origin(key: Any, shape: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(key, tuple):
        key = (key,)
    out = []
    for k, n in zip(key + (slice(None),) * (2 - len(key)), shape, strict=False):
        if isinstance(k, slice):
            out.append(k.indices(n)[0])
        else:
            i = int(k)
            out.append(i + n if i < 0 else i)
    return out[0], out[1]


class CheckedPlane:
    """A stored plane (``TiffPlane``, ``ZarrPlane``) whose every read is checked.

    Slicing reads through the wrapped plane, then :func:`check_values`. Other attributes
    (``chunk``, ``kind``, ``bytes_read``, ...) are the wrapped plane's.

    Parameters
    ----------
    plane
        The plane.
    path
        Its file, for messages.
    level, role
        Its pyramid level and mode (``"R"``/``"F"``), for messages.
    """

    ndim = 2

    def __init__(self, plane: Any, path: str, level: int, role: str) -> None:
        self._plane = plane
        self._path = str(path)
        self._level = int(level)
        self._role = role

    def __getattr__(self, name: str) -> Any:
        plane = self.__dict__.get("_plane")
        if plane is None:
            raise AttributeError(name)
        return getattr(plane, name)

    def __repr__(self) -> str:
        return f"CheckedPlane({self._plane!r})"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._plane.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._plane.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.asarray(self._plane[key])
        check_values(
            np.atleast_2d(out),
            self._path,
            level=self._level,
            role=self._role,
            origin=_origin(key, self.shape),
        )
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:, :]
        return arr if dtype is None else arr.astype(dtype)
