"""Layer-sweep analysis: per-layer representation metrics."""
