"""Pure array code (no Qt, no napari): normalisation, linear stain, tiling, inference, metrics."""
