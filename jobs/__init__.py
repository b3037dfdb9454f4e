"""Entry points for the CLI and for `ray job submit -- python -m jobs.<name>`."""
