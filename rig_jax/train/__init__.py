"""Train state, checkpoints and loop helpers."""
