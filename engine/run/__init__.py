"""Executing a Plan: work units, memory budget, the driver, the Ray pool and the merge workers."""
