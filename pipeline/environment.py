"""This process's environment variables, set for a block and put back after it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def variables_set(variables: dict[str, str]) -> Iterator[None]:
    """`variables` in `os.environ` inside the block; each as it was (or unset) after it. For what a child process
    started inside the block inherits, such as a local Ray's workers."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
