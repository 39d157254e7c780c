"""Small pieces every dock widget uses: its width, wrapping status lines, rows of buttons."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import Container, Label

__all__ = ["PANEL_WIDTH", "button_row", "wrap_label"]

PANEL_WIDTH = 440
"""Widest a dock gets (px): the canvas keeps most of the window."""


def wrap_label(label: Label) -> None:
    """Let a status label wrap instead of widening the dock."""
    label.native.setWordWrap(True)


def button_row(*widgets: Any) -> Container:
    """Widgets side by side in one unlabelled, margin-free row."""
    row = Container(widgets=list(widgets), layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    return row
