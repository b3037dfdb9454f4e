"""Oracles and drivers that only tests use (kept out of the library)."""
