"""Shared fixtures for the unit tests: literal data, temp dirs and one tiny LLaVA checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA checkpoint saved with save_pretrained, built once per test session."""
    from pipeline.testing.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)
