"""The bundled models the plugin and the CLI use when the user does not choose one.

One place to change the default: the training work that ships a better stain model (see
``docs/training.md``) switches :data:`DEFAULT_STAIN_MODEL` here once it wins on nuclei
preservation without losing on LBP χ² / SSIM.
"""

from __future__ import annotations

DEFAULT_STAIN_MODEL = "stain-fast"
"""Bundled GAN stain generator (``models/weights/<name>.safetensors``)."""

DEFAULT_DESPECKLE_MODEL = "despeckle-combalia"
"""Bundled despeckling network."""
