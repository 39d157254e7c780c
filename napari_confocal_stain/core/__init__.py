"""Pure array code (numpy only): boxes, normalisation, linear stains, tiling plans, seams,
hallucination metrics and nuclei. No torch, no Qt, nothing above it in the package."""
