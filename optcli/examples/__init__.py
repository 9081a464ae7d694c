"""Small example models and data the README and tests use (no downloads)."""
