"""shardmerge: a distributed, sharded merge engine for large (multimodal) models on Ray.

The repository root is the `shardmerge` import package: `shardmerge.engine` (the library), `shardmerge.kernels`
(Triton kernels) and `shardmerge.jobs` (CLI and `ray job submit` entry points). Installing the distribution adds
no other top-level import name. From a source checkout that is not installed, `python -m jobs.<name>` binds this
directory as `shardmerge` first (see jobs/__init__.py).
"""

__version__ = "0.1.0"
