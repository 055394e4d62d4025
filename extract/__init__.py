"""Stage 1: upstream registry and extract-features."""
