"""The library: recipe → io → layout → plan → methods → run → verify, with the probe beside it (docs/architecture.md)."""
