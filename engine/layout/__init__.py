"""Which tensor of a checkpoint is what, per model family."""
