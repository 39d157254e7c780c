"""Choosing and loading a model in the widgets: a bundled name or a checkpoint file.

Loading happens in a ``thread_worker`` so a slow disk or a bad file never freezes the
viewer; the loaded model is cached per process (``engine.pipeline.get_model``), so the
renderer that runs next finds it ready.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Container, FileEdit

__all__ = ["FILE_CHOICE", "ModelChooser", "bundled_weights", "load_model_async"]

FILE_CHOICE = "Checkpoint file…"


def bundled_weights(prefix: str) -> list[str]:
    """Names of the bundled weights that start with ``prefix`` (``"stain"``, ``"despeckle"``)."""
    from napari_confocal_stain.models.checkpoint import available_weights

    return [n for n in available_weights() if n.startswith(prefix)]


class ModelChooser(Container):
    """A bundled model name or a checkpoint file."""

    def __init__(self, label: str, prefix: str, default: str) -> None:
        names = bundled_weights(prefix)
        if default not in names:
            names.insert(0, default)
        self.bundled = ComboBox(label=label, choices=[*names, FILE_CHOICE], value=default)
        self.file = FileEdit(
            label="File",
            mode="r",
            filter="*.safetensors *.pt *.pth",
            tooltip="A .safetensors checkpoint written by `python -m training …` "
            "(or a legacy .pt state dict)",
        )
        super().__init__(widgets=[self.bundled, self.file], labels=True)
        self.margins = (0, 0, 0, 0)
        self.file.visible = False
        self.bundled.changed.connect(lambda *_: setattr(self.file, "visible", self.is_file))

    @property
    def is_file(self) -> bool:
        return self.bundled.value == FILE_CHOICE

    @property
    def choice(self) -> str | None:
        """The bundled name or the file path; None if "file" is chosen but empty."""
        if not self.is_file:
            return str(self.bundled.value)
        path = Path(self.file.value) if self.file.value else None
        return str(path) if path and path.name and path.is_file() else None


def load_model_async(
    name_or_path: str,
    device: str,
    kind: str,
    *,
    on_ok: Callable[[Any], None],
    on_error: Callable[[BaseException], None],
    precision: str | None = None,
    warm_tile: tuple[int, int] | None = None,
) -> Any:
    """Load a model in a worker thread (cached for the renderer), then call back.

    Parameters
    ----------
    name_or_path, device, kind
        As for ``engine.pipeline.get_model`` (``kind`` is ``"stain"`` or ``"despeckle"``).
    on_ok
        Called on the main thread with the model, or with ``precision`` a settings patch
        ``{"device", "precision"}``: ``"auto"`` resolved for this model (the one-off CPU
        bf16 calibration takes a few seconds), so cache scopes record what actually
        computed the pixels.
    on_error
        Called on the main thread with the error instead.
    precision
        Resolve this precision (and the device) as well.
    warm_tile
        ``(tile, context)``: run the model once on a tile as the renderer cuts it (see
        ``engine.pipeline.warm_up``).

    Returns
    -------
    napari.qt.threading.FunctionWorker
        The started worker.
    """
    from napari.qt.threading import thread_worker

    from napari_confocal_stain.engine.pipeline import get_model

    @thread_worker
    def _load() -> tuple[Any, BaseException | None]:
        # Errors are returned, not raised: a raised error would also reach napari's own
        # exception dialog (two reports for one bad file).
        try:
            model = get_model(name_or_path, device, kind)
            if precision is None:
                return model, None
            from napari_confocal_stain.inference import resolve_device, resolve_precision

            dev = resolve_device(device)
            resolved = resolve_precision(precision, dev, model)
            if warm_tile:
                from napari_confocal_stain.engine.pipeline import warm_up

                warm_up(model, tile=warm_tile[0], context=warm_tile[1], precision=resolved,
                        device=str(dev))  # fmt: skip
            return {"device": str(dev), "precision": resolved}, None
        except Exception as exc:
            return None, exc

    def done(result: tuple[Any, BaseException | None]) -> None:
        value, exc = result
        if exc is None:
            on_ok(value)
        else:
            on_error(exc)

    worker = _load()
    worker.returned.connect(done)
    worker.start()
    return worker
