"""Executing a Plan. `executor` opens the output directory and builds the `options` (RunOptions) once; `driver`
accounts for every unit exactly once; units run in this process or on `ray_pool`'s merge workers (`worker`,
connected through `ray_session`); `unit` merges and writes one work unit, with the batches `batching` plans; `memory`
checks a worker's memory budget against the same plan before anything runs."""
