"""Readers, writers and the synthetic mosaic generator (no Qt, no napari)."""
