"""Region renderer: tile cache, scheduler, cancellation (no Qt)."""
