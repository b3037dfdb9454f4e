"""shardmerge engine: recipes, checkpoints, plans, merge methods, execution, output writing, verification."""

__version__ = "0.1.0"
