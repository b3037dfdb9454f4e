"""Recipe + checkpoints -> frozen Plan."""
