"""Every CSV and Markdown file the training commands write: result tables and run logs.

One cell format for all of them: floats with 6 significant digits in CSV; in Markdown 4
significant digits (1 decimal from 1000 up) and ``–`` for NaN. A *table* is written whole,
atomically, as CSV and Markdown; a *log* (:class:`CsvLog`) grows a row at a time during a run
and survives a resume.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_confocal_stain._fs import write_atomic

__all__ = ["CsvLog", "csv_text", "markdown_table", "write_table"]


def _csv_cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _markdown_cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _csv_writer(fh: Any, columns: Sequence[str]) -> csv.DictWriter:
    return csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with a header (keys outside ``columns`` are left out)."""
    buf = io.StringIO()
    w = _csv_writer(buf, columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(v) for k, v in r.items()})
    return buf.getvalue()


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (missing values are blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_markdown_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]],
    csv_path: str | Path,
    md_path: str | Path,
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> None:
    """Write ``rows`` as CSV and as Markdown (both atomically).

    Parameters
    ----------
    rows
        One dict per row.
    csv_path, md_path
        Destinations.
    columns
        Column order (default: keys of the first row).
    title
        Optional Markdown heading.
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    write_atomic(csv_path, csv_text(rows, columns))
    head = f"## {title}\n\n" if title else ""
    write_atomic(md_path, head + markdown_table(rows, columns))


class CsvLog:
    """Append rows to a CSV file, writing the header once (the file survives resumes).

    On resume, rows of iterations at or after the resume point are dropped first, so the log
    of a resumed run equals that of an uninterrupted one.

    Parameters
    ----------
    path
        The CSV file.
    fields
        Column names.
    """

    def __init__(self, path: str | Path, fields: Iterable[str]) -> None:
        self.path = Path(path)
        self.fields = list(fields)

    def truncate_from(self, column: str, value: float) -> None:
        """Drop rows whose ``column`` is ≥ ``value`` (the part a resumed run will redo)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if float(r[column]) < value]
        write_atomic(self.path, csv_text(rows, self.fields))

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing fields are blank; floats get 6 significant digits)."""
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as fh:
            w = _csv_writer(fh, self.fields)
            if new:
                w.writeheader()
            w.writerow({k: _csv_cell(v) for k, v in row.items()})

    def remove(self) -> None:
        """Delete the file (a fresh run starts an empty log)."""
        self.path.unlink(missing_ok=True)
