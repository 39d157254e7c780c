"""Small pieces every dock widget uses: its width, wrapping status lines, rows of buttons."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import Container, Label

__all__ = ["PANEL_WIDTH", "button_row", "wrap_label"]

PANEL_WIDTH = 440
"""Widest a dock gets (px): the canvas keeps most of the window."""


WRAP_MIN_WIDTH = 160
"""Narrowest a wrapped status label gets (px) before the dock must widen."""


def wrap_label(label: Label) -> None:
    """Let a status label wrap instead of widening the dock, over the dock's full width.

    Expanding: a layout that aligns its items would otherwise give a wrapped label only
    its size hint's width (a guess), wrapping it narrower than the dock and clipping it.
    A small minimum width: Qt's minimum for a wrapped label is a guess too (often a
    long line's width), which would widen the dock instead of wrapping.
    """
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    policy = label.native.sizePolicy()
    policy.setHorizontalPolicy(QSizePolicy.Policy.Expanding)
    policy.setHeightForWidth(True)
    label.native.setSizePolicy(policy)
    label.native.setMinimumWidth(WRAP_MIN_WIDTH)


def button_row(*widgets: Any) -> Container:
    """Widgets side by side in one unlabelled, margin-free row."""
    row = Container(widgets=list(widgets), layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    return row
