"""Reviewing the calibrated hallucination flags: outlines, a per-slide summary, Next / Previous.

The Heatmaps widget measures; this part shows what the flags say. Flagged cells are outlined
by one Shapes layer per slide and output (:func:`outline_rectangles`); :class:`FlagReview`
holds the summary line ("n of m tissue cells flagged") and the *Previous* / *Next flagged*
buttons, which walk the flagged cells from the most suspicious (highest score) down,
wrapping at either end, centring and zooming the view on each and saying its score and
reasons in words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton

from napari_confocal_stain.measure.report import reasons_in_words
from napari_confocal_stain.napari._widget_parts import button_row, wrap_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_confocal_stain.measure.slide import SlideMaps

__all__ = ["OUTLINE_COLOUR", "FlagReview", "flag_order", "outline_rectangles"]

#: Edge colour of the flagged-cell outlines.
OUTLINE_COLOUR = "#ffd400"
#: Share of the canvas's smaller side a reviewed cell fills.
REVIEW_FILL = 0.6


def flag_order(maps: SlideMaps) -> list[tuple[int, int]]:
    """The flagged cells, most suspicious first (score descending, then row-major).

    Parameters
    ----------
    maps
        A slide's measured maps.

    Returns
    -------
    list of (row, col)
    """
    cells = np.argwhere(maps.flagged)
    scores = maps.flags["score"][maps.flagged]
    order = np.lexsort((cells[:, 1], cells[:, 0], -scores)) if len(cells) else []
    return [(int(cells[k, 0]), int(cells[k, 1])) for k in order]


def outline_rectangles(maps: SlideMaps) -> list[np.ndarray]:
    """One rectangle per flagged cell, corners in level-0 pixel coordinates.

    A cell covers pixels ``[i·cell, (i+1)·cell)``; napari centres pixel ``k`` on ``k``, so
    its outline runs from ``i·cell − ½`` to ``(i+1)·cell − ½`` (clipped to the slide).
    """
    h, w = maps.shape
    c = maps.cell
    rects = []
    for i, j in np.argwhere(maps.flagged):
        y0, x0 = i * c - 0.5, j * c - 0.5
        y1, x1 = min((i + 1) * c, h) - 0.5, min((j + 1) * c, w) - 0.5
        rects.append(np.array([[y0, x0], [y1, x1]], np.float64))
    return rects


class FlagReview(Container):
    """Summary line, *Previous* / *Next flagged* and the reviewed cell's score and reasons.

    Parameters
    ----------
    viewer
        The napari viewer whose camera the buttons move.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.summary = Label(value="No cells measured yet.")
        self.prev_button = PushButton(text="◀ Previous", enabled=False)
        self.next_button = PushButton(text="Next flagged ▶", enabled=False)
        self.cell_info = Label(value="")
        super().__init__(
            widgets=[self.summary, button_row(self.prev_button, self.next_button), self.cell_info],
            labels=False,
        )
        self.margins = (0, 0, 0, 0)
        wrap_label(self.summary)
        wrap_label(self.cell_info)
        self.prev_button.changed.connect(lambda *_: self.step(-1))
        self.next_button.changed.connect(lambda *_: self.step(1))
        self._maps: SlideMaps | None = None
        self._slide = ""
        self._transform: tuple[np.ndarray, np.ndarray] = (np.ones(2), np.zeros(2))
        self._order: list[tuple[int, int]] = []
        self._index = -1

    @property
    def order(self) -> list[tuple[int, int]]:
        """The flagged cells in review order."""
        return list(self._order)

    def show(self, slide: str, maps: SlideMaps | None, layer: Any = None, note: str = "") -> None:
        """Show a slide's flags (None: nothing measured); ``layer`` places its pixels.

        The cell under review stays under review while it is still flagged.
        """
        current = self._order[self._index] if 0 <= self._index < len(self._order) else None
        self._slide, self._maps = slide, maps
        if layer is not None:
            self._transform = (
                np.asarray(layer.scale, float)[-2:],
                np.asarray(layer.translate, float)[-2:],
            )
        self._order = flag_order(maps) if maps is not None else []
        self._index = self._order.index(current) if current in self._order else -1
        if self._index < 0:
            self.cell_info.value = ""
        self.prev_button.enabled = self.next_button.enabled = bool(self._order)
        self.summary.value = self._summary_text(note)

    def _summary_text(self, note: str) -> str:
        maps = self._maps
        if maps is None:
            return note or "No cells measured yet."
        flagged, tissue, unflagged = maps.flag_summary()
        text = f"{self._slide}: {flagged} of {tissue} tissue cells flagged"
        if unflagged:
            text += (
                f" ({unflagged} cells measured at a coarse level have no flags: zoom in "
                "to full resolution, or measure the whole slide at level 0)"
            )
        return f"{text}. {note}" if note else text

    def step(self, delta: int) -> tuple[int, int] | None:
        """Go to the next (``+1``) or previous (``-1``) flagged cell, wrapping around.

        Returns
        -------
        (row, col) or None
            The cell now under review (None when no cell is flagged).
        """
        if not self._order:
            self.cell_info.value = "No flagged cells to review."
            return None
        if self._index < 0:
            self._index = 0 if delta > 0 else len(self._order) - 1
        else:
            self._index = (self._index + delta) % len(self._order)
        cell = self._order[self._index]
        self._go(cell)
        return cell

    def cell_centre(self, cell: tuple[int, int]) -> np.ndarray:
        """World ``(y, x)`` of a cell's centre (the middle of its pixels)."""
        maps = self._maps
        c = maps.cell
        h, w = maps.shape
        y0, x0 = cell[0] * c, cell[1] * c
        y1, x1 = min(y0 + c, h), min(x0 + c, w)
        centre = np.array([(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2])
        scale, translate = self._transform
        return translate + scale * centre

    def _go(self, cell: tuple[int, int]) -> None:
        maps = self._maps
        scene = getattr(self._viewer, "scene", None)  # napari >= 0.9; .camera before
        camera = scene.camera if scene is not None else self._viewer.camera
        centre = self.cell_centre(cell)
        camera.center = (*tuple(camera.center)[:-2], *centre)
        side = float(maps.cell * np.max(self._transform[0]))
        canvas = float(min(self._viewer.canvas.size))
        camera.zoom = REVIEW_FILL * canvas / side
        score = float(maps.flags["score"][cell])
        words = reasons_in_words(maps.reasons[cell]) or "no single signal (combined score)"
        self.cell_info.value = (
            f"Flagged cell {self._index + 1} of {len(self._order)} (row {cell[0]}, column "
            f"{cell[1]}): score {score:.2f} (above 1 = flagged). Why: {words}."
        )
