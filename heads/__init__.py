"""Stage 2: pooling heads, losses, samplers and train-head."""
