"""Reading and writing bytes: checkpoint formats, bounded text loaders, LoRA inputs, output shards."""
