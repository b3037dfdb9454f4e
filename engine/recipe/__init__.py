"""YAML recipe -> frozen, validated Recipe."""
