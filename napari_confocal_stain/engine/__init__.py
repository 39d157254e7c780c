"""Products of any box of a slide and the tile renderer that computes them for the
viewer: pipeline, scheduler, cancellation, caches, blending (no Qt)."""
