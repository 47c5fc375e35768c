"""The README's reference sections are generated from the code that enforces them."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import JobConfig, nested_model
from pipeline.docs import config_markdown, render_readme

README = Path(__file__).parents[2] / "README.md"


def test_readme_generated_sections_are_current():
    text = README.read_text(encoding="utf-8")
    assert render_readme(text) == text, "run `.venv/bin/python -m pipeline.docs` to regenerate the README"


def _paths(model, prefix=""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        nested = nested_model(field.annotation)
        if nested is not None and not (nested.__name__ == "StorageConfig" and prefix):
            yield from _paths(nested, f"{prefix}{name}.")


def test_every_config_field_is_documented():
    table = config_markdown()
    for path, field in _paths(JobConfig):
        assert f"| `{path}` |" in table, path
        assert field.description, f"{path} has no description"
