"""Versioned output schemas, installed as the package `pipeline._schemas` (see pyproject.toml)."""
