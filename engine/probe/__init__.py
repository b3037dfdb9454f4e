"""The vision-token-masking probe (PlaM, arXiv 2601.07645): how much each decoder layer of an MLLM's language model
still needs to see the image. See docs/probe.md.

Modules: attention (masked attention function), core (model parts, inputs), paths (exact + fast path), generation,
prompting, readers, scoring, plateau, focus, plots, actors (Ray), runner (the whole job), fixtures (tiny models and
benchmarks for tests and the demo).
"""
